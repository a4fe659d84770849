"""Convert Amazon 2018 data into RecBole atomic files (``<name>.inter``, ``<name>.item``).

    python -m recbole_st2si.data.prepare amazon --reviews R --meta M --out dataset/NAME --name NAME
    python -m recbole_st2si.data.prepare recformer --src FOLDER --out dataset/NAME --name NAME
    python -m recbole_st2si.data.prepare unisrec --src FOLDER --out dataset/NAME --name NAME
    python -m recbole_st2si.data.prepare merge --inputs dataset/Food dataset/Cell --out dataset/FoodCell --name FoodCell

Every model (ST2SI and RecBole's SASRec, GRU4Rec, BERT4Rec, FDSA, S3Rec) then reads the same files with
``--dataset=NAME --data_path=dataset``. Text fields are cleaned so that RecBole's reader gives them back
exactly (see ``guard``); bad input lines are skipped and counted, and a run that fails writes nothing.
Merging is also a library call, :func:`merge_domains` (``--dataset=Food,Cell`` uses it).
"""

import argparse
import os
import sys
from collections import Counter

from recbole_st2si.errors import UserInputError

from . import amazon, recformer, unisrec

INTER_HEADER = ("user_id:token", "item_id:token", "timestamp:float")
ITEM_HEADER = ("item_id:token", "title:token_seq", "brand:token_seq", "categories:token_seq")
PROG = "python -m recbole_st2si.data.prepare"


class PrepareError(UserInputError):
    """A problem that stops the conversion before anything is written (reported with exit status 2)."""


def guard(text):
    """Make a cleaned text field survive ``pandas.read_csv``: a field opening with a quote is parsed as a
    quoted field (and breaks the whole load), and a field equal to an NA word (``N/A``, ``None``) becomes
    empty. A leading space avoids both, and RecBole drops it again when it splits ``token_seq`` on spaces."""
    return " " + text if text.startswith('"') or (text and text in amazon.PANDAS_NA) else text


def _write_tsv(path, header, rows):
    """Write tab-separated rows under a typed RecBole header."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("\t".join(header) + "\n")
        for row in rows:
            f.write("\t".join(map(str, row)) + "\n")


def write_atomic(out_dir, name, inters, items):
    """Write both files under temporary names and rename them only once both are complete, so a failure
    never leaves a half-written dataset (nor destroys an earlier one)."""
    os.makedirs(out_dir, exist_ok=True)
    targets = [os.path.join(out_dir, f"{name}.{suffix}") for suffix in ("inter", "item")]
    temps = [f"{target}.tmp" for target in targets]
    try:
        _write_tsv(temps[0], INTER_HEADER, inters)
        _write_tsv(temps[1], ITEM_HEADER, ((asin, *map(guard, fields)) for asin, fields in items.items()))
        for temp, target in zip(temps, targets):
            os.replace(temp, target)
    finally:
        for temp in temps:
            if os.path.exists(temp):
                os.remove(temp)
    return targets


def statistics(name, inters):
    """The dataset statistics of the paper's Table 1 for the written interactions."""
    n_users = len({user for user, _, _ in inters})
    n_items = len({item for _, item, _ in inters})
    return "\n".join([
        f"Statistics of {name}:",
        f"  #users   {n_users:>12,}",
        f"  #items   {n_items:>12,}",
        f"  #inters  {len(inters):>12,}",
        f"  avg. n   {len(inters) / n_users:>12.2f}",
        f"  density  {100 * len(inters) / (n_users * n_items):>11.4f}%",
    ])


def report(counts):
    """Print how many input records were skipped or treated specially, per reason."""
    if counts:
        print("Input report (count per reason):")
        for reason, count in sorted(counts.items()):
            print(f"  {count:>10,}  {reason}")


def _require_files(*paths):
    """Fail early, before reading anything, when an input file is missing."""
    for path in paths:
        if not os.path.isfile(path):
            raise PrepareError(f"input file not found: {path}")


def run_amazon(args, counts):
    """Raw reviews + meta dumps, with the optional Recformer-style and k-core filters."""
    _require_files(args.reviews, args.meta)
    return amazon.convert(
        args.reviews, args.meta, counts,
        k=args.k_core, min_user_inter=args.min_user_inter, user_fraction=args.user_fraction, seed=args.seed,
    )


def run_recformer(args, counts):
    """A Recformer-processed folder, keeping its train/val/test assignment under RecBole's LOO split."""
    try:
        return recformer.convert(args.src, counts)
    except recformer.FolderError as err:
        raise PrepareError(str(err)) from err


def run_unisrec(args, counts):
    """A UniSRec-processed folder: each user's history chained from its rows, its split kept under RecBole's LOO."""
    try:
        return unisrec.convert(args.src, counts)
    except unisrec.FolderError as err:
        raise PrepareError(str(err)) from err


def read_atomic(folder):
    """Rows of ``<folder>/<basename>.inter`` and ``.item`` as written by this tool (headers checked)."""
    name = os.path.basename(os.path.normpath(folder))
    tables = []
    for suffix, header in (("inter", INTER_HEADER), ("item", ITEM_HEADER)):
        path = os.path.join(folder, f"{name}.{suffix}")
        _require_files(path)
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().split("\n")
        except UnicodeDecodeError as err:
            raise PrepareError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        if tuple(lines[0].split("\t")) != header:
            raise PrepareError(f"{path}: header is not {' '.join(header)} (prepare it with this tool first)")
        rows = [line.split("\t") for line in lines[1:] if line]
        if any(len(row) != len(header) for row in rows):
            raise PrepareError(f"{path}: a row does not have {len(header)} tab-separated fields")
        tables.append(rows)
    return name, tables[0], tables[1]


