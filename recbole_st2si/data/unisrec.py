"""Reading a UniSRec-processed Amazon folder (``<Name>.train.inter``, ``.valid.inter``, ``.test.inter``,
``.text``, ``.item2index``, ``.user2index``), the layout UniSRec published and later text-based
recommenders reuse, so that RecBole's leave-one-out split gives back its exact validation and test rows.

Each ``.inter`` row holds a target and the (at most 50) items before it, as integer indices, and the
rows of a user are not in time order. A user's whole history is rebuilt by chaining the rows: the row
after ``(items, target)`` is the one whose list is ``(items + [target])[-50:]``. Taking the longest list
instead would lose the oldest items of every user with more than 51. Items are written in history order
with their positions as timestamps, so ``order: TO`` keeps that order.

An item's text is UniSRec's ``"title. categories. brand. "``: each field cleaned and closed by one period.
The fields are told apart by the category path, which starts with the category's root (``Industrial &
Scientific ...``) or is empty (``". ."``); titles and brands may hold periods themselves.
"""

import os
from collections import Counter, defaultdict

from .amazon import clean_text, note_short_user, usable_id

SPLITS = ("train", "valid", "test")
FIELD_END = ". "


class FolderError(Exception):
    """A UniSRec folder that cannot be converted (missing file, bad row, an index without text, rows that do not chain)."""


def _files(src):
    """The folder's six files, by role, named after the stem of its one ``<stem>.train.inter``."""
    if not os.path.isdir(src):
        raise FolderError(f"UniSRec folder not found: {src}")
    stems = sorted(file[: -len(".train.inter")] for file in os.listdir(src) if file.endswith(".train.inter"))
    if len(stems) != 1:
        raise FolderError(f"{src} holds {len(stems)} files <name>.train.inter, not one: {stems[:3]}")
    paths = {role: os.path.join(src, f"{stems[0]}.{role}") for role in ("text", "item2index", "user2index")}
    paths.update({split: os.path.join(src, f"{stems[0]}.{split}.inter") for split in SPLITS})
    for path in paths.values():
        if not os.path.isfile(path):
            raise FolderError(f"missing UniSRec file: {path}")
    return paths


