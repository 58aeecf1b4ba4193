"""The methods, as registered objects that carry their own behaviour.

A method names, each from a registry: its initialiser (where the images start:
Gaussian noise or realistic patches, :mod:`fadrm.synthesis.init`), its stage plan
(how the configured stages are run), its statistics matcher (what the images
must reproduce in the teachers) and its teacher policy (which teacher each
iteration uses). It may also bring default options for any stage (its own
published relabel or student protocol), which the dataset presets refine. The
pipeline asks the method; it never branches on a method's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

from torch import nn

from ..config import SynthesisConfig
from ..registry import Registry
from .bn_stats import BNStatMatcher

@dataclass(frozen=True)
class StagePlan:
    """How a method runs the configured stages.

    Attributes:
        stages: the configured synthesis settings -> those really run.
        optimises: False when the pixels are never optimised, so the initial images are
            the result (written byte for byte where they are files).
    """

    stages: Callable[[SynthesisConfig], SynthesisConfig]
    optimises: bool = True


STAGE_PLANS: Registry[StagePlan] = Registry("stage plan")
STAGE_PLANS.add("multi-resolution", StagePlan(lambda s: s))
# SRe2L-style: the whole budget in one full-resolution stage (no ARC between stages).
STAGE_PLANS.add("single-stage", StagePlan(lambda s: replace(s, sizes=[s.sizes[-1]], budgets=[sum(s.budgets)])))
# RDED: no optimisation; the initial images are the result.
STAGE_PLANS.add("none", StagePlan(lambda s: replace(s, sizes=[s.sizes[-1]], budgets=[0]), optimises=False))

# What synthesis matches: a context manager built as factory(teachers, groups, first_multiplier)
# whose pop(teacher) returns the per-group statistics loss of the teacher's last forward.
MATCHERS: Registry[Callable[..., Any]] = Registry("statistics matcher")
MATCHERS.add("batchnorm", BNStatMatcher)


# Which teacher iteration ``step`` uses.
TeacherPolicy = Callable[[int, Sequence[nn.Module]], nn.Module]
TEACHER_POLICIES: Registry[TeacherPolicy] = Registry("teacher policy")


def round_robin(step: int, teachers: Sequence[nn.Module]) -> nn.Module:
    """Iteration ``step`` uses teacher ``step mod K`` (FADRM+'s published schedule)."""
    return teachers[step % len(teachers)]


TEACHER_POLICIES.add("round-robin", round_robin)


@dataclass(frozen=True)
class Method:
    """One distillation method on the shared engine.

    Attributes:
        name: registry name.
        summary: one line for ``--help`` and ``fadrm list methods``.
        initialiser: an :data:`~fadrm.synthesis.init.INITIALISERS` name.
        stages: a :data:`STAGE_PLANS` name.
        matcher: a :data:`MATCHERS` name.
        teacher_policy: a :data:`TEACHER_POLICIES` name.
        max_teachers: how many teachers the method accepts (None: any number).
        defaults: options the method brings per stage section ("distill", "evaluate", ...),
            under the dataset presets.
    """

    name: str
    summary: str
    initialiser: str
    stages: str
    matcher: str = "batchnorm"
    teacher_policy: str = "round-robin"
    max_teachers: int | None = 1
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)

    def stage_plan(self, synthesis: SynthesisConfig) -> SynthesisConfig:
        """The synthesis settings this method really runs for the configured ones."""
        return STAGE_PLANS.get(self.stages).stages(synthesis)

    @property
    def optimises(self) -> bool:
        """Whether the method optimises pixels at all (otherwise its initial images are its result)."""
        return STAGE_PLANS.get(self.stages).optimises


METHODS: Registry[Method] = Registry("method")

for _method in (
    Method("fadrm", "patch init, multi-resolution stages with ARC, one teacher", "patches", "multi-resolution"),
    Method("fadrm+", "FADRM with several teachers, round-robin per iteration", "patches", "multi-resolution",
           max_teachers=None),  # fmt: skip
    Method("sre2l", "Gaussian init, one full-size stage, no ARC", "noise", "single-stage"),
    Method("sre2l++", "patch init, one full-size stage, no ARC (CV-DD's SRe2L++)", "patches", "single-stage"),
    Method("rded", "the selected real patches, no optimisation", "patches", "none"),
):
    METHODS.add(_method.name, _method)
