"""One writer per output: an advisory lock that a second fadrm process finds taken.

The lock is ``flock`` on ``<folder>/.fadrm.lock`` for an output folder, or on ``<file>.lock`` for a
file several runs may write (a teacher checkpoint, a statistics file); it holds the writer's process id. The kernel
releases it when the process ends however it ends (kill -9 included), so a lock left by a dead
process is simply taken over; the file is removed when its writer finishes. Under torchrun the
process group is one writer: rank 0 holds the lock for every rank.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path
from typing import Iterator

from .errors import FadrmError

LOCK_NAME = ".fadrm.lock"


@contextlib.contextmanager
def exclusive_folder(folder: str | Path, option: str) -> Iterator[None]:
    """Hold ``folder``'s lock (creating the folder if needed) for the block.

    Args:
        folder: the output folder.
        option: the option that named it, for the message (``--out``).

    Raises:
        FadrmError: another process holds the lock (its process id, what to do), before anything
            is written.
    """
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with _held(folder / LOCK_NAME, f"{folder} is in use", option):
            yield
    finally:
        if created and folder.exists() and not any(folder.iterdir()):
            folder.rmdir()  # a refused run leaves no folder it made


@contextlib.contextmanager
def exclusive_file(path: str | Path, option: str) -> Iterator[None]:
    """Hold the lock of one file fadrm writes where other runs may write it too (a teacher checkpoint, a
    teacher's statistics file): ``<file>.lock`` beside it, for the block.

    Raises:
        FadrmError: another process holds it (its process id, what to do), before anything is written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _held(path.with_name(f"{path.name}.lock"), f"{path} is being written", option):
        yield


@contextlib.contextmanager
def _held(path: Path, busy: str, option: str) -> Iterator[None]:
    """Hold the ``flock`` of ``path`` (made, with this process's id, and removed after), or refuse."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise FadrmError(
                f"{busy} by another fadrm process (pid {holder}); wait for it to finish, or choose another {option}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            # Removed while still held: a process that opens the name afterwards makes a fresh lock.
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def lock_or_nothing(folder: str | Path, option: str, holds: bool) -> contextlib.AbstractContextManager[None]:
    """:func:`exclusive_folder` where ``holds`` (the process that writes), else a context that does nothing."""
    return exclusive_folder(folder, option) if holds else contextlib.nullcontext()
