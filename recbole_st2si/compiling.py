"""``torch.compile`` where it pays, and never at the price of a run.

Compiling fuses the many small element-wise operations around the decoder's matrix products (norms,
rotary positions, activations), which on a CPU take as long as the products themselves, at the cost
of a minute or more of compile time: worth it for the frozen pass over a whole dataset and for the
epochs of the trained top layers, not for a small run. ``compile: auto`` compiles when the work
measured in tokens reaches :data:`COMPILE_MIN_TOKENS`.
"""

from logging import getLogger

import torch

# Measured on 2 Intel cores (results/frozen-pass, docs/feature_cache.md): compiling the pass takes 80 to
# 107 s and makes it 1.15 to 1.16x faster, so it repays its compile time from 2 to 2.6 million tokens on.
COMPILE_MIN_TOKENS = 2_000_000


def compile_wanted(setting, tokens):
    """Whether to compile work of ``tokens`` tokens under the ``compile`` setting (``auto``, True, False)."""
    return tokens >= COMPILE_MIN_TOKENS if setting == "auto" else bool(setting)


class Compiled:
    """``module`` compiled (dynamic shapes), called like the module and with its attributes; if
    compiling or running the compiled code fails (no C++ compiler, an operation the compiler does not
    support), it warns once and runs the module uncompiled."""

    def __init__(self, module):
        self.module, self.compiled = module, torch.compile(module, dynamic=True)

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as error:  # an optimisation only: fall back to the module itself
                first_line = (str(error).strip().splitlines() or [""])[0][:200]
                getLogger().warning(f"compiling {type(self.module).__name__} failed ({type(error).__name__}: "
                                    f"{first_line}); it runs uncompiled (compile: False skips the attempt)")
                self.compiled = None
        return self.module(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.module, name)
