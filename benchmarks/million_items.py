"""A catalogue of a million items: one ILP training step and a top-10 over all items, chunked and not.

    python benchmarks/million_items.py --items 1000000 --users 3000 --memory_limit_gib 16

Generates a synthetic dataset (short random titles, users with random histories) under a temporary
folder, never a committed file; loads it through RecBole as ST2SI's dataset (``train_stage: ilp``,
the frozen embedded backbone, so the ILP is ``576 x items``), and then, with ``ilp_chunk_size``
first set and then unset (``0``):

* the loss and gradient of one training step with multi-query input: ``--batch_users`` histories
  of ``--history_length`` items through the frozen backbone, the loss at every ``[Q]``, and its
  backward pass to the ILP (the optimizer's step is left out: AdamW's two state tensors add
  ``2 x 4 bytes x hidden x items``, 4.6 GB at a million items, chunked or not);
* a top-10 over every item for the batch's users.

Peak memory is the peak resident memory of the process during each phase (sampled every 5 ms),
weights included. ``--memory_limit_gib`` caps the process's address space, so that a phase that
needs more fails with an out-of-memory error here instead of starving the machine.
"""

import argparse
import random
import resource
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from recbole_st2si.errors import UserInputError
from recbole_st2si.model import ST2SI
from recbole_st2si.utils import create_config, create_dataset

WORDS = 2000


def generate(folder, items, users, seed=0):
    """Write ``synthetic.item`` (ids 1..items, titles of 2 to 4 random words) and ``synthetic.inter``
    (each user 20 to 60 random items, in time order) into ``folder/synthetic``; returns the name."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "de", "vu", "sha", "gen", "tor", "mel"]
    vocabulary = ["".join(rng.choices(syllables, k=rng.randint(2, 3))) for _ in range(WORDS)]
    target = Path(folder) / "synthetic"
    target.mkdir(parents=True)
    with open(target / "synthetic.item", "w") as file:
        file.write("item_id:token\ttitle:token_seq\n")
        for item in range(1, items + 1):
            file.write(f"{item}\t{' '.join(rng.choices(vocabulary, k=rng.randint(2, 4)))}\n")
    with open(target / "synthetic.inter", "w") as file:
        file.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for user in range(1, users + 1):
            for step in range(rng.randint(20, 60)):
                file.write(f"{user}\t{rng.randint(1, items)}\t{step}\n")
    return "synthetic"


class PeakMemory:
    """Peak resident memory (GiB) of this process while the ``with`` block runs."""

    def __enter__(self):
        self.process, self.peak, self.running = psutil.Process(), 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        self.start = time.perf_counter()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc_info):
        self.seconds = time.perf_counter() - self.start
        self.running = False
        self.thread.join()
        self.peak_gib = max(self.peak, self.process.memory_info().rss) / 2**30
        return False


def batch_of_histories(dataset, users, length):
    """``[users, length]`` item lists: the first ``users`` users' most recent items (internal ids)."""
    user_ids = torch.as_tensor(dataset.inter_feat[dataset.uid_field].to_numpy())
    item_ids = torch.as_tensor(dataset.inter_feat[dataset.iid_field].to_numpy())
    rows = [item_ids[user_ids == user][-length:] for user in range(1, users + 1)]
    seq = torch.zeros(users, length, dtype=torch.long)
    for row, items in enumerate(rows):
        seq[row, : len(items)] = items
    return seq, torch.tensor([len(items) for items in rows])


def phase(name, chunk_size, action):
    try:
        with PeakMemory() as memory:
            action()
        outcome = f"{memory.seconds:.1f} s, peak {memory.peak_gib:.2f} GiB"
    except (RuntimeError, MemoryError) as error:
        outcome = f"failed after {memory.seconds:.1f} s ({str(error).splitlines()[0][:80]})"
    print(f"| {name} | {chunk_size or 'all items'} | {outcome} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--batch_users", type=int, default=16, help="histories in the training step (train_batch_size)")
    parser.add_argument("--history_length", type=int, default=50)
    parser.add_argument("--chunk_size", type=int, default=65536)
    parser.add_argument("--llm_path", default="embedded")
    parser.add_argument("--memory_limit_gib", type=float, default=16)
    args = parser.parse_args()
    limit = int(args.memory_limit_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    with tempfile.TemporaryDirectory() as folder:
        with PeakMemory() as memory:
            name = generate(folder, args.items, args.users)
        print(f"generated {args.items:,} items and {args.users:,} users in {memory.seconds:.1f} s")
        with PeakMemory() as memory:
            settings = {"data_path": folder, "llm_path": args.llm_path, "train_stage": "ilp", "text_fields": ["title"],
                        "MAX_ITEM_LIST_LENGTH": args.history_length, "show_progress": False}
            config = create_config("ST2SI", name, config_dict=settings)
            dataset = create_dataset(config)
            model = ST2SI(config, dataset)
        print(f"dataset and model ({model.n_items - 1:,} items, ILP {tuple(model.ilp.weight.shape)}): "
              f"{memory.seconds:.1f} s, peak {memory.peak_gib:.2f} GiB")
        seq, seq_len = batch_of_histories(dataset, args.batch_users, args.history_length)
        target = seq[torch.arange(len(seq)), seq_len - 1]
        seq[torch.arange(len(seq)), seq_len - 1], seq_len = 0, seq_len - 1
        interaction = {model.ITEM_SEQ: seq, model.ITEM_SEQ_LEN: seq_len, model.POS_ITEM_ID: target}
        model.train()

        def loss_and_gradient():
            model.ilp.weight.grad = None
            model.calculate_loss(interaction).backward()

        def top_10():
            with torch.no_grad():
                model.top_items(model(seq, seq_len), 10)

        print(f"\n{int(seq_len.sum()):,} queries per step ({args.batch_users} histories)\n")
        print("| phase | ilp_chunk_size | time and peak memory |\n|---|---|---|")
        for chunk_size in (args.chunk_size, 0):
            model.ilp_chunk_size = chunk_size or None
            phase("loss and ILP gradient (frozen backbone, multi-query)", chunk_size, loss_and_gradient)
            model.ilp.weight.grad = None
            phase(f"top-10 over all items ({args.batch_users} users)", chunk_size, top_10)


if __name__ == "__main__":
    try:
        main()
    except UserInputError as error:
        raise SystemExit(f"error: {error}")
