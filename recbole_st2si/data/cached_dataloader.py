"""Dataloaders that read the feature cache (:mod:`recbole_st2si.feature_cache`) instead of running the
frozen part of the backbone: the same samples as the uncached loaders, carrying the cached states.

* ``ilp``: a training batch holds one ``[Q]`` state per transition (:data:`QUERY_STATES`), an
  evaluation batch the state before each user's held-out item;
* ``top``: a training batch holds each window's token states (:data:`TOKEN_STATES`), where its
  ``[Q]`` tokens are and what they predict, an evaluation batch the tokens of each user's window up
  to the ``[Q]`` before the held-out item; the model runs its trained layers on them.
"""

import torch
from recbole.data.dataloader import FullSortEvalDataLoader, NegSampleEvalDataLoader
from recbole.data.dataloader.abstract_dataloader import AbstractDataLoader
from recbole.data.interaction import Interaction

from recbole_st2si.data.dataloader import LengthBucketedBatches
from recbole_st2si.data.windows import TrainingWindows, UserSequences, tile_windows
from recbole_st2si.errors import UserInputError
from recbole_st2si.feature_cache import CachedStates, TokenRows, load_or_compute
from recbole_st2si.model.st2si import (
    QUERY_ITEMS,
    QUERY_POSITIONS,
    QUERY_STATES,
    QUERY_TARGETS,
    TOKEN_COUNT,
    TOKEN_STATES,
)


def longest(counts):
    """The largest of ``counts``, 0 for none."""
    return int(counts.max()) if len(counts) else 0


def gather_tokens(table, first_row, count):
    """``[B, S, H]`` float32 token states: ``count[b]`` rows of ``table`` from ``first_row[b]``, right-padded with zeros."""
    token = torch.arange(longest(count))
    real = token < count[:, None]
    states = table[(first_row[:, None] + token).clamp(max=max(len(table) - 1, 0))].float()
    return states * real[..., None]


def pad_columns(tensors, fill=0):
    """Tensors ``[B_i, W_i, ...]`` stacked into ``[sum B_i, max W_i, ...]``, right-padded with ``fill``."""
    width = max(tensor.shape[1] for tensor in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, width - t.shape[1]), value=fill)
                      for t in tensors])


class _CachedTrainDataLoader(LengthBucketedBatches, AbstractDataLoader):
    """The samples of :class:`~recbole_st2si.data.dataloader.ST2SITrainDataLoader` (windows, then
    alignment items), shuffled together into batches; subclasses say what a batch carries."""

    def __init__(self, config, dataset, states: CachedStates, windows: TrainingWindows, shuffle=True):
        self.states, self.windows = states, windows
        self.multi_query = config["multi_query"]
        self.num_window_samples = len(windows)
        self.sample_size = len(windows) + (dataset.item_num - 1 if config["id_alignment"] else 0)
        self.sample_tokens = self.count_sample_tokens()
        super().__init__(config, dataset, None, shuffle=shuffle)
        self.window_generator = torch.Generator().manual_seed(config["seed"])

    def _init_batch_size_and_step(self):
        self.step = self.config["train_batch_size"]
        self.set_batch_size(self.step)

    def collate_fn(self, index):
        index = torch.as_tensor(index, dtype=torch.long)
        is_window = index < self.num_window_samples
        windows = self.windows.windows(index[is_window], self.window_generator)
        return Interaction(self.batch(*windows, index[~is_window] - self.num_window_samples + 1))


class CachedQueryTrainDataLoader(_CachedTrainDataLoader):
    """``ilp``: every transition of each window (without multi-query: its last), one cached ``[Q]``
    state each, then the alignment items' states."""

    def count_sample_tokens(self):
        return None  # one state per transition: no padding to save

    def batch(self, users, starts, targets, items):
        first = starts + 1 if self.multi_query else targets
        sizes = targets - first + 1
        sequences = self.windows.sequences
        first_row = sequences.transition_index(users, first)
        rows = torch.repeat_interleave(first_row - sizes.cumsum(0) + sizes, sizes) + torch.arange(int(sizes.sum()))
        row_users = torch.repeat_interleave(users, sizes)
        states = torch.cat([self.states.history[rows], self.states.alignment[items - 1]])
        return {
            QUERY_STATES: states.float(),  # stored in 16 bits: only the batch's rows are converted
            QUERY_ITEMS: torch.cat([sequences.items[rows + row_users], torch.zeros_like(items)]),
            self._dataset.iid_field: torch.cat([sequences.transition_items(rows, row_users), items]),
        }


