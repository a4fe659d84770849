"""A feature cache of millions of transitions: its size on disk, and the memory an ILP epoch on it takes.

    python benchmarks/feature_cache_memory.py --million_transitions=4

Writes a synthetic cache through the cache's own writer (``feature_cache.store_states``: the
states file memory-mapped, its space reserved first, its SHA-256 in a record written last): users
with ``--history_length`` items each (50 training items, the validation and the test item), one
random bfloat16 ``[Q]`` state of width ``--hidden`` (576, as the embedded SmolLM2-135M) per
transition. Then it drops the file's pages from the page cache (``posix_fadvise``, this file only),
loads it with the cache's reader (``feature_cache.read_cache``: the SHA-256 verified in chunks, the
file memory-mapped) and trains the ILP (``--items`` items) for one epoch through the cached training
loader (``CachedQueryTrainDataLoader``, ``train_window: all``) and ST2SI's own ``calculate_loss``.

Prints the file's size per million transitions, the time of each phase and, against the file's
size, the process's anonymous memory (RssAnon: heap, what cannot be evicted) at its highest after
each batch, its mapped file pages (RssFile) and the peak resident memory (VmHWM, both together).
The synthetic cache lives in a temporary folder under ``--folder``, removed at the end, also on error.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from recbole_st2si.data.windows import TrainingWindows, UserSequences
from recbole_st2si.data.cached_dataloader import CachedQueryTrainDataLoader
from recbole_st2si.feature_cache import (
    CacheFiles,
    StatesLayout,
    read_cache,
    store_states,
)
from recbole_st2si.model import ST2SI
from recbole_st2si.utils import create_config

TOKENS_PER_ITEM = 12  # an item's text and its [Q]: 50 items stay below max_seq_tokens (1024)
GB = 1e9


def memory_status():
    """This process's RssAnon, RssFile and VmHWM in bytes, from /proc/self/status."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("RssAnon", "RssFile", "VmHWM"):
            values[name] = int(rest.split()[0]) * 1024
    return values


def synthetic_sequences(users, history_length, items, seed):
    """``users`` histories of ``history_length`` random items; the last two are held out."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.full((users,), history_length)
    return UserSequences(
        items=torch.randint(1, items, (users * history_length,), generator=generator),
        offsets=torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
        uid=torch.arange(1, users + 1),
        num_train=lengths - 2,
        train_row=torch.arange(users) * (history_length - 3),
        valid_position=lengths - 2,
        test_position=lengths - 1,
    )


class CachedILP(torch.nn.Module):
    """What trains on a cache: ST2SI's ILP and its loss (ST2SI's own methods), without the backbone."""

    POS_ITEM_ID = "item_id"
    ilp_loss = ST2SI.ilp_loss
    item_logits = ST2SI.item_logits
    calculate_loss = ST2SI.calculate_loss

    def __init__(self, hidden, items, chunk_size):
        super().__init__()
        self.ilp = torch.nn.Linear(hidden, items, bias=False)
        self.n_items, self.ilp_chunk_size = items, chunk_size


def write_random_states(layout, seed):
    """``fill`` for ``store_states``: random normal states, written into the mapped file in chunks."""
    generator = torch.Generator().manual_seed(seed)

    def fill(path):
        features = layout.map(path, writable=True)
        for table in (features.history, features.alignment):
            for rows in table.split(65536):
                rows.copy_(torch.randn(rows.shape, generator=generator))

    return fill


def drop_from_page_cache(path):
    """Evict this file's (clean) pages, so that loading and the epoch read it from the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)


def timed(action):
    start = time.perf_counter()
    result = action()
    return time.perf_counter() - start, result


def run_config(folder, train_batch_size):
    """ST2SI's settings for the training loader; the dataset is synthetic, so its file is a header."""
    Path(folder, "synthetic").mkdir()
    Path(folder, "synthetic", "synthetic.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n")
    return create_config("ST2SI", "synthetic", config_dict={
        "data_path": folder, "train_batch_size": train_batch_size, "id_alignment": False, "show_progress": False})


