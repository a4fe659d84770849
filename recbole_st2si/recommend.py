"""Recommend from a saved run: the top-k items for a known user or for any history of item ids.

    python -m recbole_st2si.recommend --model_file saved/ST2SI-Dec-02-2026_10-00-00.pth --user 196 --topk 10
    python -m recbole_st2si.recommend --model_file saved/SASRec-....pth --history 50,172,133 --exclude_history

ST2SI (every ``train_stage``) and RecBole's sequential models (SASRec, GRU4Rec, BERT4Rec, FDSA,
S3Rec, ...) are served the same way. A run that saves its checkpoint also writes a *serving file*
beside it (``<checkpoint>.serving.pth``, see :func:`recbole_st2si.run_files.serving_info`): the
configuration, the item vocabulary and titles, every user's history, the item features FDSA or S3Rec
embed, and, for ST2SI, the item token table and which backbone it ran on with a hash of the weights
the checkpoint does not hold (an ``ilp`` checkpoint holds only the ILP; its frozen backbone comes
from ``llm_path`` again and must be the same). In Python:
:func:`recbole_st2si.serving.load_recommender`.

Histories are raw item ids, oldest first. A model reads at most ``MAX_ITEM_LIST_LENGTH`` items, the
most recent ones, as in training and evaluation: a known user's history is cut so, while a given
history that is longer is refused unless ``truncate`` (``--truncate``) asks for the cut.
"""

import argparse
import sys

from transformers.utils import logging as transformers_logging

from recbole_st2si.errors import UserInputError
from recbole_st2si.serving import load_recommender
from recbole_st2si.serving.backends import BACKBONE_PRECISIONS
from recbole_st2si.serving.recommender import EMPTY_HISTORY

__all__ = ["load_recommender", "main"]


def _checked_request(args):
    """The request's own mistakes, refused before the model is read: a topk below 1, an empty history."""
    if args.topk < 1:
        raise UserInputError(f"topk must be at least 1; got {args.topk}")
    if args.history is None:
        return None
    history = [item.strip() for item in args.history.split(",") if item.strip()]
    if not history:
        raise UserInputError(EMPTY_HISTORY)
    return history


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
        history = _checked_request(args)
        recommender = load_recommender(args.model_file, args.llm_path, args.device, args.precision)
        if history is None:
            top = recommender.recommend_users([args.user], args.topk, args.exclude_history)
        else:
            top = recommender.recommend([history], args.topk, args.exclude_history, args.truncate)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print("item_id\ttitle\tscore")
    for item, score in zip(top.items[0], top.scores[0]):
        print(f"{item}\t{recommender.titles[recommender.item_ids[item]]}\t{score:.4f}")


if __name__ == "__main__":
    main()
