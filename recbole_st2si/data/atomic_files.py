"""RecBole's atomic files (``.inter``, ``.item``, ``.user``, ...) read as written, for every model.

RecBole reads them with ``pandas.read_csv`` on tab-separated lines, which also applies CSV rules that
a hand-written file does not expect: a field opening with ``"`` is parsed as a quoted field (a title
such as ``"Weird Al" Yankovic`` stops the whole load with a parser error that names no file), a field
that is an NA word (``NA``, ``None``, ``null``, ...) becomes missing, and a row with more fields than
the header (a tab inside a title) is shifted into the next columns without an error. While a dataset
loads (:func:`read_as_written`), every field is read exactly as written, only an empty field is
missing, and a row with more fields than its header is one error line naming the file and the line.
"""

import csv
import sys
from contextlib import contextmanager
from types import ModuleType

import pandas
from recbole.data.dataset import Dataset

from recbole_st2si.errors import UserInputError


def check_field_counts(path, separator, encoding):
    """Refuse a row with more fields than the header: pandas would shift it into other columns."""
    try:
        with open(path, encoding=encoding) as file:
            header_fields = file.readline().count(separator) + 1
            for number, line in enumerate(file, start=2):
                fields = line.count(separator) + 1
                if fields > header_fields:
                    raise UserInputError(
                        f"{path}, line {number}: {fields} fields, but the header has {header_fields}: a field holds "
                        f"the field separator {separator!r} (write it as a space)"
                    )
    except UnicodeDecodeError as error:
        raise UserInputError(f"{path} is not {encoding} text ({error.reason})") from None


class _PandasReadingAsWritten(ModuleType):
    """pandas as RecBole's dataset module sees it while a dataset loads: its ``read_csv`` checks
    the rows' field counts and reads every field as written."""

    def __getattr__(self, name):
        return getattr(pandas, name)

    @staticmethod
    def read_csv(filepath, delimiter, encoding, **options):
        check_field_counts(filepath, delimiter, encoding)
        return pandas.read_csv(filepath, delimiter=delimiter, encoding=encoding, quoting=csv.QUOTE_NONE,
                               keep_default_na=False, na_values=[""], **options)


@contextmanager
def read_as_written():
    """RecBole's ``Dataset._load_feat``, the one reader of every atomic file, reads fields as written
    inside this block."""
    recbole_module = sys.modules[Dataset.__module__]
    original = recbole_module.pd
    recbole_module.pd = _PandasReadingAsWritten("pandas")
    try:
        yield
    finally:
        recbole_module.pd = original
