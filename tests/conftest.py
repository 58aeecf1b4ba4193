"""Tiny fixtures in each dataset's true on-disk format, a tiny teacher and set, and the shared helpers."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fadrm
from fadrm.artifacts import checkpoint_dict, checkpoint_meta
from fadrm.data.datasets import TrainingSet
from fadrm.cli import main
from fadrm.data.specs import FASHION_MNIST_CLASSES, IMAGENETTE_CLASSES
from fadrm.io import save_torch
from fadrm.models import build_model
from fadrm.synthesis.targets import TeacherTargets, random_targets

torch.set_num_threads(2)


def class_images(
    num_classes: int, per_class: int, channels: int, size: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Images whose brightness pattern depends on the class, so a classifier can tell them apart."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    yy, xx = np.mgrid[0:size, 0:size]
    images = np.empty((len(labels), size, size, channels), dtype=np.uint8)
    for i, label in enumerate(labels):
        wave = np.sin((xx * (label + 1) + yy * (label % 3)) / size * np.pi)
        base = (wave * 0.35 + 0.5) * 255
        noise = rng.normal(0, 20, (size, size))
        images[i] = np.clip(base + noise, 0, 255)[:, :, None].astype(np.uint8)
    return images, labels


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """fadrm's shared cache (dataset digests, full-data students) in the test session's own folder, never the
    user's (also for the processes tests start)."""
    before = os.environ.get("FADRM_CACHE")
    os.environ["FADRM_CACHE"] = str(tmp_path_factory.mktemp("fadrm-cache"))
    yield
    if before is None:
        os.environ.pop("FADRM_CACHE", None)
    else:
        os.environ["FADRM_CACHE"] = before


@pytest.fixture(scope="session")
def fmnist_root(tmp_path_factory) -> Path:
    """Fashion-MNIST-format IDX files: 10 classes, 16 train and 4 val images each, 28 px."""
    root = tmp_path_factory.mktemp("fmnist")
    for prefix, per_class, seed in (("train", 16, 0), ("t10k", 4, 1)):
        images, labels = class_images(10, per_class, 1, 28, seed)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images[..., 0])
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    """CIFAR-10 and CIFAR-100 python-pickle batches (tiny)."""
    root = tmp_path_factory.mktemp("cifar")
    ten = root / "cifar-10-batches-py"
    ten.mkdir()
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        images, labels = class_images(10, 1, 3, 32, seed=i)
        images[..., 1] = 255 - images[..., 1]
        data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
        with open(ten / name, "wb") as fh:
            pickle.dump({"data": data, "labels": labels.tolist()}, fh)
    with open(ten / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"c10_{i}" for i in range(10)]}, fh)
    hundred = root / "cifar-100-python"
    hundred.mkdir()
    for name in ("train", "test"):
        images, labels = class_images(100, 1, 3, 32)
        data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
        with open(hundred / name, "wb") as fh:
            pickle.dump({"data": data, "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist()}, fh)
    with open(hundred / "meta", "wb") as fh:
        pickle.dump({"fine_label_names": [f"c100_{i}" for i in range(100)]}, fh)
    return root


@pytest.fixture(scope="session")
def tiny_imagenet_root(tmp_path_factory) -> Path:
    """The tiny-imagenet-200 layout with 3 classes (wnids.txt, train/*/images, val_annotations.txt)."""
    root = tmp_path_factory.mktemp("tiny") / "tiny-imagenet-200"
    wnids = ["n01443537", "n01629819", "n01641577"]
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(reversed(wnids)) + "\n")
    images, labels = class_images(3, 3, 3, 64)
    for k, (image, label) in enumerate(zip(images, labels)):
        folder = root / "train" / wnids[label] / "images"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{wnids[label]}_{k}.JPEG")
    lines = []
    for k, (image, label) in enumerate(zip(images[::3], labels[::3])):
        Image.fromarray(image).save(root / "val" / "images" / f"val_{k}.JPEG")
        lines.append(f"val_{k}.JPEG\t{wnids[label]}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root.parent


def write_image_folder(root: Path, class_dirs: list[str], per_class: int, size: int = 40) -> Path:
    images, labels = class_images(len(class_dirs), per_class, 3, size)
    for split in ("train", "val"):
        for k, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / class_dirs[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"img_{k}.png")
    return root


@pytest.fixture(scope="session")
def imagenette_root(tmp_path_factory) -> Path:
    """ImageNette layout: train/ and val/ with the ten WordNet-id folders."""
    return write_image_folder(tmp_path_factory.mktemp("imagenette"), [c[0] for c in IMAGENETTE_CLASSES], 2)


def make_teacher_checkpoint(
    path: Path,
    arch: str = "convnet-small",
    dataset: str = "fashion-mnist",
    num_classes: int = 10,
    channels: int = 1,
    size: int = 28,
    seed: int = 0,
    class_names: list[str] | None = None,
    **arch_args,
) -> Path:
    """A randomly initialised teacher whose BN running statistics are not the defaults."""
    torch.manual_seed(seed)
    model = build_model(arch, num_classes, channels, size, **arch_args)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(16, channels, size, size) * 2 - 0.5)
    names = class_names or list(FASHION_MNIST_CLASSES)
    meta = checkpoint_meta(
        arch, arch_args, dataset, names, channels, size, [0.2860] * channels, [0.3530] * channels, 10.0
    )
    save_torch(path, checkpoint_dict(model, meta))
    return path


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory) -> Path:
    """A tiny ConvNet teacher for the Fashion-MNIST fixture."""
    return make_teacher_checkpoint(tmp_path_factory.mktemp("teacher") / "teacher.pt", width=8)


