"""ST2SI (Learning Transition Patterns by LLMs for Sequential Recommendation) as a RecBole plugin."""

from recbole_st2si import compat  # noqa: F401  (before RecBole: numpy 2, RecBole without its ray pin)

__version__ = "0.1.0"
