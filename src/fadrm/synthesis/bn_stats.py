"""The per-group moments kernel of statistics matching and the distance it feeds (the hooks are in
:mod:`fadrm.synthesis.matching`)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
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


def _mean_invstd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
    stats = [_mean_invstd(chunk) for chunk in chunks]
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
            stats = [_mean_invstd(groups[g]) for g in range(num_groups)]
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


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (the CPU for a stateless model)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


# ------------------------------------------------------------ fused loss
@dataclass(frozen=True)
class FusedLayout:
    """What the fused loss of one model's BatchNorm layers needs besides their inputs.

    The statistics of all L layers live in one row per group, (G, 2 sum C): every layer's
    channel means, then every layer's variances; ``2L`` distances are taken over its segments.

    Attributes:
        num_groups: groups in the batch.
        channels: channels per layer.
        targets: (1, 2 sum C) the running means, then the running variances.
        segments: (2 sum C, 2L) one-hot, statistic -> its distance; a matrix product with it
            sums each segment in one operation. ``segments_t``: its transpose, contiguous.
        weights: (2L,) each distance's weight (the first layer's multiplier on both of its own).
        exponents: (2 sum C,) 1 for the means, -2 for the variance half: what turns one-group
            kernel output (means and 1/sqrt(var + eps)) into the statistics in one operation.
    """

    num_groups: int
    channels: tuple[int, ...]
    targets: torch.Tensor
    segments: torch.Tensor
    segments_t: torch.Tensor
    weights: torch.Tensor
    exponents: torch.Tensor
    _scales: dict = field(default_factory=dict, compare=False, repr=False)

    @staticmethod
    def build(layers: Sequence[nn.Module], weights: Sequence[float], num_groups: int) -> "FusedLayout":
        """The layout of BatchNorm ``layers`` (in the order their inputs will be given), on their device."""
        device = device_of(layers[0])
        channels = tuple(int(layer.running_mean.numel()) for layer in layers)
        targets = torch.cat([layer.running_mean.float() for layer in layers]
                            + [layer.running_var.float() for layer in layers])  # fmt: skip
        owner = torch.repeat_interleave(torch.arange(2 * len(layers)), torch.tensor(channels * 2))
        segments = torch.nn.functional.one_hot(owner, 2 * len(layers)).float()
        exponents = torch.tensor([1.0] * sum(channels) + [-2.0] * sum(channels))
        return FusedLayout(num_groups, channels, targets[None].to(device), segments.to(device),
                           segments.T.contiguous().to(device),
                           torch.tensor(list(weights) * 2, dtype=torch.float32, device=device),
                           exponents.to(device))  # fmt: skip

    def scales(self, shapes: Sequence[torch.Size]) -> torch.Tensor:
        """(2 sum C,) d mean / d x and d var / d x factors for activations of ``shapes``: 1/n per mean, 2/n
        per variance, n the values per (group, channel) of its layer; made once per shapes."""
        key = tuple(tuple(shape) for shape in shapes)
        if key not in self._scales:
            counts = [shape[0] // self.num_groups * (math.prod(shape) // shape[0] // c)
                      for shape, c in zip(key, self.channels)]  # fmt: skip
            per_segment = [1.0 / n for n in counts] + [2.0 / n for n in counts]
            values = torch.repeat_interleave(torch.tensor(per_segment, dtype=torch.float32),
                                             torch.tensor(self.channels * 2))  # fmt: skip
            self._scales[key] = values.to(self.targets.device)
        return self._scales[key]


class BatchNormTap(nn.Module):
    """Stands in for an eval-mode BatchNorm layer while the fused statistics loss is computed.

    It gives the layer's own output and keeps the statistics of its input for
    :class:`FusedBatchNormLoss`, in one autograd node whose backward is the layer's (eval mode:
    ``grad * weight / sqrt(running_var + eps)``) plus the statistics' share, ``x * a + b``,
    in two operations. The per-layer path's hooks cost one more per layer: autograd adding the
    statistics' gradient of ``x`` to the layer's.

    :attr:`statistics`: ``(first, second, shape)`` of the last forward, until the loss takes
    it: for one group the kernel's per-channel mean and 1/sqrt(var + eps), (C,) each; for G
    groups the mean and biased variance, (G, 1, C, 1, ...) each; ``shape`` the input's.
    """

    def __init__(self, layer: nn.Module, num_groups: int) -> None:
        super().__init__()
        if layer.training or layer.running_mean is None or layer.running_var is None:
            raise ValueError(f"fused statistics need BatchNorm layers in eval mode with running statistics: {layer}")
        self.layer = layer
        self.num_groups = num_groups
        with torch.no_grad():
            scale = layer.running_var.float().add(layer.eps).rsqrt()
            if layer.weight is not None:
                scale = scale * layer.weight.float()
        # d output / d input of the eval-mode layer, per channel; then the constants through which
        # one eval-mode batch-norm call computes x * a + b from per-channel a and b.
        self._scale = scale
        self._scale_by_dims: dict[int, torch.Tensor] = {}
        self._zeros = torch.zeros_like(scale)
        self._ones = torch.ones_like(scale)
        self.statistics: tuple[torch.Tensor, torch.Tensor, torch.Size] | None = None

    def scale_for(self, dims: int) -> torch.Tensor:
        """The per-channel input gradient factor, shaped to broadcast over a ``dims``-dimensional input."""
        if dims not in self._scale_by_dims:
            self._scale_by_dims[dims] = self._scale.view(-1, *([1] * (dims - 2)))
        return self._scale_by_dims[dims]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.statistics is not None:
            raise RuntimeError(f"BatchNorm layer {self.layer} ran twice in one forward pass; the fused "
                               "statistics loss needs each layer once")  # fmt: skip
        output, first, second = _TappedBatchNorm.apply(x, self)
        self.statistics = (first, second, x.shape)
        return output


class _TappedBatchNorm(torch.autograd.Function):
    """:class:`BatchNormTap`'s node. Its statistics outputs feed :class:`FusedBatchNormLoss` only,
    whose backward hands them, in place of gradients, the coefficients ``b`` (for the first) and
    ``a`` (for the second) of the statistics' gradient of the input, ``x * a + b``: the two nodes
    are one mechanism, split where the forward pass splits them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, tap: BatchNormTap):  # type: ignore[override]
        layer = tap.layer
        output = torch.nn.functional.batch_norm(x, layer.running_mean, layer.running_var, layer.weight,
                                                layer.bias, False, 0.0, layer.eps)  # fmt: skip
        if tap.num_groups == 1:
            first, second = _mean_invstd(x)
            saved = x
        else:
            saved = x.unflatten(0, (tap.num_groups, -1))
            second, first = torch.var_mean(saved, dim=(1, *range(3, saved.dim())), keepdim=True, correction=0)
        ctx.save_for_backward(saved)
        ctx.tap = tap
        ctx.shape = x.shape
        return output, first.float(), second.float()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor | None, shift: torch.Tensor | None,  # type: ignore[override]
                 slope: torch.Tensor | None):  # fmt: skip
        (saved,) = ctx.saved_tensors
        tap: BatchNormTap = ctx.tap
        dims = len(ctx.shape)
        if shift is None:  # the statistics were not used: the layer's own gradient
            return (None if grad_output is None else grad_output * tap.scale_for(dims)), None
        if tap.num_groups == 1:
            # x * a + b as an eval-mode batch norm with mean 0, variance 1, weight a, bias b: one
            # operation, taking a and b as the (C,) vectors they are.
            grad = torch.ops.aten.native_batch_norm(saved, slope, shift, tap._zeros, tap._ones, False, 0.0, 0.0)[0]
        else:
            grad = torch.addcmul(shift, saved, slope).view(ctx.shape)
        if grad_output is not None:
            grad = grad.addcmul_(grad_output, tap.scale_for(dims))
        return grad.to(saved.dtype), None


