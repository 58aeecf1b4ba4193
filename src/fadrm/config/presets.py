"""The dataset presets shipped with fadrm (``presets/<dataset>.yaml``) and their student recipes.

A preset holds one section per stage (the published settings for that dataset), each with
``overrides.<method>`` and ``overrides.<method>@<ipc>``, and a ``students`` table: the learning
rate and cosine stretch each student was published with, per IPC.
"""

from __future__ import annotations

from importlib import resources
from typing import Any


from ..errors import FadrmError
from ..yaml_input import load_yaml


def preset_names() -> list[str]:
    """Datasets that ship a preset."""
    folder = resources.files("fadrm") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


# The sections a preset may hold: one per stage, and the student recipe table.
PRESET_SECTIONS = ("teacher", "distill", "evaluate", "run", "stats", "priors", "students")


def _read_preset(dataset: str) -> dict[str, Any]:
    path = resources.files("fadrm") / "presets" / f"{dataset}.yaml"
    if not path.is_file():
        return {}
    preset = load_yaml(path.read_text(encoding="utf-8"), f"preset {dataset}.yaml") or {}
    unknown = set(preset) - set(PRESET_SECTIONS) if isinstance(preset, dict) else {"(not a mapping)"}
    if unknown:
        raise FadrmError(
            f"preset {dataset}.yaml has unknown sections {sorted(unknown)}; "
            f"its sections are {', '.join(PRESET_SECTIONS)}"
        )
    return preset


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise FadrmError(f"{where} is not a mapping of options")
    return dict(value)


def preset_parts(
    dataset: str, section: str, method: str | None = None, ipc: int | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """(where, values) of one preset section, then of its ``overrides.<method>`` and
    ``overrides.<method>@<ipc>`` (when a method, and an IPC, are given), in that order."""
    where = f"preset {dataset}.yaml ({section}"
    values = _mapping(_read_preset(dataset).get(section), where + ")")
    overrides = _mapping(values.pop("overrides", None), where + ".overrides)")
    names = ([method] if method else []) + ([f"{method}@{ipc}"] if method and ipc is not None else [])
    return [(where + ")", values)] + [
        (f"{where}.overrides.{name})", _mapping(overrides.get(name), f"{where}.overrides.{name})")) for name in names
    ]


def load_preset_section(
    dataset: str, section: str, method: str | None = None, ipc: int | None = None
) -> dict[str, Any]:
    """One section of a dataset's preset ("distill", "teacher", "evaluate", "run", "students") as
    written, with ``overrides.<method>`` and ``overrides.<method>@<ipc>`` applied; {} if absent."""
    values: dict[str, Any] = {}
    for _, part in preset_parts(dataset, section, method, ipc):
        values.update(part)
    return values


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
