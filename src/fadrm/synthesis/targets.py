"""What the statistics are matched to: the moments of a layer's input, and one teacher's targets.

A BatchNorm layer is matched to its own running buffers; a convolution's input (G-VBSM, EDC) to
the training set's channel and patch statistics, per class too, that the statistics pass
(:mod:`fadrm.synthesis.statistics`) computes with the same moment functions as the matchers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .bn_stats import device_of, to_cells


# ------------------------------------------------------------ layer statistics
def cell_size(image_size: int) -> int:
    """P, the side of the patch-statistics cells, for images of ``image_size`` pixels.

    The published values are 16 for the 224 px ImageNet family and 4 for CIFAR (32 px) and
    Tiny-ImageNet (64 px). Fashion-MNIST (28 px) takes 4: it divides 28, so the image itself
    is never resampled, and it gives CIFAR's ratio of cell to image side.
    """
    return 16 if image_size > 64 else 4


def patch_moments(x: torch.Tensor, cell: int, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group and per cell, the mean and biased variance over (B, C, cell, cell): (G, cells) each.

    Cells are numbered row by row.
    """
    cells = to_cells(x.float(), cell, num_groups)  # (G, B, C, u, P, v, P)
    var, mean = torch.var_mean(cells, dim=(1, 2, 4, 6), correction=0)
    return mean.flatten(1), var.flatten(1)


def image_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and channel, the mean and the biased variance **within the image** over (H, W): (N, C) each."""
    var, mean = torch.var_mean(x.float(), dim=(2, 3), correction=0)
    return mean, var


def image_patch_moments(x: torch.Tensor, cell: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and cell, the mean and biased variance over (C, cell, cell): (N, cells) each."""
    var, mean = torch.var_mean(to_cells(x.float(), cell), dim=(1, 3, 5), correction=0)
    return mean.flatten(1), var.flatten(1)


def matched_layers(model: nn.Module, convolutions: bool) -> list[tuple[str, nn.Module]]:
    """The model's BatchNorm layers, and its Conv2d layers when ``convolutions``, in ``named_modules``
    order (a compiled model is named as the module it wraps)."""
    model = getattr(model, "_orig_mod", model)
    kinds = (_BatchNorm, nn.Conv2d) if convolutions else (_BatchNorm,)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kinds)]


# ------------------------------------------------------------------- targets
@dataclass
class LayerTargets:
    """What one hooked layer's statistics are matched to, from the statistics pass.

    Each is a (mean, variance) pair or None. ``channel``: (C,) each, over the training set (a
    BatchNorm layer uses its running buffers instead); ``patch``: (cells,) each;
    ``class_channel`` and ``class_patch``: one row per class, (classes, C) and (classes, cells).
    """

    channel: tuple[torch.Tensor, torch.Tensor] | None = None
    patch: tuple[torch.Tensor, torch.Tensor] | None = None
    class_channel: tuple[torch.Tensor, torch.Tensor] | None = None
    class_patch: tuple[torch.Tensor, torch.Tensor] | None = None

    def to(self, device: torch.device) -> "LayerTargets":
        """The same targets on ``device``."""

        def move(pair):
            return None if pair is None else (pair[0].to(device), pair[1].to(device))

        return LayerTargets(move(self.channel), move(self.patch), move(self.class_channel), move(self.class_patch))


@dataclass
class TeacherTargets:
    """One teacher's targets: the cell side of its patch statistics and each hooked layer's targets by name."""

    cell: int
    layers: dict[str, LayerTargets]


def random_targets(
    model: nn.Module, channels: int, size: int, cell: int, classes: int, generator: torch.Generator | None = None
) -> TeacherTargets:
    """Targets of the right shapes, with random values, for every BatchNorm layer and convolution input of
    ``model`` on ``size`` px images of ``channels`` channels: what the benchmarks and tests of G-VBSM's and
    EDC's matching run on without a statistics pass (means uniform in [0, 1), variances in [0.5, 1.5))."""
    layers = matched_layers(model, convolutions=True)
    shapes: dict[str, torch.Size] = {}
    handles = [m.register_forward_hook(lambda m, a, o, n=n: shapes.__setitem__(n, a[0].shape)) for n, m in layers]
    try:
        with torch.no_grad():
            model(torch.zeros(1, channels, size, size, device=device_of(model)))
    finally:
        for handle in handles:
            handle.remove()

    def pair(*dims: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.rand(*dims, generator=generator), torch.rand(*dims, generator=generator) + 0.5

    targets = {}
    for name, _ in layers:
        layer_channels, height, width = shapes[name][1:]
        cells = -(-height // cell) * -(-width // cell)
        targets[name] = LayerTargets(
            pair(layer_channels), pair(cells), pair(classes, layer_channels), pair(classes, cells)
        )
    return TeacherTargets(cell, targets)


def group_class_targets(
    pair: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A group's class target: the mean over its images of their class's target, (G, ...) each."""
    return tuple(t[labels].unflatten(0, (num_groups, -1)).mean(1) for t in pair)  # type: ignore[return-value]
