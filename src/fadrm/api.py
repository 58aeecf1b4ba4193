"""The Python API: one function per pipeline stage, taking plain arguments.

    import fadrm
    teacher = fadrm.train_teacher("fashion-mnist", "convnet-small", "runs/teacher.pt", epochs=8)
    manifest = fadrm.distill("fashion-mnist", ["runs/teacher.pt"], "runs/fadrm-ipc10", method="fadrm", ipc=10)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .config import resolve_distill_config
from .synthesis.pipeline import distill as _distill
from .teachers import Teacher, TeacherTrainConfig
from .teachers import train_teacher as _train_teacher


def train_teacher(
    dataset: str, model: str, out: str | Path, log: Callable[[str], None] = print, **options: Any
) -> Teacher:
    """Train (or resume, or reuse) a teacher; ``options`` are :class:`TeacherTrainConfig` fields."""
    return _train_teacher(TeacherTrainConfig(dataset=dataset, model=model, out=str(out), **options), log=log)


def distill(
    dataset: str,
    teachers: str | Path | list[str | Path],
    out: str | Path,
    log: Callable[[str], None] = print,
    **options: Any,
) -> dict[str, Any]:
    """Distill ``dataset`` into ``out``; ``options`` are :class:`DistillConfig` fields overriding the preset.

    Returns the manifest (also written to ``out/manifest.json``).
    """
    sources = [str(t) for t in (teachers if isinstance(teachers, list) else [teachers])]
    return _distill(resolve_distill_config(dataset, sources, str(out), **options), log=log)
