"""Efficient ILP tuning: run the frozen backbone once, then train the ILP on cached ``[Q]`` states.

With a frozen backbone in eval mode the hidden state at every ``[Q]`` is a fixed function of the
input, so ILP tuning is a softmax regression on features that can be computed once. Each user's
most recent window (the test input: at most ``MAX_ITEM_LIST_LENGTH`` items before the test item)
is encoded in one causal pass; its ``[Q]`` states give, at once,

* the training features: every ``[Q]`` whose next item is a training item,
* the validation feature: the ``[Q]`` before the validation item,
* the test feature: the last ``[Q]``.

RecBole's evaluation loaders (full ranking, or sampled candidates such as ``uni19``) then carry each
user's cached state, from which the ILP scores the candidates.

Histories that fit the window give exactly the uncached path's inputs (tested). A history longer
than the window differs slightly: the validation state then sees the window up to the validation
item (one item fewer than RecBole's validation input) and training transitions older than the
window are not used. Random-window augmentation does not apply either: with a causal backbone the
full-window states already contain every prefix's state. Without multi-query (``multi_query:
False``) a sample trains on one transition, like the uncached path's last ``[Q]``: the window's
last, or with ``train_window: random`` one drawn at random each time (the random target; its state
sees the whole window before it rather than a random start).

The features are stored on disk under a key that hashes the backbone's weights and every model
input (item tokens, windows, prompt, truncation), so a second run or a tuning trial reuses them
and a cache built for another backbone, dataset or text setting is never used.
"""

import fcntl
import hashlib
import os
from dataclasses import dataclass
from logging import getLogger
from pathlib import Path

import torch
from recbole.data.dataloader import FullSortEvalDataLoader, NegSampleEvalDataLoader
from recbole.data.dataloader.abstract_dataloader import AbstractDataLoader
from recbole.data.interaction import Interaction
from recbole.utils import set_color
from tqdm import tqdm

from recbole_st2si.model.st2si import QUERY_FEATURE

CACHE_FORMAT = 1


@dataclass
class QueryFeatures:
    """Cached ``[Q]`` states.

    ``train`` holds one block of rows per training sample, in the order of
    :class:`~recbole_st2si.data.dataloader.ST2SITrainDataLoader`'s samples (users, then every
    item's alignment sample); ``train_offsets[i]`` is where sample ``i``'s block starts.
    ``valid``/``test`` are indexed by user id.
    """

    train: torch.Tensor
    train_targets: torch.Tensor
    train_offsets: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor


@dataclass
class _Windows:
    """Per user (indexed by user id): the window that is encoded and how its ``[Q]`` are used."""

    seq: torch.Tensor  # [user_num, L] items, left-aligned
    seq_len: torch.Tensor  # [user_num]
    target: torch.Tensor  # [user_num] item after the window
    has_valid: torch.Tensor  # [user_num] bool
    has_test: torch.Tensor  # [user_num] bool


def _user_windows(train_data, valid_data, test_data) -> _Windows:
    """The latest known row of every user: the test row, else the validation row, else the last training row."""
    dataset = train_data.dataset
    user_num, slots = dataset.user_num, dataset.inter_feat[dataset.item_id_list_field].shape[1]
    windows = _Windows(
        seq=torch.zeros(user_num, slots, dtype=torch.long),
        seq_len=torch.zeros(user_num, dtype=torch.long),
        target=torch.zeros(user_num, dtype=torch.long),
        has_valid=torch.zeros(user_num, dtype=torch.bool),
        has_test=torch.zeros(user_num, dtype=torch.bool),
    )
    for loader, flag in ((train_data, None), (valid_data, windows.has_valid), (test_data, windows.has_test)):
        feat = loader.dataset.inter_feat
        uid = feat[dataset.uid_field]
        # Rows are in time order per user, so the last assignment per user wins.
        windows.seq[uid] = feat[dataset.item_id_list_field]
        windows.seq_len[uid] = feat[dataset.item_list_length_field]
        windows.target[uid] = feat[dataset.iid_field]
        if flag is not None:
            flag[uid] = True
    return windows


