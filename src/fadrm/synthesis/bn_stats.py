"""BatchNorm statistics matching, computed inside forward hooks that are always removed."""

from __future__ import annotations

import itertools
from typing import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """The model's BatchNorm layers in module order (the first one gets the extra weight)."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


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
    return torch.linalg.vector_norm(mean - running_mean, dim=1) + torch.linalg.vector_norm(var - running_var, dim=1)


def _device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (the CPU for a stateless model)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


class BNStatMatcher:
    """Hooks every BN layer of the given models and accumulates the statistics loss.

    Use as a context manager; the hooks are removed on exit, whatever happens.
    After each forward pass, :meth:`pop` returns the weighted sum over that
    model's BN layers, one value per group, and clears it for the next pass.
    A model without BN layers (e.g. AlexNet in FADRM+) has no statistics to
    match: its term is zero, so its passes optimise the cross-entropy alone.

    Args:
        models: the teachers (only the one that runs contributes to a pass).
        num_groups: groups in each batch; statistics never mix groups.
        first_bn_multiplier: weight of each model's first BN layer (10 in the paper).
    """

    def __init__(self, models: Iterable[nn.Module], num_groups: int, first_bn_multiplier: float = 10.0) -> None:
        self.models = list(models)
        self.num_groups = num_groups
        self.first_bn_multiplier = first_bn_multiplier
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._terms: list[torch.Tensor] = []
        # Where each model without BN layers runs: its zero term is created there.
        self._bn_free: dict[nn.Module, torch.device] = {}

    def __enter__(self) -> "BNStatMatcher":
        try:
            for model in self.models:
                layers = batchnorm_layers(model)
                if not layers:
                    self._bn_free[model] = _device_of(model)
                for index, layer in enumerate(layers):
                    weight = self.first_bn_multiplier if index == 0 else 1.0
                    self._handles.append(layer.register_forward_hook(self._make_hook(weight)))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._terms.clear()

    def _make_hook(self, weight: float):
        def hook(module: _BatchNorm, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            distance = group_stat_distance(inputs[0], module.running_mean, module.running_var, self.num_groups)
            self._terms.append(distance * weight if weight != 1.0 else distance)

        return hook

    def pop(self, model: nn.Module) -> torch.Tensor:
        """Sum of the weighted per-layer distances of ``model``'s last forward pass, shape (num_groups,).

        Zeros, on the model's device, for a model without BN layers.
        """
        if not self._terms:
            if model in self._bn_free:
                return torch.zeros(self.num_groups, device=self._bn_free[model])
            raise RuntimeError("no BatchNorm layer ran in the last forward pass")
        total = torch.stack(self._terms).sum(0)
        self._terms.clear()
        return total
