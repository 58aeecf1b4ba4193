"""The methods: FADRM, FADRM+ and the baselines, as switches on one engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..registry import Registry


@dataclass(frozen=True)
class Method:
    """Which parts of the engine a method uses.

    Attributes:
        name: registry name.
        init: "patches" (realistic patches, RDED-style) or "noise" (Gaussian, SRe2L).
        optimize: whether pixels are optimised at all (RDED: no).
        multi_stage: whether the preset's stages and ARC are used; otherwise
            one full-resolution stage with the whole budget.
        max_teachers: how many teachers the method accepts (None: any number).
        summary: one line for ``--help`` and the docs.
    """

    name: str
    init: Literal["patches", "noise"]
    optimize: bool
    multi_stage: bool
    max_teachers: int | None
    summary: str


METHODS: Registry[Method] = Registry("method")

for _method in (
    Method("fadrm", "patches", True, True, 1, "patch init, multi-resolution stages with ARC, one teacher"),
    Method("fadrm+", "patches", True, True, None, "FADRM with several teachers, round-robin per iteration"),
    Method("sre2l", "noise", True, False, 1, "Gaussian init, one full-size stage, no ARC"),
    Method("sre2l++", "patches", True, False, 1, "patch init, one full-size stage, no ARC (CV-DD's SRe2L++)"),
    Method("rded", "patches", False, False, 1, "the selected real patches, no optimisation"),
):
    METHODS.add(_method.name, _method)