def train_one_epoch(config, features, sequences, items, hidden):
    """One epoch of the ILP on the cached states; returns its batches, transitions and highest RssAnon."""
    windows = TrainingWindows("all", sequences, torch.full((items,), TOKENS_PER_ITEM), 50, 1024)
    loader = CachedQueryTrainDataLoader(config, SimpleNamespace(item_num=items, iid_field="item_id"), features, windows)
    model = CachedILP(hidden, items, config["ilp_chunk_size"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = transitions = highest_anon = 0
    for interaction in loader:
        optimizer.zero_grad()
        model.calculate_loss(interaction).backward()
        optimizer.step()
        batches += 1
        transitions += len(interaction)
        highest_anon = max(highest_anon, memory_status()["RssAnon"])
    return batches, transitions, highest_anon


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--million_transitions", type=float, default=4.0)
    parser.add_argument("--hidden", type=int, default=576, help="state width (576: SmolLM2-135M)")
    parser.add_argument("--items", type=int, default=1000, help="catalogue size (the ILP's rows)")
    parser.add_argument("--history_length", type=int, default=52)
    parser.add_argument("--train_batch_size", type=int, default=64, help="windows per batch")
    parser.add_argument("--folder", default=tempfile.gettempdir(), help="where the temporary cache is written")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    users = round(args.million_transitions * 1e6 / (args.history_length - 1))
    sequences = synthetic_sequences(users, args.history_length, args.items, args.seed)
    layout = StatesLayout(int((sequences.lengths - 1).sum()), args.items - 1, args.hidden, "bf16", trained_layers=0)
    start = memory_status()
    with tempfile.TemporaryDirectory(dir=args.folder, prefix="feature_cache_memory-") as folder:
        config = run_config(folder, args.train_batch_size)
        files = CacheFiles.named(folder, "synthetic")
        write_seconds, _ = timed(lambda: store_states(files, layout, write_random_states(layout, args.seed)))
        size = files.states.stat().st_size
        drop_from_page_cache(files.states)
        before_load = memory_status()
        load_seconds, features = timed(lambda: read_cache(files, layout))
        epoch_seconds, (batches, transitions, highest_anon) = timed(
            lambda: train_one_epoch(config, features, sequences, args.items, args.hidden))
        end = memory_status()
        del features  # unmapped, so that removing the folder frees the disk space now

    per_million = size / (layout.history / 1e6)
    print(f"\n{layout.history:,} transitions of {users:,} users, {args.items - 1:,} alignment rows, "
          f"H={args.hidden}, bfloat16")
    print("| measure | value |")
    print("|---|---|")
    print(f"| states file | {size / GB:.2f} GB ({size:,} bytes) |")
    print(f"| size per million transitions | {per_million / GB:.3f} GB ({per_million / 1e6 / args.hidden:.2f} "
          f"bytes per value) |")
    print(f"| write (store_states: reserve, fill, fsync, SHA-256, record) | {write_seconds:.1f} s |")
    print(f"| load from the disk (read_cache: SHA-256 in chunks, map) | {load_seconds:.1f} s |")
    print(f"| one ILP epoch ({batches:,} batches, {transitions:,} transitions, {args.items:,} items) | "
          f"{epoch_seconds:.1f} s |")
    print(f"| RssAnon at start / before loading / highest in the epoch | {start['RssAnon'] / GB:.2f} / "
          f"{before_load['RssAnon'] / GB:.2f} / {highest_anon / GB:.2f} GB |")
    print(f"| RssAnon growth from loading to the epoch's highest, against the file | "
          f"{(highest_anon - before_load['RssAnon']) / GB:.2f} GB of {size / GB:.2f} GB "
          f"({100 * (highest_anon - before_load['RssAnon']) / size:.1f}%) |")
    print(f"| RssFile before loading / after the epoch (libraries, then also the file's pages: evictable) | "
          f"{before_load['RssFile'] / GB:.2f} / {end['RssFile'] / GB:.2f} GB |")
    print(f"| VmHWM (peak resident, file pages included) | {end['VmHWM'] / GB:.2f} GB |")


if __name__ == "__main__":
    main()
