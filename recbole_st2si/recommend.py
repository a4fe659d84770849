"""Recommend from a saved run: the top-k items for a known user or for any history of item ids.

    python -m recbole_st2si.recommend --model_file saved/ST2SI-Dec-02-2026_10-00-00.pth --user 196 --topk 10
    python -m recbole_st2si.recommend --model_file saved/SASRec-....pth --history 50,172,133 --exclude_history

ST2SI (every ``train_stage``) and RecBole's sequential models (SASRec, GRU4Rec, ...) are served the
same way. A run that saves its checkpoint also writes a *serving file* beside it
(``<checkpoint>.serving.pth``, see :func:`recbole_st2si.run_files.serving_info`): the configuration, the item
vocabulary and titles, every user's history, and, for ST2SI, the item token table and which backbone
it ran on with a hash of the weights the checkpoint does not hold (an ``ilp`` checkpoint holds only
the ILP; its frozen backbone comes from ``llm_path`` again and must be the same).

Histories are raw item ids, oldest first. A model reads at most ``MAX_ITEM_LIST_LENGTH`` items, the
most recent ones, as in training and evaluation: a known user's history is cut so, while a given
history that is longer is refused unless ``truncate`` (``--truncate``) asks for the cut.
"""

import argparse
import sys
from dataclasses import dataclass

import numpy as np
import torch
from recbole.data.interaction import Interaction
from recbole.utils import init_seed
from transformers.utils import logging as transformers_logging

from recbole_st2si.errors import UserInputError
from recbole_st2si.model.st2si import ST2SI, mask_items
from recbole_st2si.run_files import RunFiles, frozen_weights_digest, load_checkpoint, load_weights, read_serving_file
from recbole_st2si.utils import get_model

class SavedConfig(dict):
    """Settings restored from a serving file; like RecBole's ``Config``, a missing key reads as None."""

    def __getitem__(self, name):
        return self.get(name)


class SavedDataset:
    """What building a sequential model reads from its dataset, restored from a serving file."""

    def __init__(self, info, config):
        self.iid_field = config["ITEM_ID_FIELD"]
        self.field2id_token = {self.iid_field: np.array(info["items"])}
        self.item_token_ids = info.get("item_token_ids")
        self.item_token_len = info.get("item_token_len")

    def num(self, field):
        return len(self.field2id_token[field])


BACKBONE_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


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
    if llm_path:
        config["llm_path"] = llm_path
    init_seed(config["seed"], config["reproducibility"])  # weights created at random are the training run's
    try:
        model = get_model(info["model"])(config, SavedDataset(info, config))
    except (AttributeError, KeyError) as error:
        raise UserInputError(
            f"{info['model']} needs more of its dataset than item ids ({error}); it cannot be served from a saved run"
        ) from None
    if isinstance(model, ST2SI):
        _check_backbone(model, info["backbone"], config["llm_path"])
    load_weights(model, checkpoint, model_file)
    if isinstance(model, ST2SI):
        model.backbone.to(BACKBONE_PRECISIONS[precision])
    return Recommender(model.to(config["device"]).eval(), info)


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
    """Top-k recommendations of a saved model for known users or for any history of raw item ids."""

    def __init__(self, model, info):
        self.model = model
        self.items = info["items"]
        self.titles = info["titles"]
        self.item_ids = {token: index for index, token in enumerate(self.items) if index > 0}
        self.users = {token: index for index, token in enumerate(info["users"]) if index > 0}
        self.history_of = {user: row for row, user in enumerate(info["history_users"].tolist())}
        self.history_items, self.history_offsets = info["history_items"], info["history_offsets"]
        self.max_items = model.max_seq_length

    def user_history(self, user) -> list[str]:
        """The raw item ids of a known user's history, oldest first."""
        if str(user) not in self.users:
            raise UserInputError(f"unknown user {user!r}: not in the dataset this model was trained on")
        row = self.history_of.get(self.users[str(user)])
        if row is None:
            raise UserInputError(f"user {user!r} has no history left in the training data (its items were filtered out)")
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
            raise UserInputError("the history is empty: give at least one item id")
        if len(ids) > self.max_items and not truncate:
            raise UserInputError(
                f"the history has {len(ids)} items; this model reads at most {self.max_items} "
                f"(MAX_ITEM_LIST_LENGTH): give the most recent {self.max_items}, or truncate (--truncate) to keep them"
            )
        return ids

    def _padded(self, rows):
        table = torch.zeros((len(rows), max(map(len, rows))), dtype=torch.long)
        for row, ids in enumerate(rows):
            table[row, : len(ids)] = torch.tensor(ids)
        return table.to(self.model.device)

    def _check_k(self, k):
        if not 1 <= k < self.model.n_items:
            raise UserInputError(f"topk must be between 1 and the number of items, {self.model.n_items - 1}; got {k}")

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
        windows = self._padded([row[-self.max_items :] for row in ids])
        lengths = (windows > 0).sum(1)
        exclude = self._padded(ids) if exclude_history else None
        if isinstance(self.model, ST2SI):
            return self._named(*self.model.top_items(self.model(windows, lengths), k, exclude))
        interaction = Interaction({self.model.ITEM_SEQ: windows, self.model.ITEM_SEQ_LEN: lengths})
        scores = self.model.full_sort_predict(interaction).float().view(len(ids), -1)
        scores[:, 0] = float("-inf")
        if exclude is not None:
            scores = mask_items(scores, exclude)
        top = scores.topk(k, dim=1)
        return self._named(top.values, top.indices)

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
        for session, item_id in zip(sessions, ids):
            session.ids.append(item_id)
        if isinstance(self.model, ST2SI):
            states = self.model.extend_histories([session.state for session in sessions], ids)
            for session, state in zip(sessions, states):
                session.state = state

    @torch.no_grad()
    def recommend_sessions(self, sessions, k=10, exclude_history=False) -> TopK:
        """The ``k`` best items after each session's history, as :meth:`recommend` ranks them; ST2SI
        scores the sessions' kept ``[Q]`` states without running the backbone."""
        if not isinstance(self.model, ST2SI):
            histories = [[self.items[item] for item in session.ids] for session in sessions]
            return self.recommend(histories, k, exclude_history, truncate=True)
        self._check_k(k)
        exclude = self._padded([session.ids for session in sessions]) if exclude_history else None
        states = torch.stack([session.state.last_query_state for session in sessions])
        return self._named(*self.model.top_items(states, k, exclude))


