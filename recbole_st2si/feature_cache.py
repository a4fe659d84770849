"""Run the frozen part of the backbone once, then train on its cached states.

With a frozen backbone in eval mode every hidden state is a fixed function of the input, so what
the frozen layers compute can be computed once:

* ``train_stage: ilp`` (nothing of the backbone trains): the last hidden state at every ``[Q]``;
  ILP tuning is then a softmax regression on these features;
* ``train_stage: top`` (the last ``top_layers`` layers train): the hidden states entering the first
  trained layer, for every token; each epoch runs only the trained layers on them.

The cache encodes the windows of ``train_window: all`` (:mod:`recbole_st2si.data.windows`): each
user's whole history, test item included, tiled backwards into windows of at most
``MAX_ITEM_LIST_LENGTH`` items and fewer than ``max_seq_tokens`` tokens. One pass over every item of
every history gives what predicts each of the user's items: the training transitions, the state
before the validation item and the one before the test item (the last window is exactly the test
input). The validation state sees the test window up to the validation item, one item fewer than
RecBole's validation input when the history is longer than the window. The alignment prompts are
encoded too. :mod:`recbole_st2si.data.cached_dataloader` reads the states back.

The pass runs in bfloat16 where the hardware computes it natively (``feature_cache_dtype: auto``),
about twice as fast on CPUs with AVX512-BF16 or AMX. The states are stored on disk under a key that
hashes the frozen weights, both precisions, the split of the backbone and every model input (item
tokens, histories, prompt, limits), so a second run or a tuning trial reuses them and a cache built
for another backbone, dataset or text setting is never used.

A cache grows with the data (``H`` values per transition, or per token), so it is never held in memory whole:

* the states are one raw file of rows, ``<dataset>-<key>.states``, in bfloat16
  (``feature_cache_storage``: half the bytes of float32, with float32's range, so hidden-state
  outliers cannot overflow as in float16), and a small record ``<dataset>-<key>.pt`` (its layout
  and the file's SHA-256), written last: a cache without its record is incomplete;
* the file is memory-mapped, both while the pass writes it and when training reads it: its pages
  belong to the page cache, which the kernel fills on use and may drop again, and each batch
  converts only its own rows to float32;
* the DDP processes of a run on one machine (``--nproc=N``) share one pass: rank 0 looks for the
  cache under the file lock and, if it must be built, every rank encodes every ``N``-th batch of
  the same length-sorted batches into the same file, so the file is the one a single process writes.

Runs that need the same cache at once (tuning trials) take turns under the lock: the one that holds
it writes its host and process id into the lock file, and one that waits for it says whom it waits for.
"""

import copy
import fcntl
import hashlib
import os
import socket
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from logging import getLogger
from pathlib import Path

import torch
import torch.distributed as dist
from recbole.utils import set_color
from tqdm import tqdm

from recbole_st2si.data.windows import UserSequences, tile_windows
from recbole_st2si.compiling import Compiled, compile_wanted
from recbole_st2si.errors import UserInputError
from recbole_st2si.precision import has_native_bf16
from recbole_st2si.run_files import frozen_weights_digest
from recbole_st2si.safe_io import (
    DamagedFileError,
    atomic_path,
    file_sha256,
    human_size,
    load_checked,
    reserve_space,
    save_checked,
)

CACHE_FORMAT = 6  # 6: the pass runs on weights converted once, in batches of a token budget
CACHE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class CachedStates:
    """A cache's two tables, in the storage precision (usually views of a memory-mapped file).

    ``history``: without trained layers (``ilp``), the ``[Q]`` state of every transition of every user
    of :class:`~recbole_st2si.data.windows.UserSequences` in turn (see ``transition_index``); with
    trained layers (``top``), the states of every token of each transition's input item (see
    :class:`TokenRows`). ``alignment``: likewise for the alignment prompts of items ``1 ..``.
    """

    history: torch.Tensor
    alignment: torch.Tensor


class TokenRows:
    """Where the token states of each input lie in a token cache: the input item of transition ``t``
    (the item whose ``[Q]`` predicts the transition's item) has the rows ``start[t] .. end[t] - 1``
    of the history table, its ``[Q]`` last; the alignment prompt of item ``i`` has the rows
    ``alignment_start[i - 1] .. alignment_end[i - 1] - 1`` of the alignment table."""

    def __init__(self, segment_len, sequences: UserSequences, prompt_item_id):
        transitions = sequences.lengths - 1
        user_of = torch.repeat_interleave(torch.arange(len(transitions)), transitions)
        inputs = sequences.items[torch.arange(len(user_of)) + user_of]
        self.end = segment_len[inputs].cumsum(0)
        self.start = self.end - segment_len[inputs]
        prompts = segment_len[prompt_item_id] + segment_len[1:prompt_item_id]
        self.alignment_end = prompts.cumsum(0)
        self.alignment_start = self.alignment_end - prompts

    @property
    def history(self):
        return int(self.end[-1]) if len(self.end) else 0

    @property
    def alignment(self):
        return int(self.alignment_end[-1]) if len(self.alignment_end) else 0


