"""A saved run loaded for serving: top-k for known users, new histories and growing sessions."""

from dataclasses import dataclass

import numpy as np
import torch
from recbole.data.interaction import Interaction
from recbole.utils import FeatureType, init_seed

from recbole_st2si.errors import UserInputError
from recbole_st2si.run_files import RunFiles, frozen_weights_digest, load_checkpoint, load_weights, read_serving_file
from recbole_st2si.serving.backends import BACKBONE_PRECISIONS, backend_for, padded
from recbole_st2si.utils import get_model

EMPTY_HISTORY = "the history is empty: give at least one item id"
SERVING_SETTINGS = {"S3Rec": {"train_stage": "pretrain"}}
"""Settings a model is built with for serving, whatever it trained with: S3Rec's fine-tuning stage
would read its pre-training file again, while the checkpoint holds all its weights."""


class SavedConfig(dict):
    """Settings restored from a serving file; like RecBole's ``Config``, a missing key reads as None."""

    def __getitem__(self, name):
        return self.get(name)


class SavedDataset:
    """What building a sequential model reads from its dataset, restored from a serving file: the
    item ids, ST2SI's item tokens and the item features that FDSA or S3Rec embed."""

    def __init__(self, info, config):
        self.config = config
        self.iid_field = config["ITEM_ID_FIELD"]
        self.item_num = len(info["items"])
        self.field2id_token = {self.iid_field: np.array(info["items"])}
        self.item_token_ids = info.get("item_token_ids")
        self.item_token_len = info.get("item_token_len")
        features = info.get("item_features", {})  # absent from files written before features were kept
        self.field2type = {self.iid_field: FeatureType.TOKEN}
        self.field2type.update({field: FeatureType(feature["type"]) for field, feature in features.items()})
        self.field_sizes = {self.iid_field: self.item_num}
        self.field_sizes.update({field: feature["size"] for field, feature in features.items()})
        self.item_feat = Interaction({
            self.iid_field: torch.arange(self.item_num),
            **{field: feature["values"] for field, feature in features.items()},
        })

    def num(self, field):
        return self.field_sizes[field]

    def get_item_feature(self):
        return self.item_feat


def load_recommender(model_file, llm_path=None, device=None, precision="fp32"):
    """A :class:`Recommender` for a checkpoint written by ``run_recbole_st2si.py``.

    Args:
        model_file: the checkpoint (``saved/<model>-<date>.pth``); its serving file lies beside it.
        llm_path: where ST2SI's backbone is now, if not where training found it; its weights must
            hash as recorded.
        device: ``cpu`` (default) or ``cuda``.
        precision: ST2SI's backbone weights in ``fp32`` (default) or ``bf16``, about twice as fast
            where the hardware computes bf16 natively; the ILP scores stay float32 either way.
    """
    if precision not in BACKBONE_PRECISIONS:
        raise UserInputError(f"precision must be one of {list(BACKBONE_PRECISIONS)}, got {precision!r}")
    files = RunFiles.of(model_file)
    checkpoint = load_checkpoint(files.checkpoint)
    info = read_serving_file(files, checkpoint)
    config = SavedConfig(info["config"], device=torch.device(device or "cpu"), ilp_checkpoint=None)
    config.update(SERVING_SETTINGS.get(info["model"], {}))
    if llm_path:
        config["llm_path"] = llm_path
    model = _saved_model(info, config)
    if "backbone" in info:
        _check_backbone(model, info["backbone"], config["llm_path"])
    load_weights(model, checkpoint, model_file)
    return Recommender(backend_for(model.to(config["device"]).eval(), precision), info)


def _saved_model(info, config):
    """The run's model built again from its serving file, its random weights those of the training
    run (a random backbone or a new ``[Q]`` embedding are not in the checkpoint)."""
    init_seed(config["seed"], config["reproducibility"])
    try:
        return get_model(info["model"])(config, SavedDataset(info, config))
    except (AttributeError, KeyError) as error:
        raise UserInputError(
            f"{info['model']} needs more of its dataset than item ids ({error}); it cannot be served from a saved run"
        ) from None


def _check_backbone(model, recorded, llm_path):
    if frozen_weights_digest(model) != recorded["frozen_weights_sha256"]:
        raise UserInputError(
            f"the backbone llm_path={llm_path!r} (pretrained_backbone={recorded['pretrained_backbone']!r}) is not the one "
            f"this model was trained on (llm_path={recorded['llm_path']!r}): its weights hash differently"
        )


@dataclass
class TopK:
    """Recommendations for a batch of histories: raw item ids and their scores, best first."""

    items: list
    scores: list


