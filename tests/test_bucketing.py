"""Training batches of similar token counts (LengthBucketedBatches): every sample once per epoch,
little padding, and the same number of disjoint batches on every rank of a distributed run."""

import random

import torch

from recbole_st2si.data import dataloader
from recbole_st2si.data.dataloader import LengthBucketedBatches
from recbole_st2si.feature_cache import token_budget_batches


class Samples(LengthBucketedBatches):
    """The mixin over a stand-in loader whose batches are the samples' indices."""

    def __init__(self, tokens, step, single_spec=True, world_size=1):
        self.sample_tokens, self.sample_size, self.step, self.shuffle = tokens, len(tokens), step, True
        self.config = {"single_spec": single_spec, "world_size": world_size}
        self.generator = torch.Generator().manual_seed(0)

    def collate_fn(self, index):
        return index


def padded_tokens(tokens, batches):
    """Tokens a batch costs when padded to its longest sample, summed over the batches."""
    return sum(max(tokens[i] for i in batch) * len(batch) for batch in batches)


def test_every_sample_once_per_epoch_with_little_padding():
    lengths = random.Random(7).choices(range(10, 1001), k=1000)
    loader = Samples(torch.tensor(lengths), step=16)
    for _ in range(2):  # two epochs, two orders
        batches = list(loader)
        assert len(batches) == len(loader) == 63
        assert sorted(index for batch in batches for index in batch) == list(range(1000))
        shuffled = list(range(1000))
        random.Random(1).shuffle(shuffled)
        plain = [shuffled[start : start + 16] for start in range(0, 1000, 16)]
        assert padded_tokens(lengths, batches) < 0.6 * padded_tokens(lengths, plain)
        assert padded_tokens(lengths, batches) < 1.1 * sum(lengths)


def test_distributed_ranks_get_as_many_batches_and_all_samples(monkeypatch):
    lengths = torch.arange(1, 101)
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setattr(dataloader.torch.distributed, "get_rank", lambda: rank)
        loader = Samples(lengths, step=8, single_spec=False, world_size=2)
        per_rank.append(list(loader))
        assert len(per_rank[-1]) == len(loader) == 7
    seen = [index for batches in per_rank for batch in batches for index in batch]
    assert sorted(seen) == list(range(100))  # every sample once: disjoint ranks


def test_frozen_pass_batches_fill_a_token_budget():
    lengths = torch.tensor(random.Random(3).choices(range(5, 400), k=300) + [900])  # one longer than the budget
    batches = token_budget_batches(lengths, budget=800)
    assert sorted(torch.cat(batches).tolist()) == list(range(301))
    for batch in batches:
        padded = len(batch) * int(lengths[batch].max())
        assert padded <= 800 or len(batch) == 1
    sizes = [len(batch) for batch in batches]
    assert sizes[0] > 20 and sizes[-1] == 1  # short histories many at a time, the longest alone
