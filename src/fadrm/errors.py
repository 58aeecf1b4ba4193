"""The one exception type for mistakes a user can make and fix, and the operating system's refusals.

The CLI prints a ``FadrmError`` as a single line and exits 2, an operating-system refusal of
:data:`SYSTEM_FAULTS` (disk full, permissions, ...) as a single line and exits 3; every other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os


class FadrmError(Exception):
    """A problem caused by the user's input, with a message that names the fix."""


class GroupRefusal(FadrmError):
    """A refusal every process of a torchrun group raises alike (it depends only on the settings, the data and
    the group's size, such as too many processes for the batch): only rank 0 prints it, so the user reads it
    once."""


class Stopped(Exception):
    """The command stopped because one of its processes was stopped by a signal (a ``--jobs`` worker killed
    outright); every finished result is kept and the same command continues. ``status`` is the exit status
    a shell shows for that signal (128 + its number)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


# Operating-system refusals that are the machine's state, not fadrm's bug, and what to do about each.
# The command exits with SYSTEM_FAULT_EXIT; every file fadrm writes is renamed into place only when
# complete, so the same command resumes once the cause is fixed.
SYSTEM_FAULTS = {
    errno.ENOSPC: "free some space (or write elsewhere), then run the same command again to resume",
    errno.EDQUOT: "the disk quota is used up: free some space, then run the same command again to resume",
    errno.EACCES: "fadrm may not use it: change its permissions or choose another path",
    errno.EPERM: "the system does not allow it: change the file's attributes or choose another path",
    errno.EROFS: "the file system is read-only: choose a path on a writable one",
    errno.ELOOP: "the path runs through a loop of symbolic links: fix or replace the link",
    errno.ENAMETOOLONG: "the path or a name in it is too long: choose a shorter one",
    errno.EMFILE: "too many files open: raise the limit (ulimit -n) or give fewer --workers",
    errno.ENFILE: "the system has too many files open: retry later or give fewer --workers",
    errno.ENOTDIR: "a file stands where a folder is expected: check the path",
    errno.EISDIR: "a folder stands where a file is expected: check the path",
    errno.EEXIST: "a file stands where a folder is to be made: check the path",
    errno.EIO: "the disk reported an input/output error: check it, then run the same command again",
}
SYSTEM_FAULT_EXIT = 3


def system_fault(exc: BaseException) -> str | None:
    """One line for an operating-system refusal in :data:`SYSTEM_FAULTS` (its path, the system's words
    and what to do), or None for any other exception."""
    if not isinstance(exc, OSError) or exc.errno not in SYSTEM_FAULTS:
        return None
    path = exc.filename if exc.filename is not None else "a file"
    also = f" -> {exc.filename2}" if exc.filename2 is not None else ""
    return f"{path}{also}: {exc.strerror or os.strerror(exc.errno)}; {SYSTEM_FAULTS[exc.errno]}"


def one_line(text: str) -> str:
    """``text`` with every control character (a newline in a file name, an escape sequence) shown escaped, so
    that a message stays one line and cannot drive the terminal."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in str(text))
