"""Reading the raw Amazon 2018 dumps (``<Category>_5.json.gz`` reviews, ``meta_<Category>.json.gz``).

Also holds the text and id rules shared by every converter: whatever they write must come back
unchanged through RecBole's atomic-file reader (``pandas.read_csv`` on tab-separated lines, then
``token_seq`` fields split on single spaces) and the consumer's re-join with one space.
"""

import ast
import gzip
import html
import json
import os
import random
import re
import zlib
from collections import Counter, defaultdict

from tqdm import tqdm

# Whole fields that ``pandas.read_csv`` turns into NaN by default (``pandas._libs.parsers.STR_NA_VALUES``).
PANDAS_NA = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
})
# C0/C1 control characters: pandas' CSV parser chokes on some (e.g. carriage returns), so they become spaces.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_GZIP_MAGIC = b"\x1f\x8b"


def clean_text(value):
    """Unescape HTML entities and collapse every whitespace run to one space, so that splitting the
    text on spaces and joining it again gives it back exactly; a list (the meta ``category``) is joined."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        value = " ".join(str(part) for part in value)
    return " ".join(_CONTROL.sub(" ", html.unescape(str(value))).split())


def usable_id(value):
    """Whether an id can be a RecBole ``token`` field as is: ``token`` fields are not split, so an id with
    whitespace, an opening quote or a pandas NA word would be changed or lost on reading."""
    return (
        isinstance(value, str)
        and value not in PANDAS_NA
        and not value.startswith('"')
        and value == clean_text(value)
        and " " not in value
    )


def note_short_user(source, n_items, counts):
    """Count the users RecBole's leave-one-out cannot split as the source did, so the report shows them."""
    if n_items == 3:
        counts[f"{source}: users with 3 items (RecBole's LOO trains on their validation item)"] += 1
    elif n_items < 3:
        counts[f"{source}: users with fewer than 3 items (no valid/test target)"] += 1


def _byte_lines(path, counts, what):
    """Yield the raw lines of a gzip or plain file (told apart by the gzip magic number, not the name);
    a truncated gzip stream ends the file with a count instead of a crash."""
    with open(path, "rb") as probe:
        opener = gzip.open if probe.read(2) == _GZIP_MAGIC else open
    try:
        with opener(path, "rb") as f:
            yield from f
    except (EOFError, OSError, zlib.error):
        counts[f"{what}: file truncated or corrupt (rest of file skipped)"] += 1


def parse_line(line):
    """One record of a JSON-lines dump: strict JSON, or the Python-literal lines of older dumps."""
    try:
        return json.loads(line)
    except ValueError:
        try:
            return ast.literal_eval(line)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return None


def read_records(path, counts, what):
    """Yield one dict per line; lines that are not UTF-8 or not a dict are counted in ``counts`` and skipped."""
    name = os.path.basename(path)
    for raw in tqdm(_byte_lines(path, counts, what), desc=f"reading {name}", unit=" lines"):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8").lstrip("\ufeff")
        except UnicodeDecodeError:
            counts[f"{what}: line not valid UTF-8"] += 1
            continue
        record = parse_line(line)
        if isinstance(record, dict):
            yield record
        else:
            counts[f"{what}: malformed line"] += 1


def read_meta(path, counts):
    """Map asin -> (title, brand, categories) for the items with a non-empty title (first record of an asin wins)."""
    items = {}
    for record in read_records(path, counts, "meta"):
        asin = record.get("asin")
        if not usable_id(asin):
            counts["meta: missing or unusable asin"] += 1
        elif asin in items:
            counts["meta: repeated asin (first kept)"] += 1
        elif not clean_text(record.get("title")):
            counts["meta: item without title"] += 1
        else:
            items[asin] = tuple(clean_text(record.get(key)) for key in ("title", "brand", "category"))
    return items


def _review_time(value):
    """``unixReviewTime`` as an int, or None when it is absent or not a number."""
    if isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return None


def read_reviews(path, items, counts):
    """Group the reviews of known items by user (file order), dropping exact (user, item, time) repeats."""
    sequences, seen = defaultdict(list), set()
    for record in read_records(path, counts, "reviews"):
        user, asin, time = record.get("reviewerID"), record.get("asin"), _review_time(record.get("unixReviewTime"))
        if not usable_id(user) or not isinstance(asin, str) or time is None:
            counts["reviews: missing or unusable reviewerID/asin/unixReviewTime"] += 1
        elif asin not in items:
            counts["reviews: unknown or untitled item"] += 1
        elif (user, asin, time) in seen:
            counts["reviews: duplicate (user, item, time)"] += 1
        else:
            seen.add((user, asin, time))
            sequences[user].append((asin, time))
    return dict(sequences)


def sort_by_time(sequences):
    """Order each user's reviews by time; the sort is stable, so ties keep their order in the file."""
    return {user: sorted(seq, key=lambda pair: pair[1]) for user, seq in sequences.items()}


def k_core(sequences, k):
    """Drop users and items with fewer than ``k`` interactions, repeatedly, until no more go."""
    size = None
    while size != sum(map(len, sequences.values())):
        size = sum(map(len, sequences.values()))
        item_count = Counter(asin for seq in sequences.values() for asin, _ in seq)
        sequences = {user: [pair for pair in seq if item_count[pair[0]] >= k] for user, seq in sequences.items()}
        sequences = {user: seq for user, seq in sequences.items() if len(seq) >= k}
    return sequences


def sample_users(sequences, fraction, seed):
    """Keep a seeded random ``fraction`` of the users (Recformer's user sampling), in their original order."""
    chosen = set(random.Random(seed).sample(sorted(sequences), round(len(sequences) * fraction)))
    return {user: seq for user, seq in sequences.items() if user in chosen}


def filter_sequences(sequences, k=0, min_user_inter=0, user_fraction=1.0, seed=0):
    """Apply the optional filters in this order: k-core, minimum interactions per user, user sampling."""
    if k > 1:
        sequences = k_core(sequences, k)
    sequences = {user: seq for user, seq in sequences.items() if len(seq) >= min_user_inter}
    if user_fraction < 1.0:
        sequences = sample_users(sequences, user_fraction, seed)
    return sequences


def convert(reviews, meta, counts, **filters):
    """Raw dumps -> (interactions [(user, asin, time)] grouped by user in time order, items {asin: fields})."""
    items = read_meta(meta, counts)
    sequences = filter_sequences(sort_by_time(read_reviews(reviews, items, counts)), **filters)
    inters = [(user, asin, time) for user, seq in sequences.items() for asin, time in seq]
    used = {asin for _, asin, _ in inters}
    return inters, {asin: items[asin] for asin in sorted(used)}
