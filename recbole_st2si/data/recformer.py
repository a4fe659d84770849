"""Reading a Recformer-processed Amazon folder (``train.json``, ``val.json``, ``test.json``, ``smap.json``,
``umap.json``, ``meta_data.json``) so that RecBole's leave-one-out split gives back its exact split.

Each user's items are written in the order train items, validation item, test item with increasing
timestamps (their positions), so ``eval_args: {split: {LS: valid_and_test}, order: TO, group_by: user}``
makes the test item the last target, the validation item the one before and the rest training.
"""

import json
import os

from .amazon import clean_text, note_short_user, usable_id

FILES = ("train", "val", "test", "smap", "umap", "meta_data")


class FolderError(Exception):
    """A Recformer folder that cannot be read at all (missing or unparsable file)."""


def load_folder(folder):
    """Read the six JSON files of the folder into a dict keyed by their stem."""
    data = {}
    for stem in FILES:
        path = os.path.join(folder, f"{stem}.json")
        if not os.path.isfile(path):
            raise FolderError(f"missing Recformer file: {path}")
        try:
            with open(path, encoding="utf-8") as f:
                data[stem] = json.load(f)
        except (ValueError, UnicodeDecodeError) as err:
            raise FolderError(f"cannot parse {path}: {err}") from err
        if not isinstance(data[stem], dict):
            raise FolderError(f"{path} does not hold a JSON object")
    return data


def _index(value):
    """Recformer indices are ints in lists and map values but strings as JSON keys: compare them as ints."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _user_order(key):
    """Write users in index order (numeric, not string order), keys that are not numbers last."""
    index = _index(key)
    return (index is None, index or 0, key)


def _user_items(data, key, item_of):
    """The user's asins in order train, val, test, or None when a list is malformed or an index is unknown."""
    lists = [data[split].get(key, []) for split in ("train", "val", "test")]
    if not all(isinstance(items, list) for items in lists):
        return None
    asins = [item_of.get(_index(item)) for items in lists for item in items]
    return None if None in asins else asins


def _item_fields(meta, asin, counts):
    """(title, brand, categories) of an item; an item without metadata keeps empty text (its position matters)."""
    attrs = meta.get(asin)
    if not isinstance(attrs, dict):
        counts["recformer: item without meta_data entry (written with empty text)"] += 1
        attrs = {}
    return tuple(clean_text(attrs.get(key)) for key in ("title", "brand", "category"))


def convert(src, counts):
    """Recformer folder -> (interactions [(user id, asin, position)] grouped by user, items {asin: fields})."""
    data = load_folder(src)
    item_of = {_index(index): asin for asin, index in data["smap"].items() if usable_id(asin)}
    user_of = {_index(index): user for user, index in data["umap"].items() if usable_id(user)}
    keys = sorted(set(data["train"]) | set(data["val"]) | set(data["test"]), key=_user_order)
    inters = []
    for key in keys:
        user, asins = user_of.get(_index(key)), _user_items(data, key, item_of)
        if user is None or asins is None:
            counts["recformer: user with an index missing from umap/smap or a malformed list (user skipped)"] += 1
            continue
        note_short_user("recformer", len(asins), counts)
        inters.extend((user, asin, position) for position, asin in enumerate(asins))
    used = sorted({asin for _, asin, _ in inters})
    return inters, {asin: _item_fields(data["meta_data"], asin, counts) for asin in used}
