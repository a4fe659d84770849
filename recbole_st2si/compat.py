"""What RecBole 1.2.1 needs to run on today's libraries; imported by the package before RecBole.

RecBole is installed without its dependencies (``pip install --no-deps recbole==1.2.1``, as
``scripts/install.sh`` does) because its metadata pins ``ray<=2.6.3``, a Ray that only its own
``run_hyper`` helper imports and that has no wheels for Python 3.12+; ``requirements.txt`` lists its
real requirements.

numpy 2: RecBole's ``Config`` aliases the names numpy 1.24 removed (``np.float = np.float_``,
``np.complex = np.complex_``, ``np.unicode = np.unicode_``, ...), which its metrics and datasets then
use. numpy 2 removed ``np.float_``, ``np.complex_`` and ``np.unicode_`` as well, so that aliasing
fails. They are restored here with the types numpy 1 gave them, and RecBole's code runs unchanged.
"""

import importlib.util

import numpy as np

NUMPY1_ALIASES = {"float_": np.float64, "complex_": np.complex128, "unicode_": np.str_}


def restore_numpy1_aliases():
    """Give numpy 2 back the aliases RecBole's ``Config`` reads (a no-op on numpy 1)."""
    for name, numpy_type in NUMPY1_ALIASES.items():
        if not hasattr(np, name):
            setattr(np, name, numpy_type)


def require_recbole():
    """A clear message where RecBole is missing, e.g. after a plain ``pip install .``."""
    if importlib.util.find_spec("recbole") is None:
        raise ImportError(
            "RecBole is not installed: install it without its stale ray pin, "
            "`pip install --no-deps recbole==1.2.1` (scripts/install.sh does this)"
        )


require_recbole()
restore_numpy1_aliases()
