"""Which transitions of each user a training epoch reads: the windows of ST2SI's input.

Every user's history is rebuilt once from RecBole's split rows as one sequence ``x_0 .. x_{N-1}``:
the training items, then the held-out validation and test items. A window ``(s, t)`` is the input
``x_s .. x_{t-1}`` with the label ``x_t``; with multi-query input its ``[Q]`` states predict
``x_{s+1} .. x_t``, so one window trains on ``t - s`` transitions. ``train_window`` chooses an
epoch's windows (``n`` is a user's number of training items):

* ``all``: the history is tiled backwards from its last item into windows of at most
  ``MAX_ITEM_LIST_LENGTH`` items whose tokens stay below ``max_seq_tokens``, and each window keeps
  its training part, so every training transition is a query exactly once per epoch. The last
  window is the test input: the feature cache encodes exactly these windows and gets the training,
  validation and test states of a user in one pass over its history.
* ``random``: the authors' augmentation, one window per user and epoch: the start uniform over
  ``0 .. n-2``, then the target uniform over ``start+1 .. n-1``; the most recent
  ``MAX_ITEM_LIST_LENGTH`` items before the target are kept. Recent targets are drawn more often.
* ``full``: one window per user, its most recent training items.
"""

from dataclasses import dataclass
from logging import getLogger

import torch
from recbole.utils import set_color

from recbole_st2si.errors import UserInputError


@dataclass
class UserSequences:
    """Every user's items in time order, users one after another (a CSR layout).

    ``items[offsets[u] + p]`` is item ``x_p`` of user ``u``; its first ``num_train[u]`` items are
    training items. ``valid_position`` / ``test_position`` give the position of the held-out item
    of the user's validation / test row (-1: none). ``train_row[u]`` is the training row (in the
    training dataset) whose target is ``x_1`` (-1: none); the row of target ``x_t`` follows it at
    ``train_row[u] + t - 1``, as RecBole's augmentation writes one row per target.
    """

    items: torch.Tensor
    offsets: torch.Tensor
    uid: torch.Tensor
    num_train: torch.Tensor
    train_row: torch.Tensor
    valid_position: torch.Tensor
    test_position: torch.Tensor

    @property
    def lengths(self):
        return self.offsets[1:] - self.offsets[:-1]

    def transition_index(self, user, position):
        """Row of the transition that predicts ``x_position`` (``position >= 1``) in a table holding
        every user's ``N - 1`` transitions, users one after another."""
        return self.offsets[user] - user + position - 1

    def transition_items(self, index, user):
        """The item that transition ``index`` of ``user`` predicts."""
        return self.items[index + user + 1]


def user_sequences(train_dataset, *held_out_datasets) -> UserSequences:
    """Rebuild each user's history from RecBole's split rows, with tensor operations only.

    Each row holds its target and the items before it; a user's rows in time order therefore give
    the history as the item list of the first row followed by every row's target.
    """
    parts = [train_dataset.inter_feat] + [dataset.inter_feat for dataset in held_out_datasets if dataset is not None]
    fields = (train_dataset.uid_field, train_dataset.item_id_list_field, train_dataset.item_list_length_field,
              train_dataset.iid_field)
    uid, item_list, list_len, target = (torch.cat([part[name] for part in parts]) for name in fields)
    split = torch.cat([torch.full((len(part),), index) for index, part in enumerate(parts)])
    row_in_split = torch.cat([torch.arange(len(part)) for part in parts])
    order = torch.argsort(uid, stable=True)  # training rows, then validation, then test, per user
    uid, item_list, list_len, target, split, row_in_split = (
        tensor[order] for tensor in (uid, item_list, list_len, target, split, row_in_split)
    )

    users, rows_per_user = torch.unique_consecutive(uid, return_counts=True)
    first_row = rows_per_user.cumsum(0) - rows_per_user
    first_len = list_len[first_row]
    lengths = first_len + rows_per_user
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    item_user = torch.repeat_interleave(torch.arange(len(users)), lengths)
    position = torch.arange(int(lengths.sum())) - offsets[item_user]
    in_first_list = position < first_len[item_user]
    from_list = item_list[first_row[item_user], position.clamp(max=item_list.shape[1] - 1)]
    from_target = target[(first_row[item_user] + position - first_len[item_user]).clamp(min=0)]
    items = torch.where(in_first_list, from_list, from_target)

    row_user = torch.repeat_interleave(torch.arange(len(users)), rows_per_user)
    row_position = first_len[row_user] + torch.arange(len(uid)) - first_row[row_user]
    previous = items[offsets[row_user] + row_position - 1]
    if not torch.equal(previous, item_list[torch.arange(len(uid)), list_len - 1]):
        raise UserInputError("the split rows do not form one time-ordered history per user; ST2SI's windows "
                             "need RecBole's leave-one-out split in time order (eval_args: split: {LS: ...}, order: TO)")
    held_out_position = []
    for index in (1, 2):
        rows = split == index
        if len(torch.unique(row_user[rows])) != int(rows.sum()):
            raise UserInputError("ST2SI's windows need at most one validation and one test row per user "
                                 "(leave-one-out: eval_args: split: {LS: valid_and_test})")
        position_of = torch.full((len(users),), -1, dtype=torch.long)
        position_of[row_user[rows]] = row_position[rows]
        held_out_position.append(position_of)
    held_out_rows = torch.zeros(len(users), dtype=torch.long).index_add_(0, row_user, (split > 0).long())
    has_train_row = split[first_row] == 0
    return UserSequences(
        items=items,
        offsets=offsets,
        uid=users,
        num_train=lengths - held_out_rows,
        train_row=torch.where(has_train_row, row_in_split[first_row], torch.full_like(first_row, -1)),
        valid_position=held_out_position[0],
        test_position=held_out_position[1],
    )


