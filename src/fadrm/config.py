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
    # How a patch smaller than the image (factor > 1) is scored: "pad" into a zero canvas (RDED)
    # or "resize" up to the full size (fadrm before 0.2).
    patch_scoring: str = "pad"
    # Single-stage baselines (SRe2L, SRe2L++) take FADRM's iteration budget for this dataset and
    # IPC instead of the one their authors ran; resolved into sizes and budgets.
    equal_budget: bool = False
    # execution (do not change the result beyond float rounding)
    groups_per_batch: int | None = None
    device: str = "auto"
    amp: str = "auto"
    compile: bool = False
    overwrite: bool = False

    # Fields that do not define the distilled set: a resumed run may change them. Teachers are
    # identified by their files' hashes, not their paths; equal_budget acts through sizes/budgets.
    EXECUTION_FIELDS = (
        "out", "data_root", "teachers", "groups_per_batch", "device", "amp", "compile", "overwrite", "equal_budget",
    )  # fmt: skip

    def identity(self) -> dict[str, Any]:
        """The fields that define the result (used to refuse resuming into a different run)."""
        return defining_settings(asdict(self))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def defining_settings(values: dict[str, Any]) -> dict[str, Any]:
    """The settings of a distillation config (as a dict) that define its result.

    Execution fields are left out, and so is the patch scoring when patches fill the whole
    image (factor 1), where it has no effect: sets made before it existed keep their identity.
    """
    inert = {"patch_scoring"} if values.get("factor", 1) == 1 else set()
    return {k: v for k, v in values.items() if k not in DistillConfig.EXECUTION_FIELDS and k not in inert}


def preset_names() -> list[str]:
    """Datasets that ship a preset."""
    folder = resources.files("fadrm") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_preset(dataset: str) -> dict[str, Any]:
    path = resources.files("fadrm") / "presets" / f"{dataset}.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def _with_overrides(values: dict[str, Any], overrides: dict[str, Any] | None, method: str, ipc: int) -> dict[str, Any]:
    """Preset ``values``, then ``overrides.<method>``, then ``overrides.<method>@<ipc>``."""
    overrides = overrides or {}
    return {**values, **(overrides.get(method) or {}), **(overrides.get(f"{method}@{ipc}") or {})}


def load_preset(dataset: str, method: str, ipc: int) -> dict[str, Any]:
    """The distillation preset values for (dataset, method, ipc), or {} when the dataset has no preset."""
    data = _read_preset(dataset)
    return _with_overrides(data.get("defaults") or {}, data.get("overrides"), method, ipc)


def load_preset_section(dataset: str, section: str, method: str | None = None, ipc: int | None = None) -> dict[str, Any]:
    """Another section of a dataset's preset ("teacher", "evaluate", "students"), or {}.

    With ``method`` and ``ipc`` the section's own ``overrides`` for them are applied.
    """
    values = dict(_read_preset(dataset).get(section) or {})
    overrides = values.pop("overrides", None)
    return values if method is None or ipc is None else _with_overrides(values, overrides, method, ipc)


# The student recipe for architectures the published scripts never trained (they train only
# ResNet-18/50/101): their most common setting, AdamW lr 1e-3 with the cosine stretched by 2.
DEFAULT_STUDENT_RECIPE = {"lr": 1e-3, "eta": 2.0}


def student_recipe(dataset: str, student: str, ipc: int) -> dict[str, Any]:
    """Learning rate and cosine stretch for training ``student`` on an IPC-``ipc`` set of ``dataset``.

    From the preset's ``students`` table (the reference's values per dataset, student and IPC).
    An IPC the table lacks takes the largest listed IPC below it (the smallest listed one if
    none is below); a student the table does not name takes :data:`DEFAULT_STUDENT_RECIPE`.
    The returned ``source`` says which applied.
    """
    table = load_preset_section(dataset, "students").get(student)
    if not table:
        return {**DEFAULT_STUDENT_RECIPE, "source": f"default: no published recipe for {student} on {dataset}"}
    entries = {int(k): v for k, v in table.items()}
    chosen = max((i for i in entries if i <= ipc), default=min(entries))
    entry = entries[chosen]
    source = f"{dataset} preset, {student} at IPC {chosen}" + (f" ({entry['note']})" if "note" in entry else "")
    return {"lr": float(entry["lr"]), "eta": float(entry["eta"]), "source": source}


def resolve_distill_config(dataset: str, teachers: list[str], out: str, **flags: Any) -> DistillConfig:
    """Build a :class:`DistillConfig`: defaults < preset < flags (flags that are None are unset)."""
    names = {f.name for f in fields(DistillConfig)}
    unknown = set(flags) - names
    if unknown:
        raise TypeError(f"unknown distill options: {sorted(unknown)}")
    chosen = {k: v for k, v in flags.items() if v is not None}
    if chosen.get("amp") == "auto":
        # "auto" is the published precision: the preset's where it names one (SRe2L++ runs fp32).
        del chosen["amp"]
    method = chosen.get("method", "fadrm")
    ipc = chosen.get("ipc", 10)
    preset = load_preset(dataset, method, ipc)
    if chosen.get("equal_budget"):
        # FADRM's stages for this dataset and IPC; a single-stage method runs their total at full size.
        fadrm_preset = load_preset(dataset, "fadrm", ipc)
        preset.update({k: fadrm_preset[k] for k in ("sizes", "budgets") if k in fadrm_preset})
    bad = set(preset) - names
    if bad:
        raise ValueError(f"preset {dataset}.yaml sets unknown options {sorted(bad)}")
    return DistillConfig(dataset=dataset, teachers=list(teachers), out=str(out), **{**preset, **chosen})


def write_config(path: str | Path, config: DistillConfig) -> None:
    """Write the resolved config as YAML (atomically)."""
    from .io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
