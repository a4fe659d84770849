"""The one command-line rule of every entry point (``run_recbole_st2si.py``, ``run_hyper.py``, the
benchmark, the scripts in ``benchmarks/``): each reads its own options, and hands the remaining
``--key=value`` arguments, parsed by :func:`parse_overrides`, to the run as ``config_dict``.
RecBole's Config would read the whole of ``sys.argv`` itself; the plugin's does not.

No RecBole import here, so that a command line is checked before the heavy imports.
"""

from recbole_st2si.errors import UserInputError


def split_list(text):
    """``a,b``, ``a b``, ``[a, b]`` or ``"['a', 'b']"`` as ``["a", "b"]``: the one reading of a list
    given as text (config files on the command line, list settings)."""
    items = (item.strip("'\"") for item in text.strip(" '\"[]").replace(",", " ").split())
    return [item for item in items if item]


def parse_overrides(arguments):
    """``--key=value`` arguments as ``{key: value}``, values as text (RecBole's Config types them as
    it types its own command line); anything else is a usage error."""
    overrides = {}
    for argument in arguments:
        key, has_value, value = argument[2:].partition("=")
        if not argument.startswith("--") or not key or not has_value:
            raise UserInputError(f"unrecognized argument {argument!r}: settings are given as --key=value")
        overrides[key] = value
    return overrides
