"""The Python API: one function per pipeline stage, taking plain arguments.

    import fadrm
    teacher = fadrm.train_teacher("fashion-mnist", "convnet-small", "runs/teacher.pt", epochs=8)
    manifest = fadrm.distill("fashion-mnist", ["runs/teacher.pt"], "runs/fadrm-ipc10", method="fadrm", ipc=10)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from .config import load_preset_section, resolve_distill_config
from .evaluate import EvalConfig, read_manifest, validate_eval_config
from .evaluate import evaluate as _evaluate
from .synthesis.pipeline import distill as _distill
from .errors import FadrmError
from .teachers import Teacher, TeacherTrainConfig, is_torchvision_weights
from .teachers import train_teacher as _train_teacher


def train_teacher(
    dataset: str, model: str, out: str | Path, log: Callable[[str], None] = print, **options: Any
) -> Teacher:
    """Train (or resume, or reuse) a teacher; ``options`` are :class:`TeacherTrainConfig` fields.

    Options not given (or None) come from the dataset preset's ``teacher`` recipe (e.g. the
    ImageNette subset teachers' 100 epochs), then the dataclass defaults.
    """
    recipe = load_preset_section(dataset, "teacher")
    recipe = {k: v for k, v in recipe.items() if k not in ("model", "models")}
    chosen = {k: v for k, v in options.items() if v is not None}
    return _train_teacher(TeacherTrainConfig(dataset=dataset, model=model, out=str(out), **{**recipe, **chosen}), log=log)


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


def evaluate(distilled: str | Path, log: Callable[[str], None] = print, **options: Any) -> dict[str, Any]:
    """Train students on a distilled set (and baselines); ``options`` are :class:`EvalConfig` fields
    overriding the dataset preset's ``evaluate`` section. Returns the results (also written to disk)."""
    manifest = read_manifest(distilled)
    return _evaluate(_eval_config(distilled, manifest["dataset"]["name"], manifest["method"], manifest["ipc"], options),
                     log=log)  # fmt: skip


def _eval_config(distilled: str | Path, dataset: str, method: str, ipc: int, options: dict[str, Any]) -> EvalConfig:
    """The dataset preset's ``evaluate`` section (with its overrides for the method and IPC)
    overridden by the options that were given."""
    preset = load_preset_section(dataset, "evaluate", method, ipc)
    chosen = {k: v for k, v in options.items() if v is not None}
    return EvalConfig(distilled=str(distilled), **{**preset, **chosen})


def preset_teachers(dataset: str, method: str, ipc: int, folder: Path, **train_options: Any) -> list[str]:
    """The teachers the dataset's preset names for ``method`` at ``ipc``, trained into ``folder``
    where they are architectures (each reused when already trained), or torchvision weights names
    (``arch:WEIGHTS``, from the local torch cache) used as they are."""
    recipe = load_preset_section(dataset, "teacher", method, ipc)
    if not recipe:
        raise FadrmError(f"{dataset} has no default teacher recipe; train one with fadrm train-teacher and pass --teacher")
    default_model = recipe.get("model")
    models = recipe.get("models") or [default_model]
    sources = []
    for model in models:
        if is_torchvision_weights(model):
            sources.append(model)
            continue
        # The default model keeps the name every method shares; others are named by architecture.
        path = folder / ("teacher.pt" if model == default_model else f"teacher-{model}.pt")
        train_teacher(dataset, model, path, **train_options)  # with the preset's recipe
        sources.append(str(path))
    return sources


def run(
    dataset: str,
    ipc: int,
    out: str | Path,
    method: str = "fadrm",
    teachers: list[str] | None = None,
    data_root: str | None = None,
    seed: int = 0,
    holdout: int = 0,
    device: str = "auto",
    amp: str = "auto",
    distill_options: dict[str, Any] | None = None,
    eval_options: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The whole pipeline in ``out``: teacher (trained unless given), distillation, evaluation with
    the random-real baseline. Each stage reuses what an earlier run already finished.

    Returns a summary with each stage's accuracy and wall time.
    """
    out = Path(out)
    common = {"device": device, "amp": amp}
    distilled = out / f"{method}-ipc{ipc}"
    options = {"baselines": ["random-real"], "data_root": data_root, "seed": seed, "holdout": holdout, **common,
               **(eval_options or {})}  # fmt: skip
    # A bad option fails now, not after the teacher.
    validate_eval_config(_eval_config(distilled, dataset, method, ipc, options))
    timings: dict[str, float] = {}
    started = time.perf_counter()
    if not teachers:
        teachers = preset_teachers(dataset, method, ipc, out, log=log, data_root=data_root, seed=seed, holdout=holdout,
                                   **common)  # fmt: skip
    timings["teacher"] = time.perf_counter() - started
    from .teachers import load_teacher

    teacher_acc = [load_teacher(t).val_top1 for t in teachers]
    started = time.perf_counter()
    distill(dataset, teachers, distilled, log=log, method=method, ipc=ipc, data_root=data_root, seed=seed,
            holdout=holdout, **common, **(distill_options or {}))  # fmt: skip
    timings["distill"] = time.perf_counter() - started
    started = time.perf_counter()
    results = evaluate(distilled, log=log, **options)
    timings["evaluate"] = time.perf_counter() - started
    summary = {"teacher_top1": teacher_acc, "runs": results["runs"], "summary": results["summary"],
               "seconds": timings, "distilled": str(distilled)}  # fmt: skip
    lines = [f"teacher top-1: {', '.join(f'{a:.2f}%' for a in teacher_acc if a is not None)}"]
    for r in results["summary"]:
        spread = f" ± {r['top1_std']:.2f} (mean of {r['repeats']} seeds)" if r["repeats"] > 1 else ""
        best = f"; best top-1 over the validations {r['best_top1']:.2f}%"
        lines.append(f"{r['student']} on {r['train_set']} ({r['labels']} labels): last-epoch top-1 {r['top1']:.2f}%"
                     f"{spread}{best}")  # fmt: skip
    lines.append("wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    log("\n".join(["== fadrm run summary ==", *lines]))
    return summary
