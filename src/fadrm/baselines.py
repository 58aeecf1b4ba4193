"""Like-for-like baselines: training sets of the distilled set's size built from real data.

Each entry of :data:`BASELINES` takes (real training split, dataset spec, IPC,
seed) and returns a :class:`TrainingSet` that students train on exactly as on
the distilled set (with soft and with hard labels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .data import DatasetSpec, eval_transform
from .data.datasets import ImageDataset
from .errors import FadrmError
from .registry import Registry
from .seeding import make_generator


@dataclass
class TrainingSet:
    """Images (uint8, N x C x H x W) and their classes: a distilled set or a baseline subset."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor


# (real training split, spec, images per class, seed) -> the baseline's training set.
BaselineFn = Callable[[ImageDataset, DatasetSpec, int, int], TrainingSet]
BASELINES: Registry[BaselineFn] = Registry("baseline")


def random_real_subset(dataset: ImageDataset, spec: DatasetSpec, ipc: int, seed: int) -> TrainingSet:
    """``ipc`` random real training images per class (the like-for-like baseline), at the spec's size."""
    gen = make_generator(seed, "random-real")
    images, labels = [], []
    for label in range(len(dataset.classes)):
        pool = dataset.indices_of_class(label)
        if len(pool) < ipc:
            raise FadrmError(f"class {label} has only {len(pool)} images, fewer than IPC {ipc}")
        for i in torch.randperm(len(pool), generator=gen)[:ipc].tolist():
            image = dataset.load(pool[i])
            if image.shape[-2:] != (spec.image_size, spec.image_size):
                image = eval_transform(spec)(image).mul(255).round().to(torch.uint8)
            images.append(image)
            labels.append(label)
    return TrainingSet("random-real", torch.stack(images), torch.tensor(labels))


BASELINES.add("random-real", random_real_subset)