class Recommender:
    """Top-k recommendations of a saved model for known users or for any history of raw item ids;
    the model's backend (:mod:`recbole_st2si.serving.backends`) encodes and scores."""

    def __init__(self, backend, info):
        self.backend = backend
        self.model = backend.model
        self.items = info["items"]
        self.titles = info["titles"]
        self.item_ids = {token: index for index, token in enumerate(self.items) if index > 0}
        self.users = {token: index for index, token in enumerate(info["users"]) if index > 0}
        self.history_of = {user: row for row, user in enumerate(info["history_users"].tolist())}
        self.history_items, self.history_offsets = info["history_items"], info["history_offsets"]
        self.max_items = self.model.max_seq_length

    def user_history(self, user) -> list[str]:
        """The raw item ids of a known user's history, oldest first."""
        if str(user) not in self.users:
            raise UserInputError(f"unknown user {user!r}: not in the dataset this model was trained on")
        row = self.history_of.get(self.users[str(user)])
        if row is None:
            raise UserInputError(
                f"user {user!r} has no history in the training data: fewer than two of its items are left after filtering"
            )
        items = self.history_items[self.history_offsets[row] : self.history_offsets[row + 1]]
        return [self.items[item] for item in items.tolist()]

    def _item_ids(self, items):
        """Internal ids of raw item ids; an id outside the model's vocabulary is a one-line error."""
        items = [str(item).strip() for item in items]
        unknown = [item for item in items if item not in self.item_ids]
        if unknown:
            raise UserInputError(f"unknown item id {unknown[0]!r}: not in the item vocabulary of this model")
        return [self.item_ids[item] for item in items]

    def _internal_ids(self, history, truncate):
        ids = self._item_ids(history)
        if not ids:
            raise UserInputError(EMPTY_HISTORY)
        if len(ids) > self.max_items and not truncate:
            raise UserInputError(
                f"the history has {len(ids)} items; this model reads at most {self.max_items} "
                f"(MAX_ITEM_LIST_LENGTH): give the most recent {self.max_items}, or truncate (--truncate) to keep them"
            )
        return ids

    def _exclusions(self, rows, exclude_history):
        return padded(rows, self.model.device) if exclude_history else None

    def _check_k(self, k):
        if not 1 <= k < len(self.items):
            raise UserInputError(f"topk must be between 1 and the number of items, {len(self.items) - 1}; got {k}")

    def _named(self, scores, items):
        named_items, named_scores = [], []
        for row_scores, row_items in zip(scores.tolist(), items.tolist()):
            ranked = [(self.items[item], score) for item, score in zip(row_items, row_scores) if score > float("-inf")]
            named_items.append([item for item, _ in ranked])
            named_scores.append([score for _, score in ranked])
        return TopK(named_items, named_scores)

    @torch.no_grad()
    def recommend(self, histories, k=10, exclude_history=False, truncate=False) -> TopK:
        """The ``k`` best items after each history (a list of raw item ids, oldest first).

        ``exclude_history`` never recommends an item of the history; ``truncate`` keeps the most
        recent ``MAX_ITEM_LIST_LENGTH`` items of a longer history instead of refusing it.
        """
        self._check_k(k)
        ids = [self._internal_ids(history, truncate) for history in histories]
        windows = padded([row[-self.max_items :] for row in ids], self.model.device)
        return self._named(*self.backend.top_k(windows, k, self._exclusions(ids, exclude_history)))

    def recommend_users(self, users, k=10, exclude_history=False) -> TopK:
        """The ``k`` best items for known users after their whole history (its most recent
        ``MAX_ITEM_LIST_LENGTH`` items, as in training and evaluation)."""
        histories = [self.user_history(user) for user in users]
        return self.recommend(histories, k, exclude_history, truncate=True)

    def session(self, history):
        """A :class:`Session` that keeps ``history`` encoded for incremental updates."""
        return Session(self, history)

    def add(self, sessions, items):
        """Append ``items[i]`` (a raw item id) to ``sessions[i]``; ST2SI runs every session's new item
        in one backbone pass, on each session's kept key/values."""
        if len(items) != len(sessions):
            raise UserInputError(f"one new item per session: got {len(items)} items for {len(sessions)} sessions")
        ids = self._item_ids(items)
        states = self.backend.extend([session.state for session in sessions], ids)
        for session, item_id, state in zip(sessions, ids, states):
            session.ids.append(item_id)
            session.state = state

    @torch.no_grad()
    def recommend_sessions(self, sessions, k=10, exclude_history=False) -> TopK:
        """The ``k`` best items after each session's history, as :meth:`recommend` ranks them; ST2SI
        scores the sessions' kept ``[Q]`` states without running the backbone."""
        self._check_k(k)
        exclude = self._exclusions([session.ids for session in sessions], exclude_history)
        return self._named(*self.backend.top_k_of_sessions([session.state for session in sessions], k, exclude))


class Session:
    """One user's growing history. For ST2SI the backbone's key/values of the history are kept, so
    :meth:`add` runs only the new item's tokens and its ``[Q]``; when the oldest item leaves the
    window (``MAX_ITEM_LIST_LENGTH`` or ``max_seq_tokens``) the window is encoded again. Other
    models keep the window's item ids and read it again at each :meth:`recommend`. Many sessions
    grow together with :meth:`Recommender.add` and are ranked together with
    :meth:`Recommender.recommend_sessions`."""

    def __init__(self, recommender, history):
        self.recommender = recommender
        self.ids = recommender._internal_ids(history, truncate=True)
        self.state = recommender.backend.start(self.ids)

    def add(self, item):
        """Append one raw item id to the history."""
        self.recommender.add([self], [item])

    def recommend(self, k=10, exclude_history=False) -> TopK:
        return self.recommender.recommend_sessions([self], k, exclude_history)
