"""The per-group moments kernel of statistics matching, the patch cells, and the distance they feed
(the hooks are in :mod:`fadrm.synthesis.matching`, the fused loss in :mod:`fadrm.synthesis.fused`)."""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch
from torch import nn


# Added under the square root by the statistics kernels; small enough to vanish
# next to any real variance in fp32, and subtracted again below.
_STATS_EPS = 1e-12
_CPU_CHUNKS = 4
# Group activations smaller than this (elements) skip chunking: their transient copy is
# small, and for them the per-call overhead of chunking dominated (tiny ConvNet teachers).
_CHUNK_ABOVE = 1 << 20


def mean_invstd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and 1/sqrt(var + eps) over all but dim 1, with BatchNorm's own fused kernel.

    ``torch.var_mean`` over (N, H, W) measured 4-5x slower than the
    training-mode statistics pass of batch norm on a 2-core CPU (26.8 vs
    5.8 ms for a 100x64x32x32 channels-last activation), and it dominated
    the overhead of synthesis over the bare teacher.
    """
    if x.is_cuda:
        return torch.batch_norm_stats(x, _STATS_EPS)
    _, mean, invstd = torch.ops.aten.native_batch_norm(x, None, None, None, None, True, 0.0, _STATS_EPS)
    return mean, invstd


def _variance(invstd: torch.Tensor) -> torch.Tensor:
    return (invstd.double().pow(-2) - _STATS_EPS).clamp_min(0).float()


def _chunked_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of a large CPU activation from batch chunks, combined exactly.

    The CPU kernel also writes a normalised copy of its input, which we
    discard; chunks bound that transient to a quarter of the activation (it
    showed in peak memory). Chan et al.'s parallel formula combines the chunks.
    """
    chunks = x.chunk(min(_CPU_CHUNKS, len(x)))
    stats = [mean_invstd(chunk) for chunk in chunks]
    means = torch.stack([m for m, _ in stats]).float()
    variances = _variance(torch.stack([s for _, s in stats]))
    weights = torch.tensor([len(c) / len(x) for c in chunks], device=x.device)[:, None]
    mean = (weights * means).sum(0)
    return mean, (weights * (variances + (means - mean) ** 2)).sum(0)


class GroupMoments(torch.autograd.Function):
    """Per-group, per-channel mean and biased variance of a BN layer's input, with a one-pass backward.

    Forward: ``x`` (G*B, C, ...) -> mean, var of shape (G, C). Backward:
    d var / d x = 2 (x - mean) / n and d mean / d x = 1 / n, so the input
    gradient is ``x * a + b`` with per-(group, channel) a, b: a single fused
    ``addcmul`` over the activation instead of autograd's chain of
    full-size subtract, multiply, divide and add.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        groups = x.detach().unflatten(0, (num_groups, -1))
        if x.is_cuda or groups[0].numel() < _CHUNK_ABOVE:
            stats = [mean_invstd(groups[g]) for g in range(num_groups)]
            mean = torch.stack([m for m, _ in stats]).float()
            var = _variance(torch.stack([s for _, s in stats]))
        else:
            moments = [_chunked_moments(groups[g]) for g in range(num_groups)]
            mean = torch.stack([m for m, _ in moments])
            var = torch.stack([v for _, v in moments])
        ctx.save_for_backward(x, mean)
        ctx.num_groups = num_groups
        return mean, var

    @staticmethod
    def backward(ctx, grad_mean: torch.Tensor, grad_var: torch.Tensor):  # type: ignore[override]
        x, mean = ctx.saved_tensors
        groups = x.unflatten(0, (ctx.num_groups, -1))
        count = groups[0].numel() // x.shape[1]  # values per channel per group
        scale = 2.0 * grad_var / count
        shift = grad_mean / count - scale * mean
        shape = (ctx.num_groups, 1, x.shape[1]) + (1,) * (x.dim() - 2)
        grad = torch.addcmul(shift.view(shape), groups, scale.view(shape))
        return grad.flatten(0, 1).to(x.dtype), None


def stat_distance(stats: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over paired statistics of ``||target - statistic||_2`` per group: (G,)."""
    total = torch.linalg.vector_norm(stats[0] - targets[0], dim=1)
    for stat, target in zip(stats[1:], targets[1:]):
        total = total + torch.linalg.vector_norm(stat - target, dim=1)
    return total


def group_stat_distance(
    features: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, num_groups: int
) -> torch.Tensor:
    """Per group: ||batch mean - running mean||_2 + ||batch var - running var||_2.

    ``features`` is a BN layer's input (N, C, ...) holding ``num_groups``
    consecutive groups of N / num_groups samples. Statistics are over each
    group's samples and spatial positions, with the biased variance that
    BatchNorm itself uses; groups never mix.
    """
    mean, var = GroupMoments.apply(features, num_groups)
    return stat_distance([mean, var], [running_mean, running_var])


def to_cells(x: torch.Tensor, cell: int, groups: int | None = None) -> torch.Tensor:
    """``x`` (N, C, H, W) resized (bilinear) up to multiples of ``cell`` where it is not, and split into
    cells in one view: (N, C, H/cell, cell, W/cell, cell), or (G, N/G, C, ...) given ``groups``."""
    height, width = (math.ceil(side / cell) * cell for side in x.shape[-2:])
    if (height, width) != tuple(x.shape[-2:]):
        x = torch.nn.functional.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    batch = (len(x),) if groups is None else (groups, -1)
    return x.view(*batch, x.shape[1], height // cell, cell, width // cell, cell)


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (the CPU for a stateless model)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")