def merged_rows(folders, counts):
    """Several prepared domains in one dataset; ids become ``<domain>:<id>`` so domains never share a user or item."""
    names = Counter(os.path.basename(os.path.normpath(folder)) for folder in folders)
    for domain, count in names.items():
        if count > 1:
            raise PrepareError(f"two inputs are named {domain}: domain names must differ")
    inters, items = [], {}
    for folder in folders:
        domain, rows, item_rows = read_atomic(folder)
        inters += [(f"{domain}:{user}", f"{domain}:{item}", time) for user, item, time in rows]
        items.update((f"{domain}:{item}", tuple(fields)) for item, *fields in item_rows)
        counts[f"merge: interactions from {domain}"] += len(rows)
    return inters, items


def run_merge(args, counts):
    """The merge subcommand: :func:`merged_rows` of ``--inputs``."""
    return merged_rows(args.inputs, counts)


def write_dataset(out_dir, name, inters, items):
    """:func:`write_atomic` of converted rows, refused when no interaction is left."""
    if not inters:
        raise PrepareError("no interactions left after reading and filtering; nothing written")
    return write_atomic(out_dir, name, inters, items)


def dataset_name(out_dir, name=None):
    """The dataset's file stem: ``name``, else the output folder's name."""
    return name or os.path.basename(os.path.normpath(out_dir))


def merge_domains(folders, out_dir, name=None):
    """Merge prepared domain folders (each folder's name is its domain) into ``<out_dir>/<name>.inter``
    and ``.item``, ids prefixed with their domain; returns the two paths.

    A missing or malformed domain, or two domains of one name, is a :class:`PrepareError` (a
    :class:`~recbole_st2si.errors.UserInputError`) of one line, and nothing is written."""
    try:
        inters, items = merged_rows(folders, Counter())
        return write_dataset(out_dir, dataset_name(out_dir, name), inters, items)
    except OSError as err:
        raise PrepareError(f"cannot merge {', '.join(map(str, folders))} into {out_dir}: {err}") from None


def _fraction(text):
    """argparse type: a float in (0, 1]."""
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _count(text):
    """argparse type: a non-negative int."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _add_output(parser):
    """The output options every subcommand shares."""
    parser.add_argument("--out", required=True, help="output folder, usually <data_path>/<name>")
    parser.add_argument("--name", help="dataset name (file stem); default: the output folder's name")


def build_parser():
    """The command line: one subcommand per kind of input."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    raw = sub.add_parser("amazon", help="raw Amazon 2018 reviews + meta (gzip or plain JSON lines)")
    raw.add_argument("--reviews", required=True, help="<Category>_5.json.gz (reviewerID, asin, unixReviewTime)")
    raw.add_argument("--meta", required=True, help="meta_<Category>.json.gz (asin, title, brand, category)")
    _add_output(raw)
    raw.add_argument("--min-user-inter", type=_count, default=0,
                     help="keep users with at least this many interactions (Recformer: 4, i.e. more than 3)")
    raw.add_argument("--user-fraction", type=_fraction, default=1.0,
                     help="keep this random fraction of the users, drawn after the other filters")
    raw.add_argument("--seed", type=int, default=0, help="seed of --user-fraction's sampling")
    raw.add_argument("--k-core", type=_count, default=0,
                     help="iteratively keep users and items with at least K interactions (applied first)")
    raw.set_defaults(run=run_amazon)

    folder = sub.add_parser("recformer", help="a Recformer-processed folder (train/val/test/smap/umap/meta_data.json)")
    folder.add_argument("--src", required=True, help="the Recformer folder")
    _add_output(folder)
    folder.set_defaults(run=run_recformer)

    uni = sub.add_parser("unisrec", help="a UniSRec-processed folder (<name>.train/valid/test.inter, .text, .item2index, "
                                         ".user2index)")
    uni.add_argument("--src", required=True, help="the UniSRec folder (one <stem>.train.inter and its siblings)")
    _add_output(uni)
    uni.set_defaults(run=run_unisrec)

    merge = sub.add_parser("merge", help="merge prepared domains (e.g. Food + Cell) with domain-prefixed ids")
    merge.add_argument("--inputs", required=True, nargs="+", help="prepared folders; each folder's name is its domain")
    _add_output(merge)
    merge.set_defaults(run=run_merge)
    return parser


def main(argv=None):
    """Run one conversion; any input problem ends with one error line and exit status 2, never a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    name = dataset_name(args.out, args.name)
    counts = Counter()
    try:
        inters, items = args.run(args, counts)
        paths = write_dataset(args.out, name, inters, items)
    except (PrepareError, OSError, UnicodeDecodeError) as err:
        report(counts)
        parser.exit(2, f"{PROG} {args.command}: error: {err}\n")
    print(statistics(name, inters))
    report(counts)
    print("Wrote " + " and ".join(paths))
    if os.path.basename(os.path.normpath(args.out)) != name:
        print(f"Note: RecBole reads <data_path>/{name}/{name}.inter; this folder is not named {name}.", file=sys.stderr)


if __name__ == "__main__":
    main()