class CachedTokenTrainDataLoader(_CachedTrainDataLoader):
    """``top``: each window's token states with the position and target of its ``[Q]`` tokens
    (without multi-query: only the last one trains), then each alignment prompt's."""

    def __init__(self, config, dataset, states, windows, rows: TokenRows, shuffle=True):
        self.rows = rows
        super().__init__(config, dataset, states, windows, shuffle)

    def count_sample_tokens(self):
        users, starts, targets = self.windows.fixed
        first = self.windows.sequences.transition_index(users, starts + 1)
        prompts = self.rows.alignment_end - self.rows.alignment_start
        return torch.cat([self.rows.end[first + targets - starts - 1] - self.rows.start[first],
                          prompts[: self.sample_size - len(users)]])

    def batch(self, users, starts, targets, items):
        rows, sequences = self.rows, self.windows.sequences
        queries = targets - starts  # the window's input items, one [Q] each
        first = sequences.transition_index(users, starts + 1)
        last = first + queries - 1
        slot = torch.arange(longest(queries))
        transition = torch.minimum(first[:, None] + slot, last[:, None])
        trains = slot < queries[:, None] if self.multi_query else slot == queries[:, None] - 1
        first_row, window_tokens = rows.start[first], rows.end[last] - rows.start[first]
        prompt_row = rows.alignment_start[items - 1]
        prompt_tokens = rows.alignment_end[items - 1] - prompt_row
        return {
            TOKEN_STATES: pad_columns([gather_tokens(self.states.history, first_row, window_tokens),
                                       gather_tokens(self.states.alignment, prompt_row, prompt_tokens)]),
            TOKEN_COUNT: torch.cat([window_tokens, prompt_tokens]),
            QUERY_POSITIONS: pad_columns([rows.end[transition] - first_row[:, None] - 1, prompt_tokens[:, None] - 1]),
            QUERY_TARGETS: pad_columns([torch.where(trains, sequences.transition_items(transition, users[:, None]), 0),
                                        items[:, None]]),
            QUERY_ITEMS: pad_columns([sequences.items[transition + users[:, None]], torch.zeros_like(items)[:, None]]),
        }


class HeldOutQueries:
    """For ``ilp``: by user id, the cached ``[Q]`` state that predicts the user's held-out item."""

    def __init__(self, states: CachedStates, sequences: UserSequences, positions, user_num):
        self.by_user = torch.zeros(user_num, states.history.shape[1])
        users = torch.nonzero(positions >= 0).squeeze(1)
        rows = sequences.transition_index(users, positions[users])
        self.by_user[sequences.uid[users]] = states.history[rows].float()

    def fields(self, users):
        return {QUERY_STATES: self.by_user[users]}

    def row_tokens(self, users):
        return None  # one state per row: no padding to save


class HeldOutTokens:
    """For ``top``: by user id, the token rows of the user's tiled window up to the ``[Q]`` that
    predicts the held-out item (its last token)."""

    def __init__(self, states: CachedStates, rows: TokenRows, sequences: UserSequences, windows, positions, user_num):
        self.table = states.history
        self.first_row = torch.zeros(user_num, dtype=torch.long)
        self.count = torch.ones(user_num, dtype=torch.long)
        users = torch.nonzero(positions >= 0).squeeze(1)
        window_users, window_starts, _ = windows
        window_keys = sequences.offsets[window_users] + window_starts  # ascending: windows in tile order
        held_out = sequences.offsets[users] + positions[users]
        start = window_starts[torch.searchsorted(window_keys, held_out) - 1]  # the window with its [Q]
        first = rows.start[sequences.transition_index(users, start + 1)]
        self.first_row[sequences.uid[users]] = first
        self.count[sequences.uid[users]] = rows.end[sequences.transition_index(users, positions[users])] - first

    def fields(self, users):
        return {TOKEN_STATES: gather_tokens(self.table, self.first_row[users], self.count[users]),
                TOKEN_COUNT: self.count[users]}

    def row_tokens(self, users):
        """The tokens each row's batch entry will hold, so that rows of similar length are evaluated together."""
        return self.count[users]


