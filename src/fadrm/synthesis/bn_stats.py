"""BatchNorm statistics matching, computed inside forward hooks that are always removed."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """The model's BatchNorm layers in module order (the first one gets the extra weight)."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def group_stat_distance(
    features: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, num_groups: int
) -> torch.Tensor:
    """Per group: ||batch mean - running mean||_2 + ||batch var - running var||_2.

    ``features`` is a BN layer's input (N, C, ...) holding ``num_groups``
    consecutive groups of N / num_groups samples. Statistics are over each
    group's samples and spatial positions, with the biased variance that
    BatchNorm itself uses. One fused ``var_mean`` reads the activations once,
    with no permuted copy.
    """
    grouped = features.unflatten(0, (num_groups, -1))
    dims = (1, *range(3, grouped.dim()))
    var, mean = torch.var_mean(grouped.float(), dim=dims, correction=0)
    return torch.linalg.vector_norm(mean - running_mean, dim=1) + torch.linalg.vector_norm(var - running_var, dim=1)


class BNStatMatcher:
    """Hooks every BN layer of the given models and accumulates the statistics loss.

    Use as a context manager; the hooks are removed on exit, whatever happens.
    After each forward pass, :meth:`pop` returns the weighted sum over that
    model's BN layers, one value per group, and clears it for the next pass.

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

    def __enter__(self) -> "BNStatMatcher":
        try:
            for model in self.models:
                for index, layer in enumerate(batchnorm_layers(model)):
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

    def pop(self) -> torch.Tensor:
        """Sum of the weighted per-layer distances of the last forward pass, shape (num_groups,)."""
        if not self._terms:
            raise RuntimeError("no BatchNorm layer ran in the last forward pass")
        total = torch.stack(self._terms).sum(0)
        self._terms.clear()
        return total
