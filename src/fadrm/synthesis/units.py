"""Work units: which images are optimised together, planned by a registered unit plan.

A synthesis unit is one group: the images that share statistics. Two plans exist:

* ``per-ipc`` (FADRM, SRe2L, RDED, CV-DD): one image of each of ``classes_per_group``
  consecutive classes at one IPC index;
* ``class-major`` (G-VBSM, EDC): ``k`` consecutive classes with ``s`` consecutive IPC
  slots each, ``k * s = group_images`` (``s`` is the IPC unless ``group_slots`` is given).

A unit's random stream is derived from (seed, ipc_index, group) only (see
:mod:`fadrm.seeding`), so results do not depend on which process runs it, in what order,
or batched with which other units.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..config import SynthesisConfig
from ..registry import Registry
from ..seeding import make_generator


@dataclass(frozen=True)
class Unit:
    """One group of images optimised together (shared statistics).

    Attributes:
        ipc_index: the first IPC index the unit holds.
        group: which group of classes.
        classes: its classes, consecutive.
        slots: consecutive IPC indices from ``ipc_index`` held for every class (1: one
            image per class).
    """

    ipc_index: int
    group: int
    classes: tuple[int, ...]
    slots: int = 1

    @property
    def key(self) -> str:
        if self.slots == 1:
            return f"ipc{self.ipc_index:04d}-group{self.group:04d}"
        return f"ipc{self.ipc_index:04d}-{self.ipc_index + self.slots - 1:04d}-group{self.group:04d}"

    @property
    def images(self) -> list[tuple[int, int]]:
        """(class, IPC index) of each image, in batch order: class-major, slots consecutive."""
        return [(c, self.ipc_index + j) for c in self.classes for j in range(self.slots)]

    @property
    def size(self) -> int:
        """Images in the unit."""
        return len(self.classes) * self.slots

    def generator(self, seed: int) -> torch.Generator:
        """The unit's own random stream (initial images, views, dropped terms)."""
        return make_generator(seed, "synth", self.ipc_index, self.group)


def _class_groups(num_classes: int, per_group: int) -> list[tuple[int, ...]]:
    return [tuple(range(s, min(s + per_group, num_classes))) for s in range(0, num_classes, per_group)]


def plan_units(num_classes: int, ipc: int, classes_per_group: int) -> list[Unit]:
    """All units of a run, IPC index major: every class's first image comes first."""
    groups = _class_groups(num_classes, classes_per_group)
    return [Unit(i, g, classes) for i in range(ipc) for g, classes in enumerate(groups)]


def class_major_slots(ipc: int, synthesis: SynthesisConfig) -> int:
    """IPC slots of each class in one class-major group."""
    return min(synthesis.group_slots or ipc, ipc)


def class_major_problem(ipc: int, synthesis: SynthesisConfig) -> str | None:
    """Why ``ipc`` and the group settings cannot form class-major groups, or None."""
    slots = class_major_slots(ipc, synthesis)
    images = synthesis.group_images or slots
    if ipc % slots:
        return f"--group-slots {slots} must divide --ipc {ipc}"
    if images % slots:
        what = "--ipc" if slots == ipc else "--group-slots"
        return (
            f"{what} {slots} does not divide the group of --group-images {images} (each group holds whole "
            f"classes with {slots} images each)"
        )
    return None


def plan_class_major_units(num_classes: int, ipc: int, synthesis: SynthesisConfig) -> list[Unit]:
    """All units of a class-major run: each chunk of IPC slots, then each group of classes."""
    slots = class_major_slots(ipc, synthesis)
    groups = _class_groups(num_classes, max(1, (synthesis.group_images or slots) // slots))
    return [Unit(start, g, classes, slots) for start in range(0, ipc, slots) for g, classes in enumerate(groups)]


@dataclass(frozen=True)
class UnitPlan:
    """How a method groups its images.

    Attributes:
        plan: (number of classes, IPC, synthesis settings) -> every unit of the run.
        problem: why an IPC and the settings cannot be planned (one line), or None.
    """

    plan: Callable[[int, int, SynthesisConfig], list[Unit]]
    problem: Callable[[int, SynthesisConfig], str | None] = lambda ipc, synthesis: None


UNIT_PLANS: Registry[UnitPlan] = Registry("unit plan")
UNIT_PLANS.add("per-ipc", UnitPlan(lambda classes, ipc, s: plan_units(classes, ipc, s.classes_per_group)))
UNIT_PLANS.add("class-major", UnitPlan(plan_class_major_units, class_major_problem))