class _CachedEvalMixin:
    """Adds each row's user's cached held-out states to the batches of a RecBole evaluation loader."""

    def __init__(self, config, dataset, sampler, held_out):
        self.held_out = held_out
        self.sample_tokens = None
        super().__init__(config, dataset, sampler, shuffle=False)

    def collate_fn(self, index):
        interaction, *positions = super().collate_fn(index)
        interaction.update(Interaction(self.held_out.fields(interaction[self._dataset.uid_field])))
        return (interaction, *positions)


class CachedFullSortEvalDataLoader(_CachedEvalMixin, LengthBucketedBatches, FullSortEvalDataLoader):
    """RecBole's full-sort evaluation, with each user's cached held-out states added to the batch;
    with token states, rows of similar length are batched together (the metrics average over rows,
    whatever their order)."""

    def __init__(self, config, dataset, sampler, held_out):
        super().__init__(config, dataset, sampler, held_out)
        self.sample_tokens = held_out.row_tokens(dataset.inter_feat[dataset.uid_field])


class CachedNegSampleEvalDataLoader(_CachedEvalMixin, NegSampleEvalDataLoader):
    """RecBole's sampled evaluation (e.g. ``uni19``): every candidate row carries its user's cached states."""


class FeatureCache:
    """The cached frozen states of one run, and the cached twins of its dataloaders.

    Built from the multi-query training loader, whose windows span each user's whole history (see
    :func:`~recbole_st2si.data.dataloader.training_windows`); an evaluation loader gets its held-out
    states by its dataset (validation or test).
    """

    def __init__(self, config, model, train_data):
        self.config = config
        self.windows = train_data.windows
        sequences = self.windows.sequences
        if model.trained_layers and self.windows.mode != "all":
            raise UserInputError(f"train_stage top trains on the cached windows of train_window all, not "
                                 f"{self.windows.mode}: set train_window: all, or feature_cache: False")
        self.states = load_or_compute(config, model, sequences)
        user_num = train_data.dataset.user_num
        valid_dataset, test_dataset = train_data.held_out_datasets
        positions = {id(valid_dataset): sequences.valid_position, id(test_dataset): sequences.test_position}
        self.rows = None
        if model.trained_layers:
            self.rows = TokenRows(model.segment_len.cpu(), sequences, model.prompt_item_id)
            tiles = tile_windows(sequences, model.segment_len.cpu(), model.max_seq_length, model.max_seq_tokens)
            self.held_out = {key: HeldOutTokens(self.states, self.rows, sequences, tiles, position, user_num)
                             for key, position in positions.items()}
        else:
            self.held_out = {key: HeldOutQueries(self.states, sequences, position, user_num)
                             for key, position in positions.items()}

    def train_loader(self, train_data):
        shuffle = self.config["shuffle"]
        if self.rows is not None:
            return CachedTokenTrainDataLoader(self.config, train_data.dataset, self.states, self.windows, self.rows, shuffle)
        return CachedQueryTrainDataLoader(self.config, train_data.dataset, self.states, self.windows, shuffle)

    def eval_loader(self, loader):
        """The cached twin of a RecBole evaluation loader (same protocol, same sampler); the loader
        itself if it is cached already or evaluates another dataset."""
        held_out = self.held_out.get(id(loader.dataset))
        if isinstance(loader, _CachedEvalMixin) or held_out is None:
            return loader
        if isinstance(loader, FullSortEvalDataLoader):
            return CachedFullSortEvalDataLoader(self.config, loader.dataset, loader._sampler, held_out)
        return CachedNegSampleEvalDataLoader(self.config, loader.dataset, loader._sampler, held_out)
