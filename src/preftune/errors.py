"""The one exception type for a user's mistake.

The CLI catches `PreftuneError`, prints its message and exits with status 2, without a
traceback: bad input is the user's to fix, not a bug to debug. Anything else is a bug and
keeps its traceback.
"""


class PreftuneError(Exception):
    """A user's mistake (bad file, bad column, bad setting). The message says what and where."""
