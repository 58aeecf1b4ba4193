"""Work units and their random streams.

A synthesis unit is one group: the images of ``classes_per_group``
consecutive classes at one IPC index. Its random stream is derived from
(seed, unit) only, so results do not depend on which process runs the unit,
in what order, or batched with which other units.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


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


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from the run seed and a unit's identity (stable across Python versions)."""
    text = "/".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def make_generator(seed: int, *parts: object) -> torch.Generator:
    """A CPU generator seeded by :func:`derive_seed`."""
    return torch.Generator().manual_seed(derive_seed(seed, *parts))
