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
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image


def default_cache() -> Path:
    """Where fadrm keeps what runs share (full-data students, dataset digests): ``$FADRM_CACHE``, else
    ``~/.cache/fadrm``."""
    return Path(os.environ.get("FADRM_CACHE") or Path.home() / ".cache" / "fadrm")


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


# What reading a damaged file raises (truncated, emptied, bytes flipped, another kind of file): not the
# operating system's refusals, which stay faults of their own (:data:`fadrm.errors.SYSTEM_FAULTS`).
DAMAGE_ERRORS = (ValueError, UnicodeDecodeError, EOFError, KeyError, TypeError, AttributeError, RuntimeError)


def set_aside(path: str | Path, why: str = "damaged") -> Path:
    """Rename a file (or folder) that fadrm can remake to ``<name>.<why>`` (``.<why>.N`` when that name is
    taken) beside it, so it is remade and the old copy is kept, never deleted: ``why`` is "damaged", or
    "stale" for one made for other inputs."""
    path = Path(path)
    target = path.with_name(f"{path.name}.{why}")
    number = 1
    while target.exists():
        target = path.with_name(f"{path.name}.{why}.{number}")
        number += 1
    os.replace(path, target)
    return target


def read_own_json(path: str | Path, what: str, log: Callable[[str], None]) -> dict[str, Any] | None:
    """A JSON record fadrm wrote and can remake: its contents, or None when it is missing, or damaged
    (unreadable as JSON, or not an object), in which case it is set aside (:func:`set_aside`) with one line
    saying so and that ``what`` is done again."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        record = read_json(path)
    except DAMAGE_ERRORS as exc:
        record, problem = None, " ".join(str(exc).split())[:80]
    else:
        problem = "not a JSON object"
    if isinstance(record, dict):
        return record
    aside = set_aside(path)
    log(f"{path} is damaged ({problem}); kept as {aside.name}, {what} again")
    return None


def file_digest_matches(path: str | Path, sha256: str | None) -> bool:
    """Whether ``path`` exists and, where a digest was recorded, its bytes hash to it."""
    path = Path(path)
    return path.is_file() and (sha256 is None or sha256_file(path) == sha256)


def save_torch(path: str | Path, obj: Any) -> None:
    """Atomically ``torch.save`` plain data (tensors, dicts, lists, numbers, strings); the same data gives the
    same bytes in any process.

    Raises:
        OSError: the file could not be written. ``torch.save`` reports a failed write (a full disk)
            as a ``RuntimeError`` from its zip writer; it is raised as the operating-system error it
            is, ENOSPC where the disk has (almost) no room left, else EIO.
    """
    with atomic_path(path) as tmp:
        try:
            # Through a file object the archive's inner folder is always "archive" (given a path, torch names it
            # after the temporary file, whose name holds the process id): the same weights, the same bytes.
            with open(tmp, "wb") as stream:
                torch.save(obj, stream)
        except RuntimeError as exc:
            if "PytorchStreamWriter" not in str(exc) and "inline_container" not in str(exc):
                raise
            full = shutil.disk_usage(tmp.parent).free < LOW_DISK_BYTES
            code = errno.ENOSPC if full else errno.EIO
            raise OSError(code, os.strerror(code), str(path)) from exc


# The key of a sealed file's digest of its own contents (:func:`seal`).
SEAL = "content_sha256"


def content_digest(obj: Any) -> str:
    """sha256 of plain data: every tensor's dtype, shape and bytes and every other value's ``repr``, in order."""
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            flat = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"tensor {value.dtype} {tuple(value.shape)}\n".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
        elif isinstance(value, dict):
            digest.update(f"dict {len(value)}\n".encode())
            for key, item in value.items():
                digest.update(f"{key!r}\n".encode())
                feed(item)
        elif isinstance(value, (list, tuple)):
            digest.update(f"{type(value).__name__} {len(value)}\n".encode())
            for item in value:
                feed(item)
        else:
            digest.update(f"{value!r}\n".encode())

    feed(obj)
    return digest.hexdigest()


def seal(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with the digest of its contents added, so that bytes changed on disk are found when it is read
    back (a ``torch.save`` file's own format does not check them)."""
    return {**state, SEAL: content_digest(state)}


def seal_broken(state: Any) -> bool:
    """Whether a sealed ``state`` read back differs from what was sealed (one without a seal, written before
    fadrm sealed its files, is taken as it is)."""
    if not isinstance(state, dict) or SEAL not in state:
        return False
    return content_digest({k: v for k, v in state.items() if k != SEAL}) != state[SEAL]


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
