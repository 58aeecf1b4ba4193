"""Statistics matching: forward hooks on BatchNorm layers and on convolution inputs, always removed.

What a hooked layer contributes, per group of images (groups never mix):

* a BatchNorm layer: its input's per-channel mean and biased variance over (B, H, W),
  matched to the layer's running buffers;
* a convolution (when the teacher has statistics targets, from ``fadrm stats``): the same
  channel statistics of its **input**, plus the patch statistics: the input resized
  (bilinear) up to the next multiple of the cell side P, cut into P x P cells, and per cell
  the mean and biased variance over (B, C, P, P); matched to the training set's.

The distance is ``D(T, s) = ||T_mean - s_mean||_2 + ||T_var - s_var||_2`` summed over the
layer's statistics; the first hooked module of each teacher (in ``named_modules`` order) is
weighted by ``first_multiplier``. On top of this, G-VBSM and EDC take the distance at an EMA
of the statistic (:class:`EmaSurrogate`), leave each convolution term out with a probability
per forward, and EDC averages the distance to the global target with the distance to the
group's class target (:data:`CATEGORY_SHARE`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..config import SynthesisConfig
from ..registry import Registry
from ..runtime import to_device
from .bn_stats import GroupMoments, device_of, stat_distance
from .fused import BatchNormTap, FusedLayout, FusedStatisticsLoss, FusedTerm
from .targets import group_class_targets, LayerTargets, matched_layers, patch_moments, TeacherTargets

# EDC's soft category-aware matching: every term is (1 - share) * D(global target) + share *
# D(class target); its code hard-codes one half, and so do we.
CATEGORY_SHARE = 0.5


class EmaSurrogate:
    """Per (key, group) state ``s_hat <- a * s_hat + (1 - a) * s`` (no gradient), starting at 0.

    :meth:`__call__` returns ``s_hat + s - stopgrad(s)``: the value of the EMA, the gradient
    of the current statistic. The state starts at 0, as in the published code (whose "first
    call" branch never runs), so early iterations see a shrunken statistic; it lives as long
    as the matcher, i.e. one batch of work units. Groups whose term is left out of a forward
    keep their state.
    """

    def __init__(self, coefficient: float) -> None:
        self.coefficient = coefficient
        self._state: dict[object, torch.Tensor] = {}

    def __call__(self, key: object, value: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        a = self.coefficient
        with torch.no_grad():
            previous = self._state.get(key, torch.zeros_like(value))
            state = a * previous + (1 - a) * value.detach()
            if keep is not None:
                state = torch.where(keep.view(-1, *([1] * (value.dim() - 1))), state, previous)
            self._state[key] = state
        return state + value - value.detach()


# ------------------------------------------------------------------- matcher
class HookedMatcher:
    """What every matcher shares: its hooks are registered on entering the context and all removed
    on leaving it, whatever happens. Subclasses fill :meth:`_register` (append to ``_handles``) and
    :meth:`_release` (drop what the hooks kept)."""

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self):
        try:
            self._register()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook and drop what they kept (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._release()

    def _register(self) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        pass


class StatMatcher(HookedMatcher):
    """Hooks the matched layers of the given models and accumulates the statistics loss.

    Use as a context manager; the hooks are removed on exit, whatever happens. After each
    forward pass, :meth:`pop` returns the weighted sum over that model's hooked layers, one
    value per group, and clears it. A model without hooked layers contributes zero.

    Args:
        models: the teachers (only those that run contribute to a pass).
        num_groups: groups in each batch; statistics never mix groups.
        first_multiplier: weight of each model's first hooked layer (10 in every paper).
        targets: per model, its :data:`TeacherTargets` from the statistics pass; a model
            with targets also has its convolutions hooked. None: BatchNorm layers only.
        ema: the :class:`EmaSurrogate` coefficient (0: the current statistics).
        conv_drop: probability that a convolution term is left out of a forward, per group.
        generators: one per group: the draws of ``conv_drop`` (never the global RNG).
        labels: each image's class, needed for class targets.
        class_share: weight of the class-target distance (0: the global targets only).
    """

    def __init__(
        self,
        models: Iterable[nn.Module],
        num_groups: int,
        first_multiplier: float = 10.0,
        *,
        targets: Sequence[TeacherTargets] | None = None,
        ema: float = 0.0,
        conv_drop: float = 0.0,
        generators: Sequence[torch.Generator] = (),
        labels: torch.Tensor | None = None,
        class_share: float = 0.0,
    ) -> None:
        self.models = list(models)
        self.num_groups = num_groups
        self.first_multiplier = first_multiplier
        self.targets = targets
        self.ema = EmaSurrogate(ema) if ema > 0 else None
        self.conv_drop = conv_drop
        self.generators = list(generators)
        self.labels = labels
        self.class_share = class_share
        super().__init__()
        self._terms: list[torch.Tensor] = []
        # Where each model without hooked layers runs: its zero term is created there.
        self._unhooked: dict[nn.Module, torch.device] = {}
        self._keep: torch.Tensor | None = None  # this forward's kept convolution terms, (G, convolutions), CPU
        self._kept_by_any: list[bool] = []

    def _register(self) -> None:
        for index, model in enumerate(self.models):
            targets = self.targets[index] if self.targets is not None else None
            layers = matched_layers(model, convolutions=targets is not None)
            if not layers:
                self._unhooked[model] = device_of(model)
            convolutions = sum(isinstance(m, nn.Conv2d) for _, m in layers)
            conv_index = 0
            for position, (name, layer) in enumerate(layers):
                weight = self.first_multiplier if position == 0 else 1.0
                layer_targets = self._prepared(targets.layers.get(name) if targets else None, layer)
                if isinstance(layer, nn.Conv2d):
                    hook = self._conv_hook((index, name), weight, layer_targets, targets.cell, conv_index, convolutions)
                    conv_index += 1
                else:
                    hook = self._bn_hook((index, name), weight, layer_targets)
                self._handles.append(layer.register_forward_hook(hook))

    def _release(self) -> None:
        self._terms.clear()

    def _prepared(self, targets: LayerTargets | None, layer: nn.Module) -> LayerTargets | None:
        """A layer's targets on its device, with the class targets already averaged per group."""
        if targets is None:
            if isinstance(layer, nn.Conv2d):
                raise ValueError(f"no statistics targets for convolution {layer}")
            return None
        if self.class_share == 0:  # the class targets are not needed on the device
            targets = LayerTargets(targets.channel, targets.patch)
        targets = targets.to(device_of(layer))
        if self.class_share > 0:
            if self.labels is None or targets.class_channel is None:
                raise ValueError("class-aware matching needs labels and class targets")
            labels = self.labels.to(device_of(layer))
            targets.class_channel = group_class_targets(targets.class_channel, labels, self.num_groups)
            if targets.class_patch is not None:
                targets.class_patch = group_class_targets(targets.class_patch, labels, self.num_groups)
        return targets

    def _distance(
        self,
        key: tuple[int, str],
        stats: list[torch.Tensor],
        global_targets: list[torch.Tensor],
        class_targets: list[torch.Tensor],
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """D at the (surrogate) statistics: to the global targets, mixed with the class ones when asked."""
        if self.ema is not None:
            stats = [self.ema((*key, i), s, keep) for i, s in enumerate(stats)]
        distance = stat_distance(stats, global_targets)
        if self.class_share > 0:
            distance = (1 - self.class_share) * distance + self.class_share * stat_distance(stats, class_targets)
        return distance

    def _bn_hook(self, key: tuple[int, str], weight: float, targets: LayerTargets | None):
        def hook(module: _BatchNorm, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            mean, var = GroupMoments.apply(inputs[0], self.num_groups)
            classes = list(targets.class_channel) if targets is not None and self.class_share > 0 else []
            distance = self._distance(key, [mean, var], [module.running_mean, module.running_var], classes)
            self._terms.append(distance * weight if weight != 1.0 else distance)

        return hook

    def _conv_hook(
        self, key: tuple[int, str], weight: float, targets: LayerTargets, cell: int, conv_index: int, convolutions: int
    ):
        def hook(module: nn.Conv2d, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0]
            keep = None
            if self.conv_drop > 0:
                if self._keep is None:
                    # One draw per group and convolution of this forward, from each group's own stream.
                    self._keep = torch.stack([torch.rand(convolutions, generator=g) for g in self.generators])
                    self._keep = self._keep >= self.conv_drop
                    # Which convolutions any group keeps, read from host memory once per forward.
                    self._kept_by_any = self._keep.any(0).tolist()
                if not self._kept_by_any[conv_index]:
                    self._terms.append(torch.zeros(self.num_groups, device=x.device))
                    return
                keep = to_device(self._keep[:, conv_index], x.device)
            mean, var = GroupMoments.apply(x, self.num_groups)
            patch_mean, patch_var = patch_moments(x, cell, self.num_groups)
            stats = [mean, var, patch_mean, patch_var]
            global_targets = [*targets.channel, *targets.patch]
            classes = [*targets.class_channel, *targets.class_patch] if self.class_share > 0 else []
            distance = self._distance(key, stats, global_targets, classes, keep)
            if keep is not None:
                distance = distance * keep
            self._terms.append(distance * weight if weight != 1.0 else distance)

        return hook

    def pop(self, model: nn.Module) -> torch.Tensor:
        """Sum of the weighted per-layer distances of ``model``'s last forward pass, shape (num_groups,).

        Zeros, on the model's device, for a model without hooked layers.
        """
        self._keep = None
        if not self._terms:
            if model in self._unhooked:
                return torch.zeros(self.num_groups, device=self._unhooked[model])
            raise RuntimeError("no matched layer ran in the last forward pass")
        total = torch.stack(self._terms).sum(0)
        self._terms.clear()
        return total


class BNStatMatcher(StatMatcher):
    """BatchNorm layers only, matched to their running buffers (FADRM, SRe2L, RDED, CV-DD)."""

    def __init__(
        self, models: Iterable[nn.Module], num_groups: int, first_bn_multiplier: float = 10.0, ema: float = 0.0
    ) -> None:
        super().__init__(models, num_groups, first_bn_multiplier, ema=ema)


class _SwappedModule:
    """``parent.<name>`` replaced by another module until :meth:`remove` puts the original back."""

    def __init__(self, parent: nn.Module, name: str, replacement: nn.Module) -> None:
        self.parent, self.name = parent, name
        self.original = getattr(parent, name)
        setattr(parent, name, replacement)

    def remove(self) -> None:
        setattr(self.parent, self.name, self.original)


class FusedStatMatcher(StatMatcher):
    """:class:`StatMatcher`'s loss (the same arguments), computed by
    :class:`~fadrm.synthesis.fused.FusedStatisticsLoss`: all of a model's statistics in one node.

    While the context is open, each BatchNorm layer of the (uncompiled) teachers is replaced
    by a :class:`~fadrm.synthesis.fused.BatchNormTap` wrapping it (the originals are put back on
    leaving, whatever happens) and each matched convolution's input is kept by a hook.
    :meth:`pop` computes the loss of all of a model's layers at once; for FADRM's BatchNorm
    layers that is about a twelfth of the host operations the per-layer path adds to the bare
    model's (``benchmarks/host_cost.py``). The same loss; float rounding differs. Convolution
    terms are dropped per group with the same draws as the per-layer path (one per group and
    convolution, from each group's stream, once per forward).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._layouts: dict[nn.Module, FusedLayout] = {}
        self._ema_state: dict[nn.Module, dict] = {}
        self._taps: dict[nn.Module, list[BatchNormTap]] = {}
        self._inputs: dict[nn.Module, list[torch.Tensor | None]] = {}  # each matched convolution's input
        # The keep matrix's last column: BatchNorm terms are never dropped.
        self._bn_kept = torch.ones(self.num_groups, 1, dtype=torch.bool)

    def _register(self) -> None:
        for index, model in enumerate(self.models):
            if hasattr(model, "_orig_mod"):
                raise ValueError("fused statistics cannot replace the layers of a compiled teacher")
            targets = self.targets[index] if self.targets is not None else None
            layers = matched_layers(model, convolutions=targets is not None)
            if not layers:
                self._unhooked[model] = device_of(model)
                continue
            terms, global_targets, class_targets, taps = [], [], [], []
            inputs: list[torch.Tensor | None] = []
            for name, layer in layers:
                prepared = self._prepared(targets.layers.get(name) if targets else None, layer)
                if isinstance(layer, nn.Conv2d):
                    terms.append(FusedTerm(prepared.channel[0].numel(), prepared.patch[0].numel(), targets.cell))
                    global_targets.append((*prepared.channel, *prepared.patch))
                    class_targets.append((*prepared.class_channel, *prepared.class_patch) if self.class_share else ())
                    self._handles.append(layer.register_forward_hook(self._keep_input(inputs, len(inputs))))
                    inputs.append(None)
                else:
                    terms.append(FusedTerm(layer.running_mean.numel()))
                    global_targets.append((layer.running_mean, layer.running_var))
                    class_targets.append(tuple(prepared.class_channel) if self.class_share else ())
                    taps.append(BatchNormTap(layer, self.num_groups))
            weights = [self.first_multiplier] + [1.0] * (len(layers) - 1)
            class_rows = class_targets if self.class_share else None
            self._layouts[model] = FusedLayout.build(
                terms, weights, self.num_groups, global_targets, class_rows, device_of(model)
            )
            self._ema_state[model] = {}
            self._taps[model] = taps
            self._inputs[model] = inputs
            self._swap(model, taps)

    def _swap(self, model: nn.Module, taps: list[BatchNormTap]) -> None:
        """Put each tap where its layer sits, everywhere it sits (a layer or block used twice included:
        the tap then refuses the second run)."""
        tap_of = {id(tap.layer): tap for tap in taps}
        places = [name for name, m in model.named_modules(remove_duplicate=False) if id(m) in tap_of]
        swapped: set[tuple[int, str]] = set()
        for name in places:
            parent, _, attribute = name.rpartition(".")
            owner = model.get_submodule(parent)
            if (id(owner), attribute) not in swapped:
                swapped.add((id(owner), attribute))
                self._handles.append(_SwappedModule(owner, attribute, tap_of[id(getattr(owner, attribute))]))

    @staticmethod
    def _keep_input(inputs: list[torch.Tensor | None], position: int):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if inputs[position] is not None:
                raise RuntimeError(
                    f"convolution {module} ran twice in one forward pass; the fused statistics "
                    "loss needs each layer once"
                )
            inputs[position] = args[0]

        return hook

    def _release(self) -> None:
        super()._release()
        for taps in self._taps.values():
            for tap in taps:
                tap.statistics = None
        for inputs in self._inputs.values():
            inputs[:] = [None] * len(inputs)

    def pop(self, model: nn.Module) -> torch.Tensor:
        """The weighted statistics loss of ``model``'s last forward pass, shape (num_groups,) (zeros for a
        model without matched layers)."""
        if model in self._unhooked:
            return torch.zeros(self.num_groups, device=self._unhooked[model])
        taps, inputs = self._taps[model], self._inputs[model]
        kept = [tap.statistics for tap in taps]
        if any(k is None for k in kept) or any(x is None for x in inputs):
            raise RuntimeError("not every matched layer ran in the last forward pass")
        for tap in taps:
            tap.statistics = None
        convolution_inputs = list(inputs)
        inputs[:] = [None] * len(inputs)
        firsts, seconds, tap_shapes = zip(*kept) if kept else ((), (), ())
        layout = self._layouts[model]
        shapes, tap_shapes, convolution_shapes = [], iter(tap_shapes), iter(x.shape for x in convolution_inputs)
        for term in layout.terms:
            shapes.append(next(convolution_shapes) if term.cells else next(tap_shapes))
        keep = None
        if self.conv_drop > 0 and convolution_inputs:
            # One draw per group and convolution of this forward, from each group's own stream (the
            # per-layer path's draws), and an always-kept column for the BatchNorm terms.
            drawn = torch.stack([torch.rand(len(convolution_inputs), generator=g) for g in self.generators])
            keep = torch.cat([drawn >= self.conv_drop, self._bn_kept], 1)
            keep = to_device(keep, layout.targets.device)
        ema = self._ema_state[model] if self.ema is not None else None
        coefficient = self.ema.coefficient if self.ema is not None else 0.0
        return FusedStatisticsLoss.apply(
            layout, ema, coefficient, self.class_share, keep, tuple(shapes), *firsts, *seconds, *convolution_inputs
        )


class FusedBatchNormMatcher(FusedStatMatcher):
    """:class:`BNStatMatcher`'s loss, fused: BatchNorm layers only, matched to their running buffers."""

    def __init__(
        self, models: Iterable[nn.Module], num_groups: int, first_bn_multiplier: float = 10.0, ema: float = 0.0
    ) -> None:
        super().__init__(models, num_groups, first_bn_multiplier, ema=ema)


# ------------------------------------------------------------------ registry
@dataclass(frozen=True)
class MatchSetup:
    """What a matcher is built from, once per batch of work units.

    Attributes:
        teachers: the models that may run.
        num_groups: groups in the batch.
        settings: the synthesis settings (first-layer weight, EMA, convolution drop).
        labels: each image's class, (G*B,).
        generators: one random stream per group.
        targets: per teacher, its statistics targets (None where the matcher needs none).
        fused: compute the loss with the matcher's fused counterpart (:class:`FusedStatMatcher`,
            ``--fused-statistics``).
    """

    teachers: Sequence[nn.Module]
    num_groups: int
    settings: SynthesisConfig
    labels: torch.Tensor
    generators: Sequence[torch.Generator]
    targets: Sequence[TeacherTargets] | None = None
    fused: bool = False


@dataclass(frozen=True)
class MatcherKind:
    """A registered matcher.

    Attributes:
        build: the matcher for one batch.
        statistics: whether it needs the teachers' statistics files (``fadrm stats``).
    """

    build: Callable[[MatchSetup], StatMatcher]
    statistics: bool = False


def _batchnorm(setup: MatchSetup) -> StatMatcher:
    kind = FusedBatchNormMatcher if setup.fused else BNStatMatcher
    return kind(setup.teachers, setup.num_groups, setup.settings.first_bn_multiplier, setup.settings.stat_ema)


def _with_convolutions(class_share: float) -> Callable[[MatchSetup], StatMatcher]:
    def build(setup: MatchSetup) -> StatMatcher:
        settings = setup.settings
        kind = FusedStatMatcher if setup.fused else StatMatcher
        return kind(
            setup.teachers,
            setup.num_groups,
            settings.first_bn_multiplier,
            targets=setup.targets,
            ema=settings.stat_ema,
            conv_drop=settings.conv_drop,
            generators=setup.generators,
            labels=setup.labels,
            class_share=class_share,
        )

    return build


MATCHERS: Registry[MatcherKind] = Registry("statistics matcher")
# BatchNorm layers against their running buffers (FADRM, SRe2L, CV-DD).
MATCHERS.add("batchnorm", MatcherKind(_batchnorm))
# G-VBSM: BatchNorm layers and convolution inputs against the training set's statistics.
MATCHERS.add("batchnorm+conv", MatcherKind(_with_convolutions(0.0), statistics=True))
# EDC: the same, each distance averaged with the distance to the group's class targets.
MATCHERS.add("category-aware", MatcherKind(_with_convolutions(CATEGORY_SHARE), statistics=True))