@dataclass(frozen=True)
class StatesLayout:
    """The shape and storage precision of a cache: its history rows, then its alignment rows."""

    history: int
    alignment: int
    hidden: int
    storage: str
    trained_layers: int

    @classmethod
    def of(cls, model, sequences: UserSequences, storage):
        if model.trained_layers:
            rows = TokenRows(model.segment_len.cpu(), sequences, model.prompt_item_id)
            history, alignment = rows.history, rows.alignment
        else:
            history, alignment = int((sequences.lengths - 1).sum()), model.n_items - 1
        return cls(history, alignment, model.ilp.in_features, storage, model.trained_layers)

    @property
    def values(self):
        return (self.history + self.alignment) * self.hidden

    @property
    def num_bytes(self):
        return self.values * CACHE_DTYPES[self.storage].itemsize

    def map(self, path, writable=False) -> CachedStates:
        """The states of the file ``path``, memory-mapped: its pages are read when used, and the
        kernel can drop them again, so a cache larger than memory still trains. ``writable`` maps
        it shared, so that what is written reaches the file (and the other processes mapping it);
        otherwise it is mapped copy-on-write and the file is only read."""
        states = torch.from_file(str(path), shared=writable, size=self.values, dtype=CACHE_DTYPES[self.storage])
        states = states.view(self.history + self.alignment, self.hidden)
        return CachedStates(history=states[: self.history], alignment=states[self.history :])


class BuildGroup:
    """The processes that build one cache together: the DDP ranks of a run on this one machine, or
    this process alone. Several machines would write the same pages of the shared file from separate
    page caches, so there every process reads or builds the cache on its own, under the file lock."""

    def __init__(self, rank=0, size=1):
        self.rank, self.size = rank, size

    @classmethod
    def of_run(cls, config):
        if not config["single_spec"] and config["world_size"] == config["nproc"]:
            return cls(dist.get_rank(), dist.get_world_size())
        return SINGLE_PROCESS

    def share(self, value):
        """Rank 0's ``value``, on every rank."""
        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self):
        if self.size > 1:
            dist.barrier()


SINGLE_PROCESS = BuildGroup()


def cache_dtype(setting, device):
    """The precision of the frozen pass: ``auto`` is bfloat16 where the hardware has it natively."""
    if setting == "auto":
        return torch.bfloat16 if has_native_bf16(device) else torch.float32
    return CACHE_DTYPES[setting]


