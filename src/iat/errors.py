"""The one error type for bad input from the user.

The command line prints a UsageError's message on one line and exits with status 2 (a traceback only
with --debug); library callers catch it like any ValueError.
"""


class UsageError(ValueError):
    """Bad input from the user: a wrong name or value, a missing or damaged file, a mismatched model."""
