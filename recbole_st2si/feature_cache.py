"""Efficient ILP tuning: run the frozen backbone once, then train the ILP on cached ``[Q]`` states.

With a frozen backbone in eval mode the hidden state at every ``[Q]`` is a fixed function of the
input, so ILP tuning is a softmax regression on features that can be computed once. The cache
encodes the windows of ``train_window: all`` (:mod:`recbole_st2si.data.windows`): each user's whole
history, test item included, tiled backwards into windows of at most ``MAX_ITEM_LIST_LENGTH`` items
and fewer than ``max_seq_tokens`` tokens. One pass over every item of every history gives the state
that predicts each of the user's items:

* the training features: every transition whose target is a training item,
* the validation feature: the state before the validation item,
* the test feature: the state before the test item (the last window is exactly the test input).

Every ``train_window`` then reads its transitions from these states: ``all`` exactly the windows the
uncached loader runs, ``random`` and ``full`` the same transitions as their uncached windows, each
state seen with the context of its tiled window (for histories that fit one window: the same
states). RecBole's evaluation loaders (full ranking, or sampled candidates such as ``uni19``) carry
each user's cached state, from which the ILP scores the candidates. The validation state sees the
test window up to the validation item, one item fewer than RecBole's validation input when the
history is longer than the window.

The pass runs in bfloat16 where the hardware computes it natively (``feature_cache_dtype: auto``),
about twice as fast on CPUs with AVX512-BF16 or AMX. The states are stored on disk under a key that
hashes the backbone's weights, both precisions and every model input (item tokens, histories,
prompt, limits), so a second run or a tuning trial reuses them and a cache built for another
backbone, dataset or text setting is never used.

A cache grows with the data (``H`` values per transition), so it is never held in memory whole:

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
"""

import fcntl
import hashlib
from dataclasses import asdict, dataclass
from logging import getLogger
from pathlib import Path

import torch
import torch.distributed as dist
from recbole.data.dataloader import FullSortEvalDataLoader, NegSampleEvalDataLoader
from recbole.data.dataloader.abstract_dataloader import AbstractDataLoader
from recbole.data.interaction import Interaction
from recbole.utils import set_color
from tqdm import tqdm

from recbole_st2si.data.windows import UserSequences, tile_windows
from recbole_st2si.errors import UserInputError
from recbole_st2si.model.st2si import QUERY_STATES
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

CACHE_FORMAT = 4
CACHE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass
class QueryFeatures:
    """Cached ``[Q]`` states.

    ``transitions`` holds, for every user of :class:`~recbole_st2si.data.windows.UserSequences` in
    turn, the state that predicts each item ``x_1 .. x_{N-1}`` of the user's history (see
    ``UserSequences.transition_index``); ``alignment[i - 1]`` is item ``i``'s alignment state.
    Both are rows of one table in the storage precision, usually a memory-mapped file.
    """

    transitions: torch.Tensor
    alignment: torch.Tensor


@dataclass(frozen=True)
class StatesLayout:
    """The shape and storage precision of a cache's states table: transitions rows, then alignment rows."""

    transitions: int
    alignment: int
    hidden: int
    storage: str

    @classmethod
    def of(cls, model, sequences: UserSequences, storage):
        return cls(int((sequences.lengths - 1).sum()), model.n_items - 1, model.ilp.in_features, storage)

    @property
    def values(self):
        return (self.transitions + self.alignment) * self.hidden

    @property
    def num_bytes(self):
        return self.values * CACHE_DTYPES[self.storage].itemsize

    def map(self, path, writable=False) -> QueryFeatures:
        """The states of the file ``path``, memory-mapped: its pages are read when used, and the
        kernel can drop them again, so a cache larger than memory still trains. ``writable`` maps
        it shared, so that what is written reaches the file (and the other processes mapping it);
        otherwise it is mapped copy-on-write and the file is only read."""
        states = torch.from_file(str(path), shared=writable, size=self.values, dtype=CACHE_DTYPES[self.storage])
        states = states.view(self.transitions + self.alignment, self.hidden)
        return QueryFeatures(transitions=states[: self.transitions], alignment=states[self.transitions :])


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


def cpu_has_native_bf16():
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX), read from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return any(flag in flags for flag in NATIVE_BF16_CPU_FLAGS)


def cache_dtype(setting, device):
    """The precision of the frozen pass: ``auto`` is bfloat16 where the hardware has it natively."""
    if setting == "auto":
        native = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_native_bf16()
        return torch.bfloat16 if native else torch.float32
    return CACHE_DTYPES[setting]


