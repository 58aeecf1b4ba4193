"""The one exception type for mistakes a user can make and fix.

The CLI prints a ``FadrmError`` as a single line and exits non-zero; every
other exception is a bug and keeps its traceback.
"""


class FadrmError(Exception):
    """A problem caused by the user's input, with a message that names the fix."""
