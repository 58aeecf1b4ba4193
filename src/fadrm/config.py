"""Typed configuration for distillation, YAML presets, and the resolved config on disk.

Resolution order, later wins: the dataclass defaults, the dataset's preset
(``presets/<dataset>.yaml``: ``defaults``, then ``overrides.<method>``, then
``overrides.<method>@<ipc>``), then the user's flags. The fully resolved config
is written next to every output.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


@dataclass
class DistillConfig:
    """Everything ``fadrm distill`` needs; each field is also a CLI flag."""

    dataset: str
    teachers: list[str]
    out: str
    method: str = "fadrm"
    ipc: int = 10
    seed: int = 0
    holdout: int = 0
    data_root: str | None = None
    teacher_arch: str | None = None
    # recover loop
    sizes: list[int] = field(default_factory=lambda: [32, 32, 32, 32])
    budgets: list[int] = field(default_factory=lambda: [500, 500, 500, 500])
    lr: float = 0.25
    r_bn: float = 0.01
    first_bn_multiplier: float = 10.0
    jitter: int = 4
    alpha: float = 0.5
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    classes_per_group: int = 100
    # patch selection
    mipc: int = 300
    num_crop: int = 5
    factor: int = 1
    difficulty: str = "easy"
    patch_crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    # execution (do not change the result beyond float rounding)
    groups_per_batch: int | None = None
    device: str = "auto"
    amp: str = "auto"
    compile: bool = False
    overwrite: bool = False

    # Fields that do not define the distilled set: a resumed run may change them.
    # Teachers are identified by their files' hashes, not their paths.
    EXECUTION_FIELDS = ("out", "data_root", "teachers", "groups_per_batch", "device", "amp", "compile", "overwrite")

    def identity(self) -> dict[str, Any]:
        """The fields that define the result (used to refuse resuming into a different run)."""
        return {k: v for k, v in asdict(self).items() if k not in self.EXECUTION_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def preset_names() -> list[str]:
    """Datasets that ship a preset."""
    folder = resources.files("fadrm") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_preset(dataset: str, method: str, ipc: int) -> dict[str, Any]:
    """The preset values for (dataset, method, ipc), or {} when the dataset has no preset."""
    path = resources.files("fadrm") / "presets" / f"{dataset}.yaml"
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    values = dict(data.get("defaults", {}))
    overrides = data.get("overrides", {}) or {}
    values.update(overrides.get(method, {}) or {})
    values.update(overrides.get(f"{method}@{ipc}", {}) or {})
    return values


def load_preset_section(dataset: str, section: str) -> dict[str, Any]:
    """Another section of a dataset's preset ("teacher", "evaluate"), or {}."""
    path = resources.files("fadrm") / "presets" / f"{dataset}.yaml"
    if not path.is_file():
        return {}
    return dict((yaml.safe_load(path.read_text()) or {}).get(section, {}) or {})


def resolve_distill_config(dataset: str, teachers: list[str], out: str, **flags: Any) -> DistillConfig:
    """Build a :class:`DistillConfig`: defaults < preset < flags (flags that are None are unset)."""
    names = {f.name for f in fields(DistillConfig)}
    unknown = set(flags) - names
    if unknown:
        raise TypeError(f"unknown distill options: {sorted(unknown)}")
    chosen = {k: v for k, v in flags.items() if v is not None}
    method = chosen.get("method", "fadrm")
    ipc = chosen.get("ipc", 10)
    preset = load_preset(dataset, method, ipc)
    bad = set(preset) - names
    if bad:
        raise ValueError(f"preset {dataset}.yaml sets unknown options {sorted(bad)}")
    return DistillConfig(dataset=dataset, teachers=list(teachers), out=str(out), **{**preset, **chosen})


def write_config(path: str | Path, config: DistillConfig) -> None:
    """Write the resolved config as YAML (atomically)."""
    from .io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
