"""Benchmark shapes and one method's synthesis case at a shape, shared by the benchmarks.

Random-weight teachers from fadrm's registry (speed and op counts do not depend on the
weights); G-VBSM's and EDC's statistics targets are synthetic tensors of the right shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from fadrm.config import SynthesisConfig
from fadrm.hostcost import CountHostCost, HostCost
from fadrm.models import build_model
from fadrm.runtime import Runtime
from fadrm.seeding import make_generator
from fadrm.synthesis.matching import MATCHERS, MatcherKind
from fadrm.synthesis.targets import TeacherTargets, cell_size, random_targets
from fadrm.synthesis.methods import METHODS, TeacherPlan
from fadrm.synthesis.recover import recover


@dataclass(frozen=True)
class Shape:
    """One benchmark shape: the teacher architecture, classes, images per batch, stage sizes."""

    model: str
    classes: int
    batch: int
    sizes: tuple[int, ...]
    channels: int = 3
    reference: str | None = None  # the reference script's config of the same shape


SHAPES = {
    "cifar100": Shape("cifar_resnet18", 100, 100, (32,), reference="cifar100"),
    "imagenet": Shape("resnet18", 1000, 100, (200, 224)),
}
DRY_SHAPES = {"toy": Shape("convnet-small", 10, 20, (24, 28), channels=1)}
# method -> (teachers, committee weights or None, images per class in a group)
METHOD_SETUPS = {
    "fadrm": (1, None, 1),
    "fadrm+": (4, None, 1),
    "sre2l": (1, None, 1),
    "sre2l++": (1, None, 1),
    "g-vbsm": (1, None, 10),
    "edc": (1, None, 10),
    "cv-dd": (2, (0.5, 0.5), 1),
}


def synthetic_targets(model: torch.nn.Module, shape: Shape, size: int) -> TeacherTargets:
    """Statistics targets of the right shapes for every hooked layer of ``model`` (G-VBSM, EDC)."""
    return random_targets(model, shape.channels, size, cell_size(shape.sizes[-1]), shape.classes)


@dataclass
class Case:
    """Everything :func:`~fadrm.synthesis.recover.recover` takes for one method at one shape."""

    method: str
    teachers: list[torch.nn.Module]
    settings: SynthesisConfig
    matcher: MatcherKind
    targets: list[TeacherTargets] | None
    labels: torch.Tensor
    plan: TeacherPlan
    init: torch.Tensor
    bounds: tuple[torch.Tensor, torch.Tensor]
    slots: int

    @property
    def period(self) -> int:
        """Iterations after which the teacher schedule repeats (round robin over several teachers)."""
        return len(self.plan.teachers) if self.plan.weights is None else 1

    def run(self, runtime: Runtime, per_stage: int) -> None:
        """``per_stage`` iterations in each of the method's stages."""
        staged = replace(self.settings, budgets=[per_stage] * len(self.settings.sizes))
        recover(
            self.init,
            self.labels,
            self.teachers,
            [make_generator(0, "benchmark", 0)],
            staged,
            runtime,
            self.bounds,
            matcher=self.matcher.build,
            plan=self.plan,
            targets=self.targets,
            slots=self.slots,
        )


def preset_settings(dataset: str, method: str) -> tuple[SynthesisConfig, str]:
    """The synthesis settings and precision ``fadrm distill`` resolves for ``method`` on ``dataset``'s
    preset (IPC 10; nothing is read)."""
    from fadrm.api import distill_config

    teachers = [f"/benchmark/teacher{k}.pt" for k in range(METHOD_SETUPS[method][0])]
    config = distill_config(dataset=dataset, teachers=teachers, out="/benchmark/out", method=method, ipc=10)
    return config.synthesis, config.amp


def build_case(shape: Shape, method: str, runtime: Runtime, settings: SynthesisConfig | None = None) -> Case:
    """``method``'s synthesis at ``shape``: its teachers (:data:`METHOD_SETUPS`), stage plan, matcher, groups.

    ``settings``: the configured synthesis settings (e.g. :func:`preset_settings`); by default
    ``shape``'s sizes with the method's own defaults (no dataset's preset).
    """
    num_teachers, weights, slots = METHOD_SETUPS[method]
    spec = METHODS.get(method)
    torch.manual_seed(0)
    teachers = [
        runtime.place(
            build_model(shape.model, shape.classes, shape.channels, shape.sizes[-1]).eval().requires_grad_(False)
        )
        for _ in range(num_teachers)
    ]
    if settings is None:
        defaults = spec.defaults.get("distill", {})
        settings = SynthesisConfig(
            sizes=list(shape.sizes),
            budgets=[1] * len(shape.sizes),
            jitter=4,
            stat_ema=defaults.get("stat_ema", 0.0),
            conv_drop=defaults.get("conv_drop", 0.0),
            dd_weight=defaults.get("dd_weight", 0.0),
        )
    settings = spec.stage_plan(settings)
    matcher = MATCHERS.get(spec.matcher)
    targets = [synthetic_targets(t, shape, shape.sizes[-1]) for t in teachers] if matcher.statistics else None
    size = shape.sizes[-1]
    bounds = (torch.full((1, shape.channels, 1, 1), -3.0), torch.full((1, shape.channels, 1, 1), 3.0))
    return Case(
        method,
        teachers,
        settings,
        matcher,
        targets,
        torch.arange(shape.batch) // slots % shape.classes,
        TeacherPlan(tuple(range(num_teachers)), weights),
        torch.rand(shape.batch, shape.channels, size, size),
        bounds,
        slots,
    )


def count_recover(shape: Shape, method: str, runtime: Runtime) -> HostCost:
    """Our loop's host cost per iteration for ``method`` at ``shape``: (count at 2n - count at n) / n per stage."""
    case = build_case(shape, method, runtime)

    def counted(per_stage: int) -> HostCost:
        with CountHostCost() as counting:
            case.run(runtime, per_stage)
        return counting.cost

    n = case.period
    return (counted(2 * n) - counted(n)).scaled(1 / (n * len(case.settings.sizes)))