def _train_users(train_data):
    uid = train_data.dataset.inter_feat[train_data.dataset.uid_field]
    return torch.unique_consecutive(uid)


def _cache_key(model, windows, train_users, num_alignment):
    digest = hashlib.sha256(f"st2si-query-features-v{CACHE_FORMAT}".encode())
    for name, tensor in model.backbone.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    inputs = [model.segment_tokens, model.segment_len, windows.seq, windows.seq_len, windows.target,
              windows.has_valid, windows.has_test, train_users]
    for tensor in inputs:
        digest.update(tensor.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digest.update(f"{model.max_seq_tokens}/{model.n_items}/{num_alignment}".encode())
    return digest.hexdigest()[:32]


@torch.inference_mode()
def _encode(model, seq, seq_len, batch_size, desc):
    """``[Q]`` states of each sequence, as a list of ``[len_i, H]`` tensors.

    Batches hold sequences of similar token counts, so little compute goes to padding."""
    order = torch.argsort(model.segment_len.cpu()[seq].sum(1))
    states = [None] * len(seq)
    for start in tqdm(range(0, len(seq), batch_size), desc=desc, ncols=100):
        rows = order[start : start + batch_size]
        width = int(seq_len[rows].max())
        batch_seq = seq[rows, :width].to(model.device)
        batch_states, _ = model.query_states(batch_seq, seq_len[rows].to(model.device))
        for row, state, length in zip(rows.tolist(), batch_states.float().cpu(), seq_len[rows].tolist()):
            states[row] = state[:length]
    return states


def compute_query_features(model, train_users, windows: _Windows, batch_size) -> QueryFeatures:
    """Run the frozen backbone once over every window and alignment prompt; ``train_users`` in the
    order of the training loader's user samples."""
    model.eval()
    users = torch.nonzero(windows.seq_len).squeeze(1)
    encoded = _encode(model, windows.seq[users], windows.seq_len[users], batch_size, "Caching [Q] states")
    per_user = dict(zip(users.tolist(), encoded))
    hidden = encoded[0].shape[-1]
    valid = torch.zeros(windows.seq.shape[0], hidden)
    test = torch.zeros(windows.seq.shape[0], hidden)

    blocks, targets = [], []
    for user in train_users.tolist():
        states, length = per_user[user], int(windows.seq_len[user])
        held_out = int(windows.has_valid[user]) + int(windows.has_test[user])
        next_items = torch.cat([windows.seq[user, 1:length], windows.target[user : user + 1]])
        blocks.append(states[: length - held_out])
        targets.append(next_items[: length - held_out])
    for user in users.tolist():
        states, length = per_user[user], int(windows.seq_len[user])
        if windows.has_test[user]:
            test[user] = states[length - 1]
        if windows.has_valid[user]:
            valid[user] = states[length - 1 - int(windows.has_test[user])]

    if model.n_items > 1:  # always cached, so runs with and without ID alignment share the file
        items = torch.arange(1, model.n_items)
        prompts = torch.stack([torch.full_like(items, model.prompt_item_id), items], dim=1)
        aligned = _encode(model, prompts, torch.full_like(items, 2), batch_size, "Caching alignment [Q]")
        blocks += [states[1:] for states in aligned]
        targets += [item.view(1) for item in items]

    sizes = torch.tensor([len(block) for block in blocks])
    return QueryFeatures(
        train=torch.cat(blocks),
        train_targets=torch.cat(targets),
        train_offsets=torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)]),
        valid=valid,
        test=test,
    )


def load_or_compute(config, model, train_data, valid_data, test_data) -> QueryFeatures:
    """The cached features for this exact backbone and input, computed once under a file lock."""
    logger = getLogger()
    windows = _user_windows(train_data, valid_data, test_data)
    train_users = _train_users(train_data)
    key = _cache_key(model, windows, train_users, model.n_items - 1)
    cache_dir = Path(config["feature_cache_dir"])
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{config['dataset']}-{key}.pt"
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent trials wait for one builder
        if path.is_file():
            logger.info(set_color("feature cache", "green") + f": reusing {path}")
            return QueryFeatures(**torch.load(path, weights_only=True))
        features = compute_query_features(model, train_users, windows, config["feature_batch_size"])
        temporary = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(features.__dict__, temporary)
        os.replace(temporary, path)
        logger.info(set_color("feature cache", "green") + f": wrote {path}")
        return features


