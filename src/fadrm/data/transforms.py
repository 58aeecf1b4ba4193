"""Evaluation preprocessing and normalisation (the augmentations live in :mod:`fadrm.augment`)."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from .specs import DatasetSpec


def eval_transform(spec: DatasetSpec, image_size: int | None = None) -> v2.Compose:
    """Validation preprocessing: resize (with the usual 0.875 crop ratio for ImageNet) and centre crop."""
    size = image_size or spec.image_size
    resize = round(size / 0.875) if spec.augment == "resized-crop" else size
    return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(size), v2.ToDtype(torch.float32, scale=True)])


def _stats(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Map a batch of [0, 1] images (N, C, H, W) to the model's input space."""
    return (images - _stats(mean, images)) / _stats(std, images)


def denormalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Inverse of :func:`normalize`."""
    return images * _stats(std, images) + _stats(mean, images)