def _cache_key(model, sequences: UserSequences, dtype, storage):
    digest = hashlib.sha256(f"st2si-query-features-v{CACHE_FORMAT}".encode())
    digest.update(frozen_weights_digest(model).encode())
    inputs = [model.segment_tokens, model.segment_len, sequences.items, sequences.offsets, sequences.num_train,
              sequences.valid_position, sequences.test_position]
    for tensor in inputs:
        digest.update(tensor.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digest.update(f"{model.max_seq_length}/{model.max_seq_tokens}/{model.n_items}/{dtype}/{storage}/"
                  f"{model.trained_layers}".encode())
    return digest.hexdigest()[:32]


class FrozenPass:
    """The frozen part of a model's backbone, prepared for one long pass: its weights converted to the
    pass's precision once (autocast casts every weight again at every call), and compiled where that
    pays (:mod:`recbole_st2si.compiling`). Called like :meth:`~recbole_st2si.model.st2si.ST2SI.frozen_states`."""

    def __init__(self, model, dtype, compiled=False):
        decoder = model.lower_decoder
        if dtype != torch.float32:
            decoder = copy.deepcopy(decoder).to(dtype)
        self.model, self.decoder = model, Compiled(decoder) if compiled else decoder

    def __call__(self, item_seq, item_seq_len):
        return self.model.frozen_states(item_seq, item_seq_len, self.decoder)


def token_budget_batches(tokens, budget):
    """Batches of sequence indices, shortest first, each as many sequences as fit ``budget`` padded
    tokens (at least one): short histories run many at a time, long ones few, so every matrix product
    has about the same size and little goes to padding."""
    order = torch.argsort(tokens, stable=True)
    batches, start = [], 0
    for end, longest in enumerate(tokens[order].tolist(), 1):
        if (end - start) * longest > budget and end - 1 > start:
            batches.append(order[start : end - 1])
            start = end - 1
    return batches + ([order[start:]] if start < len(order) else [])


@torch.inference_mode()
def encoded_batches(encode, segment_len, seq, seq_len, batch_tokens, desc, rank=0, world=1):
    """Yield ``(rows, states)``: ``encode(item_seq, item_seq_len)`` (float32, on the CPU) of batches of
    sequences of similar token counts (:func:`token_budget_batches`). Of ``world`` processes, rank ``r``
    encodes batches ``r, r + world, ...``: every batch holds the same sequences as in one process, so
    each state is computed exactly as there."""
    batches = token_budget_batches(segment_len[seq].sum(1), batch_tokens)
    device = encode.model.device
    for rows in tqdm(batches[rank::world], desc=desc, ncols=100, disable=rank != 0):
        width = int(seq_len[rows].max())
        yield rows, encode(seq[rows, :width].to(device), seq_len[rows].to(device)).float().cpu()


def write_states(model, sequences: UserSequences, states: CachedStates, batch_tokens, frozen_pass, rank=0, world=1):
    """Run the frozen part of the backbone over the tiled windows of every history and the alignment
    prompts (rank ``rank`` of ``world`` processes: its share, see :func:`encoded_batches`), and write
    what the cache holds (:class:`CachedStates`), rounded to its storage precision."""
    model.eval()
    segment_len = model.segment_len.cpu()
    users, starts, ends = tile_windows(sequences, segment_len, model.max_seq_length, model.max_seq_tokens)
    lengths = ends - starts
    slots = torch.arange(int(lengths.max()) if len(lengths) else 1)
    first_item = sequences.offsets[users] + starts
    seq = sequences.items[(first_item[:, None] + slots).clamp(max=len(sequences.items) - 1)] * (slots < lengths[:, None])
    first_transition = sequences.transition_index(users, starts + 1)
    items = torch.arange(1, model.n_items)  # always cached, so runs with and without ID alignment share the file
    prompts = torch.stack([torch.full_like(items, model.prompt_item_id), items], dim=1)

    def encode(inputs, input_lengths, desc):
        return encoded_batches(frozen_pass, segment_len, inputs, input_lengths, batch_tokens, desc, rank, world)

    storage = states.history.dtype
    if model.trained_layers:  # every token of every window and prompt
        rows = TokenRows(segment_len, sequences, model.prompt_item_id)
        window_start = rows.start[first_transition]
        window_tokens = rows.end[first_transition + lengths - 1] - window_start
        for table, first_row, count, batches in (
            (states.history, window_start, window_tokens, encode(seq, lengths, "Caching token states")),
            (states.alignment, rows.alignment_start, rows.alignment_end - rows.alignment_start,
             encode(prompts, torch.full_like(items, 2), "Caching alignment tokens")),
        ):
            for batch, hidden in batches:
                token = torch.arange(hidden.shape[1])
                real = token < count[batch, None]
                table[(first_row[batch, None] + token)[real]] = hidden[real].to(storage)
        return
    for batch, query_states in encode(seq, lengths, "Caching [Q] states"):  # one state per transition
        is_query = slots[: query_states.shape[1]] < lengths[batch, None]
        destination = first_transition[batch, None] + slots[: query_states.shape[1]]
        states.history[destination[is_query]] = query_states[is_query].to(storage)
    for batch, query_states in encode(prompts, torch.full_like(items, 2), "Caching alignment [Q]"):
        states.alignment[batch] = query_states[:, 1].to(storage)


@dataclass(frozen=True)
class CacheFiles:
    """A cache's files: the states table (raw rows), its record (layout and SHA-256 of the states,
    written last, so that its presence means a complete cache) and the builders' lock."""

    states: Path
    record: Path
    lock: Path

    @classmethod
    def named(cls, folder, name):
        folder = Path(folder)
        return cls(folder / f"{name}.states", folder / f"{name}.pt", folder / f"{name}.lock")


def load_or_compute(config, model, sequences: UserSequences) -> CachedStates:
    """The cached states for this exact backbone and input, computed once under a file lock.

    A damaged or unreadable cache (its checksums tell) is rebuilt with a warning. A folder that
    cannot be written is used as it is when it holds the cache; without one it is an error. The DDP
    ranks of a run on one machine build it together (:class:`BuildGroup`): rank 0 looks for it under
    the lock; if it must be built, every rank encodes its share of the batches into the one file.
    """
    dtype = cache_dtype(config["feature_cache_dtype"], model.device)
    storage = config["feature_cache_storage"]
    layout = StatesLayout.of(model, sequences, storage)
    key = _cache_key(model, sequences, dtype, storage)
    files = CacheFiles.named(config["feature_cache_dir"], f"{config['dataset']}-{key}")
    group = BuildGroup.of_run(config)

    def encode_share(temporary):
        pass_tokens = int(model.segment_len.cpu()[sequences.items].sum())
        frozen_pass = FrozenPass(model, dtype, compiled=compile_wanted(config["compile"], pass_tokens))
        write_states(model, sequences, layout.map(temporary, writable=True), config["feature_batch_tokens"], frozen_pass,
                     group.rank, group.size)

    if group.rank != 0:
        temporary = group.share(None)
        if temporary is not None:
            encode_share(temporary)
            group.barrier()  # every share is written
            group.barrier()  # rank 0 has stored the file and its record
        return layout.map(files.states)

    try:
        files.states.parent.mkdir(parents=True, exist_ok=True)
        lock = open(files.lock, "a+")
    except OSError as error:
        features = read_cache(files, layout)
        if features is None:
            folder = files.states.parent
            raise UserInputError(
                f"feature_cache_dir {folder} cannot be written ({error.strerror}) and holds no cache for this "
                "run: pass --feature_cache_dir=<a writable folder>, or --feature_cache=False"
            ) from None
        group.share(None)
        return features
    with lock, holding(lock, files):
        features = read_cache(files, layout)
        if features is not None:
            group.share(None)
            return features
        getLogger().info(set_color("feature cache", "green") + f": encoding {len(sequences.items)} items of "
                         f"{len(sequences.uid)} histories in {str(dtype).replace('torch.', '')}"
                         + (f" in {group.size} processes" if group.size > 1 else "")
                         + f", stored in {storage} ({human_size(layout.num_bytes)})")
        store_states(files, layout, encode_share, group)
        getLogger().info(set_color("feature cache", "green") + f": wrote {files.states}")
        return layout.map(files.states)


@contextmanager
def holding(lock, files: CacheFiles):
    """Hold the cache's lock (``lock``: its lock file, opened to append and read) and write this
    process's host and id into it; a lock held by another process is waited for, after one log line
    naming the cache and that process (a build can take minutes)."""
    descriptor = lock.fileno()
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(descriptor, 256, 0).decode(errors="replace").strip() or "another process"
        getLogger().info(set_color("feature cache", "green") + f": {holder} is building or checking "
                         f"{files.states}; waiting for it")
        fcntl.flock(descriptor, fcntl.LOCK_EX)
    with suppress(OSError):  # the name only informs waiters: a full disk must not stop the run here
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"process {os.getpid()} on {socket.gethostname()}".encode())
    try:
        yield
    finally:
        with suppress(OSError):
            os.ftruncate(descriptor, 0)  # a waiter never reads the name of a holder that has finished
        fcntl.flock(descriptor, fcntl.LOCK_UN)