@pytest.fixture(scope="session")
def second_teacher_ckpt(tmp_path_factory) -> Path:
    """Another architecture for FADRM+."""
    return make_teacher_checkpoint(tmp_path_factory.mktemp("teacher2") / "teacher2.pt", seed=1, width=6, depth=2)


@pytest.fixture(scope="module")
def distilled(fmnist_root, teacher_ckpt, tmp_path_factory) -> Path:
    """A small RDED set of the Fashion-MNIST fixture (IPC 2), one per test module: evaluations
    write into it, so modules do not see each other's finished runs."""
    out = tmp_path_factory.mktemp("set") / "rded"
    fadrm.distill(
        "fashion-mnist",
        [teacher_ckpt],
        out,
        method="rded",
        ipc=2,
        data_root=str(fmnist_root),
        mipc=16,
        num_crop=2,
        device="cpu",
        log=lambda s: None,
    )
    return out


def tiny_training_set(n: int) -> TrainingSet:
    """``n`` random 8 px grey images, classes 0-9 in turn."""
    gen = torch.Generator().manual_seed(0)
    return TrainingSet(
        "distilled", torch.randint(0, 256, (n, 1, 8, 8), generator=gen, dtype=torch.uint8), torch.arange(n) % 10
    )


def rded_distill_argv(fmnist_root: Path, teacher: Path, out: Path, *extra: str) -> list[str]:
    """``fadrm`` arguments of a small RDED distillation of the Fashion-MNIST fixture (seconds on the CPU)."""
    return [
        *("distill", "--dataset", "fashion-mnist", "--method", "rded", "--teacher", str(teacher), "--ipc", "2"),
        *("--mipc", "16", "--num-crop", "2", "--data-root", str(fmnist_root), "--device", "cpu", "--out", str(out)),
        *extra,
    ]


def quick_teacher_config(data_root: Path, out: Path, **overrides):
    """A two-epoch, width-4 ConvNet teacher of the Fashion-MNIST fixture (resume and damage tests)."""
    from fadrm.config import TeacherConfig

    options = dict(model_args={"width": 4}, epochs=2, batch_size=32, workers=0, device="cpu")
    return TeacherConfig(
        dataset="fashion-mnist",
        model="convnet-small",
        out=str(out),
        data_root=str(data_root),
        **{**options, **overrides},
    )


def run_cli(argv: list[str], capsys) -> tuple[int, list[str], list[str]]:
    """Exit status, stdout lines and stderr lines of ``fadrm ARGV`` run in this process."""
    try:
        code = main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines(), captured.err.strip().splitlines()


def statistics_targets(
    model: torch.nn.Module, size: int, cell: int, classes: int = 10, channels_in: int = 1
) -> TeacherTargets:
    """Targets of the right shapes for every BatchNorm layer and convolution input, not the statistics'."""
    return random_targets(model, channels_in, size, cell, classes, torch.Generator().manual_seed(3))