def _cache_key(model, sequences: UserSequences, dtype, storage):
    digest = hashlib.sha256(f"st2si-query-features-v{CACHE_FORMAT}".encode())
    digest.update(frozen_weights_digest(model).encode())
    inputs = [model.segment_tokens, model.segment_len, sequences.items, sequences.offsets, sequences.num_train,
              sequences.valid_position, sequences.test_position]
    for tensor in inputs:
        digest.update(tensor.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digest.update(f"{model.max_seq_length}/{model.max_seq_tokens}/{model.n_items}/{dtype}/{storage}".encode())
    return digest.hexdigest()[:32]


@torch.inference_mode()
def encoded_batches(model, seq, seq_len, batch_size, dtype, desc, rank=0, world=1):
    """Yield ``(rows, states)``: the ``[Q]`` states ``[B, width, H]`` (float32) of batches of sequences.

    Batches hold sequences of similar token counts, so little compute goes to padding. Of ``world``
    processes, rank ``r`` encodes batches ``r, r + world, ...``: every batch holds the same sequences
    as in one process, so each state is computed exactly as there."""
    order = torch.argsort(model.segment_len.cpu()[seq].sum(1))
    device = model.device
    starts = range(rank * batch_size, len(seq), world * batch_size)
    for start in tqdm(starts, desc=desc, ncols=100, disable=rank != 0):
        rows = order[start : start + batch_size]
        width = int(seq_len[rows].max())
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            states, _ = model.query_states(seq[rows, :width].to(device), seq_len[rows].to(device))
        yield rows, states.float().cpu()


def write_query_features(model, sequences: UserSequences, features: QueryFeatures, batch_size, dtype, rank=0, world=1):
    """Run the frozen backbone over the tiled windows of every history and the alignment prompts
    (rank ``rank`` of ``world`` processes: its share, see :func:`encoded_batches`), and write the
    states, rounded to their storage precision, into ``features``."""
    model.eval()
    users, starts, ends = tile_windows(sequences, model.segment_len.cpu(), model.max_seq_length, model.max_seq_tokens)
    lengths = ends - starts
    slots = torch.arange(int(lengths.max()) if len(lengths) else 1)
    first_item = sequences.offsets[users] + starts
    seq = sequences.items[(first_item[:, None] + slots).clamp(max=len(sequences.items) - 1)] * (slots < lengths[:, None])
    first_transition = sequences.transition_index(users, starts + 1)

    storage = features.transitions.dtype
    for rows, states in encoded_batches(model, seq, lengths, batch_size, dtype, "Caching [Q] states", rank, world):
        is_query = slots[: states.shape[1]] < lengths[rows, None]
        destination = first_transition[rows, None] + slots[: states.shape[1]]
        features.transitions[destination[is_query]] = states[is_query].to(storage)

    items = torch.arange(1, model.n_items)  # always cached, so runs with and without ID alignment share the file
    prompts = torch.stack([torch.full_like(items, model.prompt_item_id), items], dim=1)
    for rows, states in encoded_batches(model, prompts, torch.full_like(items, 2), batch_size, dtype,
                                         "Caching alignment [Q]", rank, world):
        features.alignment[rows] = states[:, 1].to(storage)


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


def load_or_compute(config, model, sequences: UserSequences) -> QueryFeatures:
    """The cached features for this exact backbone and input, computed once under a file lock.

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
        features = layout.map(temporary, writable=True)
        write_query_features(model, sequences, features, config["feature_batch_size"], dtype, group.rank, group.size)

    if group.rank != 0:
        temporary = group.share(None)
        if temporary is not None:
            encode_share(temporary)
            group.barrier()  # every share is written
            group.barrier()  # rank 0 has stored the file and its record
        return layout.map(files.states)

    try:
        files.states.parent.mkdir(parents=True, exist_ok=True)
        lock = open(files.lock, "a")
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
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent trials wait for one builder
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
    """The features stored in ``files``, memory-mapped after their checksum is verified; ``None`` if
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


class CachedQueryTrainDataLoader(AbstractDataLoader):
    """Batches of cached ``[Q]`` states: the same samples (windows and alignment items) per batch as
    :class:`~recbole_st2si.data.dataloader.ST2SITrainDataLoader`, with every transition of a window
    in the batch (without multi-query: its last)."""

    def __init__(self, config, dataset, features: QueryFeatures, windows, shuffle=True):
        self.features, self.windows = features, windows
        self.multi_query = config["multi_query"]
        self.num_window_samples = len(windows)
        self.sample_size = len(windows) + (dataset.item_num - 1 if config["id_alignment"] else 0)
        super().__init__(config, dataset, None, shuffle=shuffle)
        self.window_generator = torch.Generator().manual_seed(config["seed"])

    def _init_batch_size_and_step(self):
        self.step = self.config["train_batch_size"]
        self.set_batch_size(self.step)

    def collate_fn(self, index):
        index = torch.as_tensor(index, dtype=torch.long)
        is_window = index < self.num_window_samples
        users, starts, targets = self.windows.windows(index[is_window], self.window_generator)
        first = starts + 1 if self.multi_query else targets
        sizes = targets - first + 1
        sequences = self.windows.sequences
        first_row = sequences.transition_index(users, first)
        rows = torch.repeat_interleave(first_row - sizes.cumsum(0) + sizes, sizes) + torch.arange(int(sizes.sum()))
        row_users = torch.repeat_interleave(users, sizes)
        items = index[~is_window] - self.num_window_samples + 1
        states = torch.cat([self.features.transitions[rows], self.features.alignment[items - 1]])
        return Interaction({
            QUERY_STATES: states.float(),  # stored in 16 bits: only the batch's rows are converted
            self._dataset.iid_field: torch.cat([sequences.transition_items(rows, row_users), items]),
        })


class _CachedQueryFeatureMixin:
    """Adds each row's user's cached ``[Q]`` state to the batches of a RecBole evaluation loader."""

    def __init__(self, config, dataset, sampler, features_by_user):
        self.features_by_user = features_by_user
        super().__init__(config, dataset, sampler, shuffle=False)

    def collate_fn(self, index):
        interaction, *positions = super().collate_fn(index)
        users = interaction[self._dataset.uid_field]
        interaction.update(Interaction({QUERY_STATES: self.features_by_user[users]}))
        return (interaction, *positions)


class CachedQueryEvalDataLoader(_CachedQueryFeatureMixin, FullSortEvalDataLoader):
    """RecBole's full-sort evaluation, with each user's cached ``[Q]`` state added to the batch."""


class CachedQueryNegSampleEvalDataLoader(_CachedQueryFeatureMixin, NegSampleEvalDataLoader):
    """RecBole's sampled evaluation (e.g. ``uni19``): every candidate row carries its user's cached state."""


def _held_out_states(features, sequences: UserSequences, positions, user_num):
    """``[user_num, H]``: by user id, the cached state that predicts the held-out item at ``positions``."""
    by_user = torch.zeros(user_num, features.transitions.shape[1])
    users = torch.nonzero(positions >= 0).squeeze(1)
    rows = sequences.transition_index(users, positions[users])
    by_user[sequences.uid[users]] = features.transitions[rows].float()
    return by_user


class QueryFeatureCache:
    """The cached ``[Q]`` states of one run, and the cached twins of its dataloaders.

    Built from the multi-query training loader, whose windows span each user's whole history (see
    :func:`~recbole_st2si.data.dataloader.training_windows`); an evaluation loader gets its held-out
    states by its dataset (validation or test).
    """

    def __init__(self, config, model, train_data):
        self.config = config
        self.windows = train_data.windows
        sequences = self.windows.sequences
        self.features = load_or_compute(config, model, sequences)
        user_num = train_data.dataset.user_num
        valid_dataset, test_dataset = train_data.held_out_datasets
        self.states_by_dataset = {
            id(valid_dataset): _held_out_states(self.features, sequences, sequences.valid_position, user_num),
            id(test_dataset): _held_out_states(self.features, sequences, sequences.test_position, user_num),
        }

    def train_loader(self, train_data):
        return CachedQueryTrainDataLoader(
            self.config, train_data.dataset, self.features, self.windows, shuffle=self.config["shuffle"]
        )

    def eval_loader(self, loader):
        """The cached twin of a RecBole evaluation loader (same protocol, same sampler); the loader
        itself if it is cached already or evaluates another dataset."""
        states = self.states_by_dataset.get(id(loader.dataset))
        if isinstance(loader, _CachedQueryFeatureMixin) or states is None:
            return loader
        if isinstance(loader, FullSortEvalDataLoader):
            return CachedQueryEvalDataLoader(self.config, loader.dataset, loader._sampler, states)
        return CachedQueryNegSampleEvalDataLoader(self.config, loader.dataset, loader._sampler, states)