class CachedQueryTrainDataLoader(AbstractDataLoader):
    """Batches of cached ``[Q]`` states: the same samples (users and alignment items) per batch
    as :class:`~recbole_st2si.data.dataloader.ST2SITrainDataLoader`, with every transition of a
    sample in the batch (one without multi-query)."""

    def __init__(self, config, dataset, features: QueryFeatures, shuffle=True):
        self.features = features
        self.one_transition_per_sample = not config["multi_query"]
        self.random_transition = config["train_window"] == "random"
        self.transition_generator = torch.Generator().manual_seed(config["seed"])
        alignment_samples = dataset.item_num - 1
        self.sample_size = len(features.train_offsets) - 1 - (0 if config["id_alignment"] else alignment_samples)
        super().__init__(config, dataset, None, shuffle=shuffle)

    def _init_batch_size_and_step(self):
        self.step = self.config["train_batch_size"]
        self.set_batch_size(self.step)

    def collate_fn(self, index):
        index = torch.as_tensor(index, dtype=torch.long)
        starts, ends = self.features.train_offsets[index], self.features.train_offsets[index + 1]
        sizes = ends - starts
        if not self.one_transition_per_sample:
            rows = torch.repeat_interleave(starts - sizes.cumsum(0) + sizes, sizes) + torch.arange(int(sizes.sum()))
        elif self.random_transition:
            rows = starts + (torch.rand(len(index), generator=self.transition_generator) * sizes).long()
        else:
            rows = ends - 1
        return Interaction(
            {QUERY_FEATURE: self.features.train[rows], self._dataset.iid_field: self.features.train_targets[rows]}
        )


class _CachedQueryFeatureMixin:
    """Adds each row's user's cached ``[Q]`` state to the batches of a RecBole evaluation loader."""

    def __init__(self, config, dataset, sampler, features_by_user):
        self.features_by_user = features_by_user
        super().__init__(config, dataset, sampler, shuffle=False)

    def collate_fn(self, index):
        interaction, *positions = super().collate_fn(index)
        users = interaction[self._dataset.uid_field]
        interaction.update(Interaction({QUERY_FEATURE: self.features_by_user[users]}))
        return (interaction, *positions)


class CachedQueryEvalDataLoader(_CachedQueryFeatureMixin, FullSortEvalDataLoader):
    """RecBole's full-sort evaluation, with each user's cached ``[Q]`` state added to the batch."""


class CachedQueryNegSampleEvalDataLoader(_CachedQueryFeatureMixin, NegSampleEvalDataLoader):
    """RecBole's sampled evaluation (e.g. ``uni19``): every candidate row carries its user's cached state."""


def uses_feature_cache(config):
    """ILP tuning reads cached states when asked to."""
    return config["model"] == "ST2SI" and config["train_stage"] == "ilp" and bool(config["feature_cache"])


def _cached_eval_loader(config, loader, features_by_user):
    """The cached twin of a RecBole evaluation loader: same protocol, same sampler."""
    if isinstance(loader, FullSortEvalDataLoader):
        return CachedQueryEvalDataLoader(config, loader.dataset, loader._sampler, features_by_user)
    return CachedQueryNegSampleEvalDataLoader(config, loader.dataset, loader._sampler, features_by_user)


def cached_dataloaders(config, model, train_data, valid_data, test_data):
    """Replace the three dataloaders by ones that serve cached ``[Q]`` states to the ILP."""
    features = load_or_compute(config, model, train_data, valid_data, test_data)
    train = CachedQueryTrainDataLoader(config, train_data.dataset, features, shuffle=config["shuffle"])
    return train, _cached_eval_loader(config, valid_data, features.valid), _cached_eval_loader(config, test_data, features.test)