def tile_windows(sequences: UserSequences, segment_len, max_items, max_tokens):
    """Windows ``(user, start, end)`` that tile every history backwards from its last item.

    Each window has at most ``max_items`` items and fewer than ``max_tokens`` tokens (``segment_len``:
    an item's text and its ``[Q]``); the next window ends where this one starts, so every position
    ``1 .. N-1`` is the target of exactly one query. Vectorised over users, one step per window.
    """
    prefix = torch.cat([torch.zeros(1, dtype=torch.long), segment_len[sequences.items].cumsum(0)])
    user = torch.arange(len(sequences.uid))
    end = sequences.lengths - 1
    windows = []
    while True:
        active = end >= 1
        if not active.any():
            break
        users, ends = user[active], end[active]
        absolute_end = sequences.offsets[users] + ends
        # tokens of x_s .. x_{e-1} = prefix[end] - prefix[start]: the first start below the limit
        first_fitting = torch.searchsorted(prefix, prefix[absolute_end] - max_tokens, right=True)
        starts = torch.maximum(first_fitting - sequences.offsets[users], (ends - max_items).clamp(min=0))
        starts = torch.minimum(starts, ends - 1)  # an item longer than the limit is the model's error to report
        windows.append((users, starts, ends))
        end[active] = starts
    if not windows:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, empty
    users, starts, ends = (torch.cat(parts) for parts in zip(*windows))
    order = torch.argsort(sequences.offsets[users] + starts)
    return users[order], starts[order], ends[order]


class TrainingWindows:
    """The windows ``(user, start, target)`` of an epoch's user samples, for ``train_window``.

    Shared by the training loader that runs the backbone and the one that reads cached states, so
    both train on the same transitions.
    """

    def __init__(self, mode, sequences: UserSequences, segment_len, max_items, max_tokens):
        self.mode, self.sequences, self.max_items = mode, sequences, max_items
        if mode == "all":
            users, starts, ends = tile_windows(sequences, segment_len, max_items, max_tokens)
            targets = torch.minimum(ends, sequences.num_train[users] - 1)
            trains = starts < targets
            self.fixed = (users[trains], starts[trains], targets[trains])
            self.num_samples = int(trains.sum())
        else:
            self.users = torch.nonzero(sequences.num_train >= 2).squeeze(1)
            self.num_samples = len(self.users)

    def __len__(self):
        return self.num_samples

    def windows(self, index, generator):
        """``(user, start, target)`` of the samples ``index``: the input is ``x_start .. x_{target-1}``;
        ``random`` draws from ``generator``, which each loader owns (and a checkpoint can restore)."""
        if self.mode == "all":
            return tuple(part[index] for part in self.fixed)
        users = self.users[index]
        last = self.sequences.num_train[users] - 1
        if self.mode == "full":
            return users, (last - self.max_items).clamp(min=0), last
        starts = (torch.rand(len(users), generator=generator) * last).long()
        targets = starts + 1 + (torch.rand(len(users), generator=generator) * (last - starts)).long()
        return users, torch.maximum(starts, targets - self.max_items), targets

    def log_coverage(self, multi_query):
        """Say how many of the dataset's training transitions an epoch trains on."""
        total = int((self.sequences.num_train - 1).clamp(min=0).sum())
        if multi_query:
            # a draw of its own, so that logging leaves the loaders' random streams alone
            _, starts, targets = self.windows(torch.arange(self.num_samples), torch.Generator().manual_seed(0))
            used = int((targets - starts).sum())
        else:
            used = self.num_samples
        epoch = "an epoch (one draw)" if self.mode == "random" else "an epoch"
        getLogger().info(
            set_color("train_window", "green")
            + f"={self.mode}: {self.num_samples} windows per epoch; {epoch} trains on {used} of the "
            f"{total} training transitions ({100 * used / max(total, 1):.1f}%)"
        )