def _lines(path):
    """Tab-separated fields of every non-empty line."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if line:
                yield number, line.split("\t")


def _index_map(path):
    """``{index: raw id}`` of an ``item2index`` / ``user2index`` file (``raw id <tab> index`` lines)."""
    ids = {}
    for number, fields in _lines(path):
        if len(fields) != 2 or not fields[1].isdigit():
            raise FolderError(f"{path}, line {number}: expected 'id<tab>index'")
        if not usable_id(fields[0]):
            raise FolderError(f"{path}, line {number}: {fields[0]!r} cannot be a RecBole token (space, quote or NA word)")
        ids[int(fields[1])] = fields[0]
    return ids


def _rows(path):
    """``{user index: [(item list, target)]}`` of one ``.inter`` file (header checked)."""
    rows = defaultdict(list)
    lines = _lines(path)
    header = next(lines, (0, []))[1]
    if [field.split(":")[0] for field in header] != ["user_id", "item_id_list", "item_id"]:
        raise FolderError(f"{path}: header is not user_id:token item_id_list:token_seq item_id:token")
    for number, fields in lines:
        try:
            user, items, target = int(fields[0]), [int(item) for item in fields[1].split()], int(fields[2])
        except (ValueError, IndexError):
            raise FolderError(f"{path}, line {number}: expected 'user<tab>item item ...<tab>item' indices") from None
        rows[user].append((items, target))
    return rows


def chain_history(train_rows, valid, test, max_items):
    """One user's whole history from its rows, or None when they do not form one chain.

    Every row's target follows its list; the next row's list is this row's list and target, cut to the
    ``max_items`` most recent. The chain starts at the row no other row leads to and must end in the
    validation row, whose successor is the test row.
    """
    following = {tuple(items): (items, target) for items, target in train_rows + [valid]}
    if len(following) != len(train_rows) + 1:
        return None
    successors = {tuple((items + [target])[-max_items:]) for items, target in train_rows}
    starts = [key for key in following if key not in successors]
    if len(starts) != 1:
        return None
    history = list(starts[0])
    key = starts[0]
    while key in following:
        items, target = following.pop(key)
        history.append(target)
        key = tuple((items + [target])[-max_items:])
    if following or list(key) != test[0]:
        return None
    return history + [test[1]]


def root_category(texts):
    """The words that begin most category paths: the longest word prefix of a field after the title
    that more than half of the texts have (e.g. ``Industrial & Scientific``); '' if none."""
    prefixes = Counter()
    for text in texts:
        fields = text.strip().rstrip(".").split(FIELD_END)[1:]
        prefixes.update({" ".join(words[:length]) for words in map(str.split, fields) for length in range(1, len(words) + 1)})
    shared = [prefix for prefix, count in prefixes.items() if count > len(texts) / 2]
    return max(shared, key=len, default="")


def split_text(text, root):
    """``(title, brand, categories)`` of UniSRec's ``"title. categories. brand. "``, or None if no
    category field (empty, or starting with ``root``) follows the title."""
    fields = text.strip()[:-1].split(FIELD_END) if text.strip().endswith(".") else [text.strip()]
    for position in range(len(fields) - 1, 0, -1):
        field = fields[position]
        if field == "" or (root and (field == root or field.startswith(root + " "))):
            title, brand = FIELD_END.join(fields[:position]), FIELD_END.join(fields[position + 1 :])
            return clean_text(title), clean_text(brand), clean_text(field)
    return None


def _item_fields(path, counts):
    """``{asin: (title, brand, categories)}`` of the ``.text`` file."""
    lines = _lines(path)
    next(lines, None)
    texts = {}
    for number, fields in lines:
        if len(fields) != 2:
            raise FolderError(f"{path}, line {number}: expected 'asin<tab>text'")
        texts[fields[0]] = fields[1]
    root = root_category(texts.values())
    items = {}
    for asin, text in texts.items():
        split = split_text(text, root)
        if split is None:
            counts["unisrec: text without a category field (written whole as the title)"] += 1
            split = (clean_text(text).rstrip("."), "", "")
        items[asin] = split
    return items


def convert(src, counts, max_items=50):
    """UniSRec folder -> (interactions [(user id, asin, position)] grouped by user, items {asin: fields})."""
    paths = _files(src)
    item_of, user_of = _index_map(paths["item2index"]), _index_map(paths["user2index"])
    rows = {split: _rows(paths[split]) for split in SPLITS}
    fields = _item_fields(paths["text"], counts)
    inters = []
    for user in sorted(set().union(*(rows[split] for split in SPLITS))):
        held_out = [rows[split].get(user, []) for split in ("valid", "test")]
        if [len(part) for part in held_out] != [1, 1]:
            raise FolderError(f"user index {user} has {len(held_out[0])} validation and {len(held_out[1])} test rows, not one each")
        history = chain_history(rows["train"].get(user, []), held_out[0][0], held_out[1][0], max_items)
        if history is None:
            raise FolderError(f"the rows of user index {user} do not chain into one history "
                              f"(each row's list + target = the next row's list, cut to {max_items} items)")
        if user not in user_of:
            raise FolderError(f"user index {user} is not in {paths['user2index']}")
        for index in history:
            if item_of.get(index) not in fields:
                raise FolderError(f"item index {index} has no text in {paths['text']}"
                                  if index in item_of else f"item index {index} is not in {paths['item2index']}")
        note_short_user("unisrec", len(history), counts)
        inters.extend((user_of[user], item_of[index], position) for position, index in enumerate(history))
    used = sorted({asin for _, asin, _ in inters})
    return inters, {asin: fields[asin] for asin in used}
