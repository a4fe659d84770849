"""Errors caused by what the user asked for, reported as one clear message instead of a traceback."""


class UserInputError(ValueError):
    """A configuration, dataset or path supplied by the user cannot be used.

    The command-line entry points print its message and exit with status 2.
    """