def store_states(files: CacheFiles, layout: StatesLayout, fill, group: BuildGroup = SINGLE_PROCESS):
    """Write a cache: ``fill(path)`` writes the states into the file ``path`` (memory-mapped, see
    :meth:`StatesLayout.map`), which is written whole or not at all, then its record, last.

    The file gets its full size on the disk first, so a full disk is one error line here, not a
    crash in the middle of the pass. With a :class:`BuildGroup` of several ranks, rank 0 calls this
    and every other rank fills its share of the same file meanwhile (see :func:`load_or_compute`).
    """
    files.record.unlink(missing_ok=True)  # a damaged cache's record must not vouch for the new file
    with atomic_path(files.states, size=layout.num_bytes) as temporary:
        reserve_space(temporary, layout.num_bytes)
        group.share(str(temporary))
        fill(temporary)
        group.barrier()  # every share is written
        digest = file_sha256(temporary)
    save_checked({**asdict(layout), "format": CACHE_FORMAT, "states_sha256": digest}, files.record)
    group.barrier()


def read_cache(files: CacheFiles, layout: StatesLayout):
    """The states stored in ``files``, memory-mapped after their checksum is verified; ``None`` if
    there are none, or (with a warning) if they are damaged or incomplete."""
    try:
        record = load_checked(files.record)
        expected = {**asdict(layout), "format": CACHE_FORMAT}
        if {name: record.get(name) for name in expected} != expected:
            raise DamagedFileError(files.record, "it describes other states than this run's")
        size = files.states.stat().st_size if files.states.exists() else 0
        if size != layout.num_bytes:
            raise DamagedFileError(files.states, f"{size} bytes, not the {layout.num_bytes} of its record")
        if file_sha256(files.states) != record["states_sha256"]:
            raise DamagedFileError(files.states, "its contents do not match their checksum")
    except FileNotFoundError:
        if files.states.exists():
            getLogger().warning(f"feature cache {files.states} has no record {files.record.name} (an interrupted "
                                "build): it is rebuilt")
        return None
    except DamagedFileError as error:
        getLogger().warning(f"feature cache {error}: it is rebuilt")
        return None
    getLogger().info(set_color("feature cache", "green") + f": reusing {files.states}")
    return layout.map(files.states)
