"""Patch selection against the floor of decoding the same JPEG files with the same loader workers.

    python benchmarks/patch_speed.py --json benchmarks/results/cpu-2core-patches.json
    python benchmarks/patch_speed.py --classes 100 --per-class 300 --data /scratch/inet-like   # a GPU node
    python benchmarks/patch_speed.py --dry-run          # a tiny folder, seconds (CI)

Generates (once, kept in ``--data``) an ImageNet-like ImageFolder: ``--classes`` x ``--per-class``
JPEGs of ImageNet's typical sizes (sides drawn from 300-500 px, quality 90, smooth content
with noise, so decoding costs what a photograph's does). Then, for each worker count (0 = in
this process, 1, 2, ..., all cores):

* floor: the same files decoded in the same order by a DataLoader with that many workers,
  nothing else;
* crops: the host's part of patch selection when a GPU scores: every candidate decoded,
  cropped and resized by the same loader (:func:`fadrm.synthesis.patches.crops_of_classes`);
* whole (CPU): patch selection as ``fadrm distill`` runs it on the CPU
  (:func:`fadrm.synthesis.patches.crops_of_classes`:
  every class's candidates and crop boxes drawn first, the images' sizes read from their
  headers, one loader decoding, cropping (``num_crop`` random-resized crops per image) and
  resizing them all in order; then per class the crops normalised, padded to the teacher's
  input, scored, the best kept) with the
  ImageNet-1k preset's patch settings (``mipc`` = all images of a class here, 5 crops, factor
  2, 224 px) and a nearly free scorer (global average pool + linear), so that what is timed is
  the data path a GPU node's host runs while its GPU scores.

Reported in images/s (candidate images per second) and as a fraction of the floor's (issue 25's
target for the host's part: >= 0.8). The crops are bitwise those of loading one by one in the
main process (the same torch resize), whatever the worker count.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from fadrm.config import PatchConfig
from fadrm.data import FileImageDataset
from fadrm.runtime import make_runtime
from fadrm.synthesis.patches import crops_of_classes, select_from_crops
from fadrm.training import available_cores

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_folder(root: Path, classes: int, per_class: int) -> FileImageDataset:
    """The generated ImageFolder (made once; reused when it is complete) as a dataset."""
    rng = np.random.default_rng(0)
    paths, targets = [], []
    for label in range(classes):
        folder = root / f"class{label:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            path = folder / f"{k:05d}.JPEG"
            if not path.exists():
                height, width = (int(v) for v in rng.integers(300, 501, 2))
                yy, xx = np.mgrid[0:height, 0:width]
                base = np.stack([np.sin((xx * (c + 1) + yy * (label % 7 + 1)) / 40.0 + k) for c in range(3)], -1)
                pixels = np.clip((base * 0.35 + 0.5) * 255 + rng.normal(0, 12, (height, width, 3)), 0, 255)
                tmp = path.with_suffix(".tmp")
                Image.fromarray(pixels.astype(np.uint8)).save(tmp, format="JPEG", quality=90)
                os.replace(tmp, path)
            paths.append(path)
            targets.append(label)
    return FileImageDataset(paths, targets, [f"class{c:04d}" for c in range(classes)])


class _Decode(torch.utils.data.Dataset):
    """The floor's items: the images at ``indices``, decoded, nothing else."""

    def __init__(self, dataset: FileImageDataset, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> torch.Tensor:
        return self.dataset.load(self.indices[position])


def time_floor(dataset: FileImageDataset, workers: int) -> float:
    """Seconds to decode every image in class order with ``workers`` loader processes (0: here)."""
    items = _Decode(dataset, [i for c in range(len(dataset.classes)) for i in dataset.indices_of_class(c)])
    started = time.perf_counter()
    if workers == 0:
        for k in range(len(items)):
            items[k]
    else:
        for _ in torch.utils.data.DataLoader(items, batch_size=None, num_workers=workers, prefetch_factor=8):
            pass
    return time.perf_counter() - started


def time_crops(dataset: FileImageDataset, settings: PatchConfig, workers: int) -> float:
    """Seconds to make every candidate's crops (decode, crop, resize) with ``workers`` loader processes:
    the host's part of patch selection when a GPU scores."""
    labels = list(range(len(dataset.classes)))
    started = time.perf_counter()
    _, crops = crops_of_classes(dataset, labels, 1, settings, 0, 224 // settings.factor, workers)
    for _ in crops:
        pass
    return time.perf_counter() - started


def time_selection(dataset: FileImageDataset, settings: PatchConfig, workers: int) -> float:
    """Seconds for the whole patch selection of every class with ``workers`` decoding processes."""
    torch.manual_seed(0)
    scorer = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, len(dataset.classes))).eval()
    runtime = make_runtime("cpu", "off")
    labels = list(range(len(dataset.classes)))
    started = time.perf_counter()
    candidates, crops = crops_of_classes(dataset, labels, 1, settings, 0, 224 // settings.factor, workers)
    for label in labels:
        select_from_crops(
            candidates[label],
            itertools.islice(crops, len(candidates[label])),
            label,
            1,
            scorer,
            IMAGENET_MEAN,
            IMAGENET_STD,
            224,
            settings,
            runtime,
        )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="runs/bench-imagenet-like", help="where the generated folder is kept")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--workers", type=int, nargs="+", help="worker counts (default: 0, 1, 2, all cores)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating floor/ours rounds; the fastest is kept")
    parser.add_argument("--dry-run", action="store_true", help="2 classes x 6 images, one round")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    if args.dry_run:
        args.classes, args.per_class, args.rounds = 2, 6, 1
    torch.set_num_threads(1)  # the main process's crops and resizes on one core; workers decode
    dataset = make_folder(Path(args.data) / f"{args.classes}x{args.per_class}", args.classes, args.per_class)
    settings = PatchConfig(mipc=args.per_class, num_crop=5, factor=2)
    cores = available_cores()
    worker_counts = args.workers or sorted({0, 1, 2, cores})
    rows = []
    for workers in worker_counts:
        floor, crops, whole = [], [], []
        for _ in range(args.rounds):
            floor.append(time_floor(dataset, workers))
            crops.append(time_crops(dataset, settings, workers))
            whole.append(time_selection(dataset, settings, workers))
        images = len(dataset)
        row = {
            "workers": workers,
            "images": images,
            "floor_images_per_s": images / min(floor),
            "crops_images_per_s": images / min(crops),
            "crops_ratio": min(floor) / min(crops),
            "whole_on_cpu_images_per_s": images / min(whole),
            "whole_on_cpu_ratio": min(floor) / min(whole),
        }
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print(
        f"{'workers':>7s} {'floor img/s':>11s} {'crops img/s':>11s} {'ratio':>6s} "
        f"{'whole (CPU) img/s':>17s} {'ratio':>6s}"
    )
    for r in rows:
        print(
            f"{r['workers']:7d} {r['floor_images_per_s']:11.1f} {r['crops_images_per_s']:11.1f} "
            f"{r['crops_ratio']:6.2f} {r['whole_on_cpu_images_per_s']:17.1f} {r['whole_on_cpu_ratio']:6.2f}"
        )
    if args.json:
        meta = {
            "cores": cores,
            "torch": torch.__version__,
            "machine": platform.machine(),
            "classes": args.classes,
            "per_class": args.per_class,
            "rounds": args.rounds,
            "command": " ".join(["python", *sys.argv]),
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
