"""Work units: which images are optimised together.

A synthesis unit is one group: the images of ``classes_per_group``
consecutive classes at one IPC index. Its random stream is derived from
(seed, unit) only (see :mod:`fadrm.seeding`), so results do not depend on
which process runs the unit, in what order, or batched with which other units.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Unit:
    """One group of images optimised together (shared BN statistics)."""

    ipc_index: int
    group: int
    classes: tuple[int, ...]

    @property
    def key(self) -> str:
        return f"ipc{self.ipc_index:04d}-group{self.group:04d}"


def plan_units(num_classes: int, ipc: int, classes_per_group: int) -> list[Unit]:
    """All units of a run, IPC index major: every class's first image comes first."""
    groups = [tuple(range(s, min(s + classes_per_group, num_classes))) for s in range(0, num_classes, classes_per_group)]
    return [Unit(i, g, classes) for i in range(ipc) for g, classes in enumerate(groups)]

