"""The multi-query training dataloader: one window per sample, plus ID-alignment samples."""

import math

import torch
from recbole.data.dataloader.abstract_dataloader import AbstractDataLoader
from recbole.data.interaction import Interaction

from recbole_st2si.data.windows import TrainingWindows, user_sequences


def training_windows(config, dataset, held_out_datasets):
    """The :class:`TrainingWindows` of ``train_window`` over the users' histories; the validation and
    test rows complete each history, so that the windows of ``all`` end at the test item."""
    sequences = user_sequences(dataset, *held_out_datasets)
    return TrainingWindows(
        config["train_window"],
        sequences,
        segment_len=dataset.item_token_len + 1,
        max_items=config["MAX_ITEM_LIST_LENGTH"],
        max_tokens=config["max_seq_tokens"],
    )


class LengthBucketedBatches:
    """Training batches of samples with similar token counts, so that little compute goes to padding
    (a batch of random windows is as long as its longest: on Amazon texts several times the average).

    Each epoch the samples are shuffled with the loader's generator, cut into chunks of
    ``BUCKET_BATCHES`` batches, sorted by token count within a chunk and split into batches, whose
    order is shuffled again; a loader that does not shuffle (evaluation) sorts all its samples. A
    loader sets ``sample_tokens`` before this class's ``__init__`` runs (``None``: plain shuffling, for
    samples whose length is drawn per epoch). In a distributed run every rank builds the same batches
    and takes every ``world_size``-th; the samples of a last, incomplete round are split among the
    ranks, so that every rank runs as many batches and no sample twice.
    """

    BUCKET_BATCHES = 32

    def bucketed_batches(self):
        tokens = self.sample_tokens
        order = torch.randperm(len(tokens), generator=self.generator) if self.shuffle else torch.arange(len(tokens))
        batches = []
        for chunk in order.split(self.step * self.BUCKET_BATCHES if self.shuffle else max(len(order), 1)):
            batches += chunk[torch.argsort(tokens[chunk], stable=True)].split(self.step)
        if self.shuffle:
            batches = [batches[index] for index in torch.randperm(len(batches), generator=self.generator)]
        if not self.config["single_spec"]:  # the last round's samples split among the ranks: disjoint, as many batches
            world, rank = self.config["world_size"], torch.distributed.get_rank()
            whole_rounds = len(batches) - len(batches) % world
            if whole_rounds < len(batches):
                batches = batches[:whole_rounds] + list(torch.cat(batches[whole_rounds:]).tensor_split(world))
            batches = batches[rank::world]
        return batches

    def __iter__(self):
        if self.sample_tokens is None:
            return super().__iter__()
        return (self.collate_fn(batch.tolist()) for batch in self.bucketed_batches())

    def __len__(self):
        if self.sample_tokens is None:
            return super().__len__()
        batches = math.ceil(self.sample_size / self.step)
        return batches if self.config["single_spec"] else math.ceil(batches / self.config["world_size"])


class ST2SITrainDataLoader(LengthBucketedBatches, AbstractDataLoader):
    """Emits windows of the users' histories (see :mod:`recbole_st2si.data.windows`) instead of
    RecBole's one row per prefix.

    RecBole's sequential training set holds, for every user, one row per training target with the (at
    most ``MAX_ITEM_LIST_LENGTH``) items before it. ST2SI puts a query after *every* item, so a window
    ``x_s .. x_{t-1} -> x_t`` is the row of target ``t`` without its items before ``x_s``.

    With ``id_alignment: true`` every item also appears once per epoch as an alignment sample
    ``alignment_prompt + item text + [Q] -> item``, encoded as the two-item sequence
    ``[prompt_item_id, item]`` (the model keeps the prompt's tokens at ``prompt_item_id``, one past
    the last real item). Both kinds are shuffled together into the same batches.
    """

    def __init__(self, config, dataset, sampler=None, shuffle=True, held_out_datasets=()):
        self.held_out_datasets = tuple(held_out_datasets)  # validation and test: the rest of each history
        self.windows = training_windows(config, dataset, held_out_datasets)
        self.windows.log_coverage(config["multi_query"])
        self.item_seq = dataset.inter_feat[dataset.item_id_list_field]
        self.item_seq_len = dataset.inter_feat[dataset.item_list_length_field]
        self.target = dataset.inter_feat[dataset.iid_field]
        self.num_user_samples = len(self.windows)
        self.num_alignment_samples = dataset.item_num - 1 if config["id_alignment"] else 0
        self.prompt_item_id = dataset.item_num
        self.sample_size = self.num_user_samples + self.num_alignment_samples
        self.sample_tokens = self.count_sample_tokens(dataset)
        super().__init__(config, dataset, sampler, shuffle=shuffle)
        self.window_generator = torch.Generator().manual_seed(config["seed"])

    def _init_batch_size_and_step(self):
        batch_size = self.config["train_batch_size"]
        self.step = batch_size
        self.set_batch_size(batch_size)

    def count_sample_tokens(self, dataset):
        """Each sample's tokens: a fixed window's items (``train_window: all``), or an alignment prompt's."""
        if self.windows.mode != "all":
            return None
        users, starts, targets = self.windows.fixed
        segment_len = dataset.item_token_len + 1
        sequences = self.windows.sequences
        prefix = torch.cat([torch.zeros(1, dtype=torch.long), segment_len[sequences.items].cumsum(0)])
        first = sequences.offsets[users] + starts
        windows = prefix[first + targets - starts] - prefix[first]
        prompts = dataset.alignment_prompt_len + segment_len[1 : 1 + self.num_alignment_samples]
        return torch.cat([windows, prompts])

    def collate_fn(self, index):
        index = torch.as_tensor(index, dtype=torch.long)
        is_user = index < self.num_user_samples
        user_part = self._window_samples(index[is_user])
        alignment_part = self._alignment_samples(index[~is_user] - self.num_user_samples + 1)
        return Interaction({key: torch.cat([user_part[key], alignment_part[key]]) for key in user_part})

    def _window_samples(self, index):
        """The row of each window's target, without the items before the window's start."""
        users, starts, targets = self.windows.windows(index, self.window_generator)
        row = self.windows.sequences.train_row[users] + targets - 1
        row_first_item = (targets - self.item_seq.shape[1]).clamp(min=0)
        drop = starts - row_first_item
        seq, seq_len = self.item_seq[row], self.item_seq_len[row]
        width = seq.shape[1]
        shifted = drop[:, None] + torch.arange(width)
        seq = seq.gather(1, shifted.clamp(max=width - 1)) * (shifted < seq_len[:, None])
        return self._samples(seq, seq_len - drop, self.target[row])

    def _alignment_samples(self, items):
        seq = torch.zeros(len(items), self.item_seq.shape[1], dtype=torch.long)
        seq[:, 0] = self.prompt_item_id
        seq[:, 1] = items
        return self._samples(seq, torch.full_like(items, 2), items)

    def _samples(self, seq, seq_len, target):
        dataset = self._dataset
        return {
            dataset.item_id_list_field: seq,
            dataset.item_list_length_field: seq_len,
            dataset.iid_field: target,
        }
