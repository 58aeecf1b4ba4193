"""Differentiable augmentation with explicit random streams.

Every random draw takes a ``torch.Generator``, so a work unit's augmentation
depends only on its own seed; several groups batched together each keep their
own stream and their own crop, flip and shift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen))


def _randint(gen: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high] inclusive."""
    return int(torch.randint(low, high + 1, (), generator=gen))


def random_resized_crop_box(
    gen: torch.Generator,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random-resized crop, torchvision's sampling rule with our generator."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(gen, *scale)
        aspect = math.exp(_uniform(gen, *log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return _randint(gen, 0, height - h), _randint(gen, 0, width - w), h, w
    # Fallback: the largest central crop within the ratio bounds.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of a batch to size x size (antialiased when shrinking)."""
    if images.shape[-2:] == (size, size):
        return images
    shrinking = images.shape[-1] > size or images.shape[-2] > size
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking)


@dataclass(frozen=True)
class ViewParams:
    """One group's augmentation for one iteration: crop box, flip, and circular shift."""

    box: tuple[int, int, int, int]
    flip: bool
    shift: tuple[int, int]

    @staticmethod
    def sample(gen: torch.Generator, size: int, jitter: int, scale: tuple[float, float]) -> "ViewParams":
        box = random_resized_crop_box(gen, size, size, scale)
        flip = bool(torch.rand((), generator=gen) < 0.5)
        shift = (_randint(gen, 0, jitter), _randint(gen, 0, jitter))
        return ViewParams(box, flip, shift)

    def apply(self, images: torch.Tensor, size: int) -> torch.Tensor:
        """Crop, resize back to ``size``, flip, then roll by ``shift`` (the published order)."""
        top, left, h, w = self.box
        view = resize(images[..., top : top + h, left : left + w], size)
        if self.flip:
            view = view.flip(-1)
        if self.shift != (0, 0):
            view = torch.roll(view, shifts=self.shift, dims=(-2, -1))
        return view
