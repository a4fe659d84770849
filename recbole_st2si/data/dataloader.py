"""The multi-query training dataloader: one sample per user sequence, plus ID-alignment samples."""

import torch
from recbole.data.dataloader.abstract_dataloader import AbstractDataLoader
from recbole.data.interaction import Interaction


class ST2SITrainDataLoader(AbstractDataLoader):
    """Emits one sample per user per epoch instead of RecBole's one row per prefix.

    RecBole's sequential training set holds, for every user, one row per training target with the
    (at most ``MAX_ITEM_LIST_LENGTH``) items before it. ST2SI puts a query after *every* item, so
    the row with the user's last training target already carries all of the user's transitions:

    * ``train_window: full`` uses that row;
    * ``train_window: random`` (the authors' augmentation) draws, each epoch, a random target row of
      the user and a random start inside its history, so the model sees different sub-sequences.

    With ``id_alignment: true`` every item also appears once per epoch as an alignment sample
    ``alignment_prompt + item text + [Q] -> item``, encoded as the two-item sequence
    ``[prompt_item_id, item]`` (the model keeps the prompt's tokens at ``prompt_item_id``, one past
    the last real item). Both kinds are shuffled together into the same batches.
    """

    def __init__(self, config, dataset, sampler=None, shuffle=True):
        uid = dataset.inter_feat[dataset.uid_field]
        _, rows_per_user = torch.unique_consecutive(uid, return_counts=True)
        self.user_row_end = rows_per_user.cumsum(0)
        self.user_row_count = rows_per_user
        self.item_seq = dataset.inter_feat[dataset.item_id_list_field]
        self.item_seq_len = dataset.inter_feat[dataset.item_list_length_field]
        self.target = dataset.inter_feat[dataset.iid_field]
        self.random_window = config["train_window"] == "random"
        self.num_user_samples = len(rows_per_user)
        self.num_alignment_samples = dataset.item_num - 1 if config["id_alignment"] else 0
        self.prompt_item_id = dataset.item_num
        self.sample_size = self.num_user_samples + self.num_alignment_samples
        self._check_sorted(uid)
        super().__init__(config, dataset, sampler, shuffle=shuffle)
        self.window_generator = torch.Generator().manual_seed(config["seed"])

    @staticmethod
    def _check_sorted(uid):
        # RecBole's data augmentation sorts by (user, time); consecutive rows of a user are required here.
        if len(torch.unique_consecutive(uid)) != len(torch.unique(uid)):
            raise ValueError("training rows must be grouped by user (RecBole's sequential augmentation sorts them)")

    def _init_batch_size_and_step(self):
        batch_size = self.config["train_batch_size"]
        self.step = batch_size
        self.set_batch_size(batch_size)

    def collate_fn(self, index):
        index = torch.as_tensor(index, dtype=torch.long)
        is_user = index < self.num_user_samples
        user_part = self._user_samples(index[is_user])
        alignment_part = self._alignment_samples(index[~is_user] - self.num_user_samples + 1)
        return Interaction({key: torch.cat([user_part[key], alignment_part[key]]) for key in user_part})

    def _user_samples(self, users):
        last_row = self.user_row_end[users] - 1
        if not self.random_window:
            return self._rows(last_row, start=torch.zeros_like(last_row))
        count = self.user_row_count[users]
        row = last_row - (torch.rand(len(users), generator=self.window_generator) * count).long()
        start = (torch.rand(len(users), generator=self.window_generator) * self.item_seq_len[row]).long()
        return self._rows(row, start)

    def _rows(self, row, start):
        """The histories of ``row`` with their first ``start`` items removed (kept left-aligned)."""
        seq, seq_len = self.item_seq[row], self.item_seq_len[row]
        width = seq.shape[1]
        shifted = start[:, None] + torch.arange(width)
        seq = seq.gather(1, shifted.clamp(max=width - 1)) * (shifted < seq_len[:, None])
        return self._samples(seq, seq_len - start, self.target[row])

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