def _statistics_row(statistics: Sequence[torch.Tensor], layout: FusedLayout) -> torch.Tensor:
    """The taps' statistics side by side, (G, 2 sum C), fp32, in :class:`FusedLayout`'s order."""
    groups = layout.num_groups
    if groups == 1:
        # BatchNorm's own statistics kernel gives 1/sqrt(var + eps), eps far below any fp32
        # variance's rounding, so the power -2 is the variance.
        return torch.cat(statistics).view(1, -1).pow(layout.exponents)
    if len({s.dim() for s in statistics}) == 1:
        return torch.cat(statistics, 2).view(groups, -1)
    return torch.cat([s.reshape(groups, -1) for s in statistics], 1)  # inputs of different ranks


class FusedBatchNormLoss(torch.autograd.Function):
    """The statistics loss of all of a model's BatchNorm layers as one autograd node, (G,).

    Per group: ``sum_l w_l (||mu_l - running_mean_l||_2 + ||var_l - running_var_l||_2)``, the
    same loss as one :class:`GroupMoments` and :func:`stat_distance` per layer, from the
    statistics its :class:`BatchNormTap` layers kept: a handful of operations on the
    statistics of all layers side by side, whatever the depth. Rounding differs from the
    per-layer path. Its backward returns, for each tap's statistics, the coefficients the tap
    turns into its input's gradient (see :class:`_TappedBatchNorm`), not their gradient.

    ``ema`` (a dict, or None) carries the EMA surrogate's state between calls: the distance
    is taken at ``s_hat <- a s_hat + (1 - a) s`` (starting at 0), with the gradient of ``s``.
    """

    @staticmethod
    def forward(ctx, layout: FusedLayout, ema: dict | None, coefficient: float,  # type: ignore[override]
                shapes: tuple[torch.Size, ...], *statistics: torch.Tensor) -> torch.Tensor:  # fmt: skip
        with torch.autocast(statistics[0].device.type, enabled=False):
            stats = _statistics_row(statistics, layout)  # (G, 2 sum C)
            mean = stats[:, : sum(layout.channels)]
            if ema is not None:
                state = ema.get("state")
                stats = stats * (1 - coefficient) if state is None else state * coefficient + stats * (1 - coefficient)
                ema["state"] = stats
            diff = stats - layout.targets
            norms = (diff.square() @ layout.segments).sqrt_()  # (G, 2L)
            loss = norms @ layout.weights
        ctx.save_for_backward(mean, diff, norms)
        ctx.layout = layout
        ctx.shapes = shapes
        ctx.statistics_shapes = [s.shape for s in statistics]
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # type: ignore[override]
        mean, diff, norms = ctx.saved_tensors
        layout: FusedLayout = ctx.layout
        total = sum(layout.channels)
        with torch.autocast(grad_loss.device.type, enabled=False):
            # d ||d||_2 / d d = d / ||d||_2, and 0 where the distance is 0 (as autograd's norm).
            coefficient = torch.outer(grad_loss.float(), layout.weights).div_(norms.clamp_min(1e-30))
            # Per (group, channel): [d mean / n | 2 d var / n]; the input gradient is x * a + b with
            # a = 2 d var / n and b = d mean / n - a * mean.
            grad = (coefficient @ layout.segments_t).mul_(diff).mul_(layout.scales(ctx.shapes))
            grad[:, :total].sub_(grad[:, total:] * mean)
        shapes = ctx.statistics_shapes
        if layout.num_groups == 1:
            parts = grad.view(-1).split(layout.channels * 2)
        elif len({len(s) for s in shapes}) == 1:
            parts = grad.view(shapes[0][:2] + (-1,) + shapes[0][3:]).split(layout.channels * 2, 2)
        else:
            parts = [part.view(shape) for part, shape in zip(grad.split(layout.channels * 2, 1), shapes)]
        return (None, None, None, None, *parts)
