"""ST2SI models."""

from recbole_st2si.model.st2si import ST2SI

__all__ = ["ST2SI"]
