"""The methods, as registered objects that carry their own behaviour.

A method names, each from a registry: its initialiser (where the images start:
Gaussian noise, realistic patches or real images, :mod:`fadrm.synthesis.init`), its stage
plan (how the configured stages are run), its unit plan (which images share statistics,
:mod:`fadrm.synthesis.units`), its statistics matcher (what the images must reproduce in
the teachers, :mod:`fadrm.synthesis.matching`) and its teacher policy (which teachers each
iteration uses, and how they count). It may also bring default options for any stage (its
own published relabel or student protocol), which the dataset presets refine. The
pipeline asks the method; it never branches on a method's name.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch

from ..config import DistillConfig, SynthesisConfig
from ..errors import FadrmError
from ..registry import Registry
from ..seeding import make_generator
from .init import INITIALISERS
from .matching import MATCHERS
from .units import UNIT_PLANS, Unit


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


# ----------------------------------------------------------------- teachers
@dataclass(frozen=True)
class TeacherPlan:
    """Which teachers a unit's iterations run, and how each one counts.

    Attributes:
        teachers: positions in the run's teachers.
        weights: None: one teacher per iteration, ``teachers[t mod len(teachers)]`` at
            iteration t (round robin); otherwise every member at every iteration, on the
            same view, member k's loss (cross-entropy + statistics) weighted ``weights[k]``.
    """

    teachers: tuple[int, ...]
    weights: tuple[float, ...] | None = None

    def members(self, step: int) -> list[tuple[int, float | None]]:
        """(teacher position, weight or None for an unweighted single teacher) of iteration ``step``."""
        if self.weights is None:
            return [(self.teachers[step % len(self.teachers)], None)]
        return list(zip(self.teachers, self.weights))

    def describe(self) -> dict[str, Any]:
        """What a unit record says about its committee (nothing for round robin)."""
        if self.weights is None:
            return {}
        return {"committee": list(self.teachers), "committee_weights": [round(w, 6) for w in self.weights]}


@dataclass(frozen=True)
class TeacherPolicy:
    """How a method uses its teachers.

    Attributes:
        plans: (the run's config, number of teachers) -> the :class:`TeacherPlan` of each unit.
        problem: why a number of teachers and the settings do not fit (one line), or None.
        uses_priors: whether several teachers are weighed by their ``priors`` (without them,
            equally); ``fadrm run`` computes them where none are given (:mod:`fadrm.priors`).
    """

    plans: Callable[[DistillConfig, int], Callable[[Unit], TeacherPlan]]
    problem: Callable[[int, SynthesisConfig], str | None] = lambda teachers, synthesis: None
    uses_priors: bool = False


def round_robin(config: DistillConfig, num_teachers: int) -> Callable[[Unit], TeacherPlan]:
    """Every unit: iteration t uses teacher t mod K (FADRM+'s, G-VBSM's and EDC's schedule)."""
    plan = TeacherPlan(tuple(range(num_teachers)))
    return lambda unit: plan


# CV-DD's synthesis weighs committee member k by softmax(prior / 5)_k (its relabelling uses 10).
COMMITTEE_TEMPERATURE = 5.0


def committee_weights(priors: Sequence[float]) -> tuple[float, ...]:
    """softmax(prior / 5) over a committee's members."""
    return tuple(torch.softmax(torch.tensor(priors, dtype=torch.float64) / COMMITTEE_TEMPERATURE, 0).tolist())


def committees(num_teachers: int, ipc: int, synthesis: SynthesisConfig, seed: int) -> list[tuple[int, ...]]:
    """The committee of each IPC index, as CV-DD chooses them, seeded where it draws at random.

    ``fixed_committee`` if given, at every index; at IPC 1 the ``committee_size`` teachers
    with the highest priors (the first ones without priors); while there are enough, the
    distinct combinations in lexicographic order, one per index (CV-DD at IPC 10: the 10
    pairs of 5 teachers); beyond that a sample of ``committee_size`` per index drawn from
    (seed, index) (CV-DD at IPC 50 draws unseeded).
    """
    size = synthesis.committee_size
    if synthesis.fixed_committee:
        return [tuple(sorted(synthesis.fixed_committee))] * ipc
    if ipc == 1:
        priors = synthesis.priors or [0.0] * num_teachers
        ranked = sorted(range(num_teachers), key=lambda k: -priors[k])  # stable: ties keep --teacher order
        return [tuple(sorted(ranked[:size]))]
    combinations = list(itertools.combinations(range(num_teachers), size))
    if ipc <= len(combinations):
        return combinations[:ipc]
    draws = (torch.randperm(num_teachers, generator=make_generator(seed, "committee", i)) for i in range(ipc))
    return [tuple(sorted(d[:size].tolist())) for d in draws]


def committee_plans(config: DistillConfig, num_teachers: int) -> Callable[[Unit], TeacherPlan]:
    """Every unit: its IPC index's committee, each member weighted by softmax(prior / 5)."""
    synthesis = config.synthesis
    priors = synthesis.priors or [0.0] * num_teachers
    plans = [
        TeacherPlan(c, committee_weights([priors[k] for k in c]))
        for c in committees(num_teachers, config.ipc, synthesis, config.seed)
    ]
    return lambda unit: plans[unit.ipc_index]


def committee_problem(num_teachers: int, synthesis: SynthesisConfig) -> str | None:
    """Why the committee settings do not fit ``num_teachers`` teachers, or None."""
    size, fixed, priors = synthesis.committee_size, synthesis.fixed_committee, synthesis.priors
    if size > num_teachers:
        return f"a committee of --committee-size {size} needs at least {size} teachers, got {num_teachers}"
    if fixed is not None and (len(fixed) != size or len(set(fixed)) != size or max(fixed) >= num_teachers):
        return (
            f"--fixed-committee {' '.join(map(str, fixed))} must name {size} different teacher positions "
            f"(0 to {num_teachers - 1}, in --teacher order)"
        )
    if priors is not None and len(priors) != num_teachers:
        return (
            f"got {len(priors)} --prior values for {num_teachers} teacher(s); give one per --teacher, in the same "
            "order (fadrm priors computes them)"
        )
    return None


TEACHER_POLICIES: Registry[TeacherPolicy] = Registry("teacher policy")
TEACHER_POLICIES.add("round-robin", TeacherPolicy(round_robin))
TEACHER_POLICIES.add("committee", TeacherPolicy(committee_plans, committee_problem, uses_priors=True))


# ------------------------------------------------------------------ methods
@dataclass(frozen=True)
class Method:
    """One distillation method on the shared engine.

    Attributes:
        name: registry name.
        summary: one line for ``--help`` and ``fadrm list methods``.
        initialiser: an :data:`~fadrm.synthesis.init.INITIALISERS` name.
        stages: a :data:`STAGE_PLANS` name.
        matcher: a :data:`~fadrm.synthesis.matching.MATCHERS` name.
        teacher_policy: a :data:`TEACHER_POLICIES` name.
        units: a :data:`~fadrm.synthesis.units.UNIT_PLANS` name.
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
    units: str = "per-ipc"
    max_teachers: int | None = 1
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)

    def stage_plan(self, synthesis: SynthesisConfig) -> SynthesisConfig:
        """The synthesis settings this method really runs for the configured ones."""
        return STAGE_PLANS.get(self.stages).stages(synthesis)

    @property
    def optimises(self) -> bool:
        """Whether the method optimises pixels at all (otherwise its initial images are its result)."""
        return STAGE_PLANS.get(self.stages).optimises

    @property
    def uses_priors(self) -> bool:
        """Whether its teacher policy weighs several teachers by their priors."""
        return TEACHER_POLICIES.get(self.teacher_policy).uses_priors

    @property
    def needs_statistics(self) -> bool:
        """Whether its matcher needs the teachers' statistics files (``fadrm stats``)."""
        return MATCHERS.get(self.matcher).statistics

    def problem(self, config: DistillConfig) -> str | None:
        """Why this method cannot run ``config`` (its teachers, IPC and groups against its strategies), or None.

        Checked before anything is read or trained (:func:`fadrm.synthesis.pipeline.distill` and
        ``fadrm run``'s plan); the rules that need no method are the config's own.
        """
        teachers = len(config.teachers)
        if self.max_teachers is not None and teachers > self.max_teachers:
            return f"uses at most {self.max_teachers} teacher(s), got {teachers}; use fadrm+ for several"
        return (
            UNIT_PLANS.get(self.units).problem(config.ipc, config.synthesis)
            or TEACHER_POLICIES.get(self.teacher_policy).problem(teachers, config.synthesis)
            or INITIALISERS.get(self.initialiser).problem(config)
        )


METHODS: Registry[Method] = Registry("method")

# The published settings that hold on every dataset (docs/method.md); the presets add the rest.
# All three ran in full precision.
_G_VBSM = {"stat_ema": 0.8, "conv_drop": 0.4, "dd_weight": 1.0, "group_images": 100, "amp": "off"}
_EDC = {"stat_ema": 0.8, "group_images": 100, "crop_scale": [0.5, 1.0], "amp": "off"}
_CV_DD = {"committee_size": 2, "amp": "off"}
# Their students on every dataset (docs/method.md; the presets' evaluate overrides add optimiser, rates, batches).
# G-VBSM: MSE + CE on raw logits, eval-mode teachers, stored labels, plain cosine.
_G_VBSM_STUDENTS = {
    "loss": "mse-ce",
    "ce_weight": 0.1,
    "bssl": False,
    "labels": "stored",
    "accumulation": 1,
    "eta": 1.0,
}
# EDC: MSE + 0.025 CE, an EMA of the weights validated, eval-mode teachers, crops of 50-100%, cosine stretched by 2.
_EDC_STUDENTS = {
    "loss": "mse-ce",
    "ce_weight": 0.025,
    "ema_decay": 0.99,
    "bssl": False,
    "accumulation": 1,
    "crop_scale": [0.5, 1.0],
    "eta": 2.0,
}

for _method in (
    Method("fadrm", "patch init, multi-resolution stages with ARC, one teacher", "patches", "multi-resolution"),
    Method(
        "fadrm+",
        "FADRM with several teachers, round-robin per iteration",
        "patches",
        "multi-resolution",
        max_teachers=None,
    ),
    Method("sre2l", "Gaussian init, one full-size stage, no ARC", "noise", "single-stage"),
    Method("sre2l++", "patch init, one full-size stage, no ARC (CV-DD's SRe2L++)", "patches", "single-stage"),
    Method("rded", "the selected real patches, no optimisation", "patches", "none"),
    Method(
        "g-vbsm",
        "Gaussian init, BN and convolution-input statistics with EMA, data densification, "
        "class-major groups, teachers round-robin",
        "noise",
        "single-stage",
        matcher="batchnorm+conv",
        units="class-major",
        max_teachers=None,
        defaults={"distill": _G_VBSM, "evaluate": _G_VBSM_STUDENTS},
    ),
    Method(
        "edc",
        "real-image init, G-VBSM's statistics mixed with class targets, class-major groups, teachers round-robin",
        "real-images",
        "single-stage",
        matcher="category-aware",
        units="class-major",
        max_teachers=None,
        defaults={"distill": _EDC, "evaluate": _EDC_STUDENTS},
    ),
    Method(
        "cv-dd",
        "SRe2L++ with a committee of teachers per IPC index, weighted by their priors",
        "patches",
        "single-stage",
        teacher_policy="committee",
        max_teachers=None,
        defaults={"distill": _CV_DD},
    ),
):
    METHODS.add(_method.name, _method)


def method_for(config: DistillConfig) -> Method:
    """The method of ``config``, refused in one line naming it when it cannot run the config
    (:meth:`Method.problem`)."""
    method = METHODS.get(config.method)
    problem = method.problem(config)
    if problem:
        raise FadrmError(f"{method.name}: {problem}")
    return method
