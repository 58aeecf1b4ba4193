"""A dataset's content as one sha256: what a run read its images from, so that a result made from other data
is never reused.

The digest covers every file under the dataset's folder, by relative path and the sha256 of its bytes.
Hashing a large dataset (ImageNet-1k: 140 GB) takes minutes, so each file's digest is kept with its size
and modification time in a cache (``<cache>/digests/``): a file whose size and time are unchanged is not
read again, and any other is. The cache only saves time; a cache that cannot be written is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

from ..io import DAMAGE_ERRORS, sha256_file, write_json


def data_digest(folder: Path, cache: Path, log: Callable[[str], None]) -> str:
    """The sha256 of the content of every file under ``folder`` (hidden files aside), in path order.

    Args:
        folder: the dataset's folder (``--data-root`` or the dataset's default place).
        cache: where each file's digest is kept between runs, keyed by its size and modification time.
        log: where a long first pass, and a cache that cannot be written, are reported.
    """
    folder = Path(folder)
    record = cache / "digests" / f"{hashlib.sha256(os.path.realpath(folder).encode()).hexdigest()[:24]}.json"
    try:
        known = json.loads(record.read_text())
    except (OSError, *DAMAGE_ERRORS):
        known = {}
    if not isinstance(known, dict):
        known = {}
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    digests: dict[str, list] = {}
    unknown = 0
    for path in files:
        relative = path.relative_to(folder).as_posix()
        stat = path.stat()
        entry = known.get(relative)
        if not (isinstance(entry, list) and len(entry) == 3 and entry[:2] == [stat.st_size, stat.st_mtime_ns]):
            if unknown == 0 and len(files) > 1000:
                log(f"hashing the dataset in {folder} ({len(files)} files; kept for the next runs)")
            unknown += 1
            entry = [stat.st_size, stat.st_mtime_ns, sha256_file(path)]
        digests[relative] = entry
    if unknown or len(digests) != len(known):
        try:
            write_json(record, digests)
        except OSError as exc:
            log(f"cannot keep the dataset's digests in {record.parent} ({exc.strerror}); hashing again next time")
    total = hashlib.sha256()
    for relative, (_, _, sha256) in digests.items():
        total.update(f"{relative}\n{sha256}\n".encode())
    return total.hexdigest()
