"""Readers for each dataset's true on-disk format.

Every reader takes a root folder and a split ("train" or "val") and returns an
:class:`ImageDataset`. They accept either the folder that holds the data or
its parent, as torchvision lays the same data out, so a user can point
``--data-root`` at whichever they have.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import FadrmError
from .datasets import FileImageDataset, ImageDataset, TensorImageDataset

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def _first_existing(candidates: Sequence[Path], what: str, hint: str) -> Path:
    for path in candidates:
        if path.exists():
            return path
    raise FadrmError(f"{what} not found (looked in {', '.join(map(str, candidates))}); {hint}")


# --------------------------------------------------------------------- IDX
def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
        array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        return array.reshape(shape)
    except (OSError, ValueError, struct.error, EOFError) as exc:
        raise FadrmError(f"cannot read IDX file {path} ({exc}); replace the file") from None


def read_idx_split(root: Path, split: str, classes: Sequence[str], hint: str) -> ImageDataset:
    """MNIST-style IDX pairs: ``train-*`` for train, ``t10k-*`` for val."""
    prefix = "train" if split == "train" else "t10k"
    folders = [root, root / "FashionMNIST" / "raw", root / "raw"]

    def find(stem: str) -> Path:
        names = [folder / f"{prefix}-{stem}{ext}" for folder in folders for ext in ("", ".gz")]
        return _first_existing(names, f"{prefix}-{stem}", hint)

    images = read_idx(find("images-idx3-ubyte"))
    labels = read_idx(find("labels-idx1-ubyte"))
    if len(images) != len(labels):
        raise FadrmError(f"IDX images and labels under {root} differ in length; replace the files")
    return TensorImageDataset(torch.from_numpy(images.copy()).unsqueeze(1), labels.tolist(), classes)


# ------------------------------------------------------------------- CIFAR
# What a CIFAR batch refers to: a pickle names the functions that rebuild its objects, and a plain
# unpickler calls whatever it names. A batch is a dict of lists, strings and numpy arrays, rebuilt by
# these alone (as Python 2 wrote them, as numpy 1 and 2 write them, and bytes in protocol 2).
CIFAR_GLOBALS = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }
)


class CifarUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR batch, refusing any other object: loading a data file never runs code."""

    def find_class(self, module: str, name: str) -> Any:
        # numpy 2 renamed numpy.core, which older pickles (every published CIFAR file) name.
        renamed = "numpy._core" + module[len("numpy.core") :] if module.startswith("numpy.core") else module
        if (renamed, name) not in CIFAR_GLOBALS:
            raise pickle.UnpicklingError(
                f"it refers to {module}.{name}, which a CIFAR batch never holds; not loaded, as loading it "
                "would run code"
            )
        return super().find_class(renamed, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            # CIFAR batches are plain dicts of numpy arrays and lists written by
            # Python 2; "latin1" decodes their byte strings.
            batch = CifarUnpickler(fh, encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise FadrmError(f"cannot read CIFAR file {path} ({exc}); replace the file") from None
    if not isinstance(batch, dict):
        raise FadrmError(f"CIFAR file {path} holds a {type(batch).__name__}, not a batch (a dict); replace the file")
    return batch


def read_cifar_split(root: Path, split: str, variant: int, hint: str) -> ImageDataset:
    """torchvision's CIFAR-10/100 python format (``cifar-10-batches-py`` / ``cifar-100-python``)."""
    folder_name = "cifar-10-batches-py" if variant == 10 else "cifar-100-python"
    folder = _first_existing([root / folder_name, root], folder_name, hint)
    if variant == 10:
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        meta_file, names_key, labels_key = "batches.meta", "label_names", "labels"
    else:
        files = ["train"] if split == "train" else ["test"]
        meta_file, names_key, labels_key = "meta", "fine_label_names", "fine_labels"
    chunks, labels = [], []
    for name in files:
        path = folder / name
        if not path.exists():
            raise FadrmError(f"CIFAR file {path} not found; {hint}")
        batch = _unpickle(path)
        chunks.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(batch[labels_key])
    meta_path = folder / meta_file
    classes = _unpickle(meta_path)[names_key] if meta_path.exists() else [str(i) for i in range(variant)]
    return TensorImageDataset(torch.from_numpy(np.concatenate(chunks)), labels, classes)


# ----------------------------------------------------------- Tiny-ImageNet
def read_tiny_imagenet_split(root: Path, split: str, hint: str) -> ImageDataset:
    """The standard ``tiny-imagenet-200`` layout, val labels from ``val_annotations.txt``."""
    folder = _first_existing(
        [root / "tiny-imagenet-200" / "wnids.txt", root / "wnids.txt"], "tiny-imagenet wnids.txt", hint
    ).parent
    wnids = sorted(line.strip() for line in (folder / "wnids.txt").read_text().splitlines() if line.strip())
    index = {w: i for i, w in enumerate(wnids)}
    paths: list[Path] = []
    targets: list[int] = []
    if split == "train":
        for wnid in wnids:
            images = sorted((folder / "train" / wnid / "images").glob("*"))
            paths += [p for p in images if p.suffix.lower() in IMAGE_SUFFIXES]
            targets += [index[wnid]] * (len(paths) - len(targets))
    else:
        annotations = folder / "val" / "val_annotations.txt"
        if not annotations.exists():
            raise FadrmError(f"{annotations} not found; {hint}")
        for line in annotations.read_text().splitlines():
            fields = line.split("\t")
            if len(fields) < 2:
                continue
            if fields[1] not in index:
                raise FadrmError(f"{annotations} names class {fields[1]!r} missing from wnids.txt")
            paths.append(folder / "val" / "images" / fields[0])
            targets.append(index[fields[1]])
    if not paths:
        raise FadrmError(f"no tiny-imagenet {split} images under {folder}; {hint}")
    return FileImageDataset(paths, targets, wnids)


# ------------------------------------------------------------- ImageFolder
def read_image_folder_split(
    root: Path, split: str, hint: str, expected_classes: Sequence[str] | None = None, channels: int = 3
) -> ImageDataset:
    """``root/{train,val}/<class>/<image>``; class index = position in sorted folder names."""
    folder = root / split
    if not folder.is_dir():
        raise FadrmError(f"{folder} not found; {hint}")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if expected_classes is not None and classes != sorted(expected_classes):
        missing = sorted(set(expected_classes) - set(classes))[:3]
        extra = sorted(set(classes) - set(expected_classes))[:3]
        raise FadrmError(
            f"class folders under {folder} do not match this dataset (missing e.g. {missing}, "
            f"unexpected e.g. {extra}); {hint}"
        )
    paths: list[Path] = []
    targets: list[int] = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        targets += [label] * len(files)
    if not paths:
        raise FadrmError(f"no images under {folder}; {hint}")
    return FileImageDataset(paths, targets, classes, channels=channels)