class Session:
    """One user's growing history. For ST2SI the backbone's key/values of the history are kept, so
    :meth:`add` runs only the new item's tokens and its ``[Q]``; when the oldest item leaves the
    window (``MAX_ITEM_LIST_LENGTH`` or ``max_seq_tokens``) the window is encoded again. Other
    models encode the history at each :meth:`recommend`. Many sessions grow together with
    :meth:`Recommender.add` and are ranked together with :meth:`Recommender.recommend_sessions`."""

    def __init__(self, recommender, history):
        self.recommender = recommender
        self.ids = recommender._internal_ids(history, truncate=True)
        self.state = recommender.model.encode_history(self.ids) if isinstance(recommender.model, ST2SI) else None

    def add(self, item):
        """Append one raw item id to the history."""
        self.recommender.add([self], [item])

    def recommend(self, k=10, exclude_history=False) -> TopK:
        return self.recommender.recommend_sessions([self], k, exclude_history)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_file", required=True, help="a checkpoint saved by run_recbole_st2si.py")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="a user id of the training data: recommend after the user's history")
    who.add_argument("--history", help="raw item ids, oldest first, separated by commas (e.g. 50,172,133)")
    parser.add_argument("--topk", type=int, default=10, help="how many items")
    parser.add_argument("--exclude_history", action="store_true", help="never recommend an item of the history")
    parser.add_argument("--truncate", action="store_true", help="keep the most recent items of a --history that is too long")
    parser.add_argument("--llm_path", default=None, help="ST2SI: where the backbone it was trained on is now")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="fp32", choices=list(BACKBONE_PRECISIONS), help="ST2SI's backbone weights")
    args = parser.parse_args(argv)
    transformers_logging.disable_progress_bar()
    try:
        recommender = load_recommender(args.model_file, args.llm_path, args.device, args.precision)
        if args.user is not None:
            top = recommender.recommend_users([args.user], args.topk, args.exclude_history)
        else:
            history = [item for item in args.history.split(",") if item.strip()]
            top = recommender.recommend([history], args.topk, args.exclude_history, args.truncate)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print("item_id\ttitle\tscore")
    for item, score in zip(top.items[0], top.scores[0]):
        print(f"{item}\t{recommender.titles[recommender.item_ids[item]]}\t{score:.4f}")


if __name__ == "__main__":
    main()
