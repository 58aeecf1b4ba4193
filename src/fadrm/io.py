"""Writing files so that a crash never leaves a half-written file under its final name."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image


# Free space below which a failed write is taken for a full disk.
LOW_DISK_BYTES = 64 << 20


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success it is renamed onto ``path``.

    The rename is atomic on POSIX, so readers see either the old file or the
    complete new one. On error the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, data: Any) -> None:
    """Atomically write ``data`` as indented JSON."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text())


def save_torch(path: str | Path, obj: Any) -> None:
    """Atomically ``torch.save`` plain data (tensors, dicts, lists, numbers, strings).

    Raises:
        OSError: the file could not be written. ``torch.save`` reports a failed write (a full disk)
            as a ``RuntimeError`` from its zip writer; it is raised as the operating-system error it
            is, ENOSPC where the disk has (almost) no room left, else EIO.
    """
    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as exc:
            if "PytorchStreamWriter" not in str(exc) and "inline_container" not in str(exc):
                raise
            full = shutil.disk_usage(tmp.parent).free < LOW_DISK_BYTES
            code = errno.ENOSPC if full else errno.EIO
            raise OSError(code, os.strerror(code), str(path)) from exc


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """A [0, 1] float (C, H, W) tensor as an (H, W[, C]) uint8 array, rounded to nearest."""
    array = image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    array = array.permute(1, 2, 0).numpy()
    return array[:, :, 0] if array.shape[2] == 1 else array


def save_png(path: str | Path, image: torch.Tensor) -> None:
    """Atomically save a [0, 1] float (C, H, W) tensor as a PNG."""
    with atomic_path(path) as tmp:
        Image.fromarray(to_uint8(image)).save(tmp, format="PNG")


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def safe_name(name: str) -> str:
    """A class name reduced to characters safe in one path component."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return cleaned[:60] or "class"
