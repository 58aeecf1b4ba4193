"""Which folders fadrm writes into: empty ones and its own, never a user's files or a dataset's.

An output folder is fadrm's when it is empty or holds fadrm's marker for that kind of output
(``run.json`` for a distilled set, ``evaluation.json`` for an evaluation). Any other folder is
refused in one line, ``--overwrite`` included, and ``--overwrite`` removes only the files fadrm
names as its own (:func:`remove_own_files`); the dataset's folder is never an output.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Iterable

from .errors import FadrmError
from .locks import LOCK_NAME

# A file fadrm set aside as damaged or stale (kept, never deleted, see fadrm.io.set_aside).
SET_ASIDE = re.compile(r".+\.(damaged|stale)(\.\d+)?")


def holds_nothing(folder: Path) -> bool:
    """Whether ``folder`` is missing or empty (its lock aside)."""
    return not folder.exists() or not any(path.name != LOCK_NAME for path in folder.iterdir())


def inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies under it (links followed as far as they lead: a loop of links
    is left for the operating system to refuse when the path is used)."""
    path, folder = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    return path == folder or folder in path.parents


def same_place(path: Path, other: Path) -> bool:
    """Whether two paths name the same place (links followed as far as they lead)."""
    return os.path.realpath(path) == os.path.realpath(other)


def refuse_data_folder(out: Path, data_folder: Path | None, option: str) -> None:
    """Refuse an output folder in the dataset's own folder: fadrm never writes among a dataset's files."""
    if data_folder is not None and data_folder.exists() and inside(out, data_folder):
        raise FadrmError(
            f"{option} {out} lies in the dataset's folder {data_folder}; fadrm never writes among a dataset's "
            f"files: choose another {option}"
        )


def remove_own_files(
    folder: Path,
    own: Callable[[Path], bool],
    log: Callable[[str], None],
    reusable: Callable[[Path], bool] = lambda relative: False,
) -> None:
    """Delete the files under ``folder`` that ``own`` names as this kind of output's (given their path
    relative to ``folder``), then the folders left empty; anything else (a user's file, another output
    inside it, a copy fadrm set aside as damaged) is kept, with one line saying how many. Own files that
    ``reusable`` names stay for the next run to check and reuse (their records say what they were made
    from)."""
    if not folder.exists():
        return
    kept = 0
    for path in sorted(folder.rglob("*"), reverse=True):
        relative = path.relative_to(folder)
        if path.is_file() and reusable(relative):
            continue
        if path.is_file() and not path.is_symlink() and own(relative) and not SET_ASIDE.fullmatch(path.name):
            path.unlink()
        elif path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
            path.rmdir()
        elif not path.is_dir():
            kept += 1
    if kept:
        log(f"--overwrite: kept {kept} other files in {folder} (not this kind of output's own)")


def matches_any(patterns: Iterable[str]) -> Callable[[Path], bool]:
    """A test of a relative path (POSIX form) against full-match regular expressions."""
    compiled = [re.compile(p) for p in patterns]
    return lambda relative: any(p.fullmatch(relative.as_posix()) for p in compiled)
