"""The Python API: one function per pipeline stage, taking the same options as the command line.

    import fadrm
    teacher = fadrm.train_teacher("fashion-mnist", "convnet-small", "runs/teacher.pt", epochs=8)
    manifest = fadrm.distill("fashion-mnist", ["runs/teacher.pt"], "runs/fadrm-ipc10", method="fadrm", ipc=10)
    results = fadrm.evaluate("runs/fadrm-ipc10", baselines=["random-real"])

Options are the stage's config keys (:mod:`fadrm.config`); unset ones (or None) come from
the dataset's preset, then the package defaults, exactly as for the ``fadrm`` command.
``config_file`` replays a ``config.yaml`` a run wrote.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .distilled import open_evaluated_set
from .config import (
    DistillConfig,
    EvalConfig,
    PriorsConfig,
    StatsConfig,
    TeacherConfig,
    check_option,
    read_config_file,
    resolve,
)
from .errors import FadrmError
from .evaluation import evaluate as _evaluate
from .evaluation.plan import check_against_set
from .priors import compute_priors as _compute_priors
from .synthesis.methods import METHODS, method_for
from .synthesis.pipeline import distill as _distill
from .synthesis.statistics import compute_statistics as _compute_statistics
from .teachers import Teacher
from .teachers import train_teacher as _train_teacher
from .workflow import RunPlan, execute_run, plan_run


__all__ = [
    "RunPlan",
    "compute_priors",
    "compute_statistics",
    "distill",
    "distill_config",
    "eval_config",
    "evaluate",
    "execute_run",
    "plan_run",
    "priors_config",
    "run",
    "stats_config",
    "teacher_config",
    "train_teacher",
]


def teacher_config(config_file: str | Path | None = None, **options: Any) -> TeacherConfig:
    """The resolved, validated config of a teacher training run (nothing is read or trained)."""
    return resolve(TeacherConfig, options, config_file)


def _one_teacher_as_a_list(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with a single teacher given as a path turned into a list of one."""
    teachers = options.get("teachers")
    return {**options, "teachers": [teachers]} if isinstance(teachers, (str, Path)) else options


def distill_config(config_file: str | Path | None = None, **options: Any) -> DistillConfig:
    """The resolved, validated config of a distillation (nothing is read or trained); a method that
    cannot run it (its teachers, IPC or groups) is refused here too."""
    config = resolve(DistillConfig, _one_teacher_as_a_list(options), config_file)
    method_for(config)
    return config


def stats_config(config_file: str | Path | None = None, **options: Any) -> StatsConfig:
    """The resolved, validated config of a statistics pass (nothing is read or computed)."""
    return resolve(StatsConfig, _one_teacher_as_a_list(options), config_file)


def priors_config(config_file: str | Path | None = None, **options: Any) -> PriorsConfig:
    """The resolved, validated config of a priors computation (nothing is read or trained)."""
    return resolve(PriorsConfig, _one_teacher_as_a_list(options), config_file)


def eval_config(config_file: str | Path | None = None, **options: Any) -> EvalConfig:
    """The resolved, validated config of an evaluation; the preset is that of the set's dataset,
    method and IPC (read from its manifest, or for a set made by another tool from ``dataset`` and
    the folder)."""
    chosen = {
        **(read_config_file(config_file) if config_file else {}),
        **{key: value for key, value in options.items() if value is not None},
    }
    distilled = chosen.get("distilled")
    if not distilled:
        raise FadrmError("give the distilled set's folder")
    if not isinstance(distilled, (str, Path)):
        raise FadrmError(f"the distilled set's folder must be a path, got {distilled!r}")
    if chosen.get("dataset") is not None:
        check_option(EvalConfig, "dataset", chosen["dataset"])
    teachers = chosen.get("teachers")
    distilled_set = open_evaluated_set(
        distilled, chosen.get("dataset"), chosen.get("data_root"), [teachers] if isinstance(teachers, str) else teachers
    )
    # A set made by another tool has no registered method: no method's overrides apply.
    method = distilled_set.method if distilled_set.method in METHODS else None
    config = resolve(
        EvalConfig, options, config_file, dataset=distilled_set.dataset, method=method, ipc=distilled_set.ipc
    )
    check_against_set(config, len(distilled_set.class_names))
    return config


def train_teacher(
    dataset: str | None = None,
    model: str | None = None,
    out: str | Path | None = None,
    log: Callable[[str], None] = print,
    config_file: str | Path | None = None,
    **options: Any,
) -> Teacher:
    """Train (or resume, or reuse) a teacher; ``options`` are :class:`~fadrm.config.TeacherConfig` keys.

    Options not given come from the dataset preset's ``teacher`` recipe (e.g. the ImageNette
    subset teachers' 100 epochs), then the package defaults.
    """

    config = teacher_config(config_file, dataset=dataset, model=model, out=out, **options)
    return _train_teacher(config, log=log)


def distill(
    dataset: str | None = None,
    teachers: str | Path | list[str | Path] | None = None,
    out: str | Path | None = None,
    log: Callable[[str], None] = print,
    config_file: str | Path | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Distill ``dataset`` into ``out``; ``options`` are :class:`~fadrm.config.DistillConfig` keys
    overriding the preset. Returns the manifest (also written to ``out/manifest.json``)."""

    return _distill(distill_config(config_file, dataset=dataset, teachers=teachers, out=out, **options), log=log)


def compute_statistics(
    dataset: str | None = None,
    teachers: str | Path | list[str | Path] | None = None,
    log: Callable[[str], None] = print,
    config_file: str | Path | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Write each teacher's statistics file for ``dataset`` (what G-VBSM and EDC match; ``fadrm distill``
    computes missing ones itself); ``options`` are :class:`~fadrm.config.StatsConfig` keys. Returns
    the files' descriptions."""

    return _compute_statistics(stats_config(config_file, dataset=dataset, teachers=teachers, **options), log=log)


def compute_priors(
    dataset: str | None = None,
    teachers: str | Path | list[str | Path] | None = None,
    out: str | Path | None = None,
    log: Callable[[str], None] = print,
    config_file: str | Path | None = None,
    distill_options: dict[str, Any] | None = None,
    eval_options: dict[str, Any] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Each teacher's prior for a committee method (CV-DD): the last-epoch top-1 of one student trained
    on an SRe2L++ set distilled from that teacher alone (:mod:`fadrm.priors`). ``options`` are
    :class:`~fadrm.config.PriorsConfig` keys; ``distill_options`` and ``eval_options`` further options of
    every set and student. Returns what ``out/priors.json`` holds (``priors``: in teacher order)."""

    config = priors_config(config_file, dataset=dataset, teachers=teachers, out=out, **options)
    return _compute_priors(config, log, distill_options, eval_options)


def evaluate(
    distilled: str | Path | None = None,
    log: Callable[[str], None] = print,
    config_file: str | Path | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Train students on a distilled set (and baselines); ``options`` are :class:`~fadrm.config.EvalConfig`
    keys overriding the dataset preset's ``evaluate`` section. Returns the results (also written to disk)."""

    return _evaluate(eval_config(config_file, distilled=distilled, **options), log=log)


def run(
    dataset: str,
    ipc: int,
    out: str | Path,
    method: str = "fadrm",
    teachers: list[str] | None = None,
    log: Callable[[str], None] = print,
    distill_options: dict[str, Any] | None = None,
    eval_options: dict[str, Any] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """The whole pipeline in ``out``: teachers (trained unless given), distillation, evaluation with
    the random-real baseline. Each stage reuses what an earlier run already finished.

    ``options`` are the other :class:`~fadrm.config.RunConfig` keys (seed, holdout, data_root,
    device, amp, repeats, teacher_models, priors, prior_student). A committee method (CV-DD) without
    priors, given or published for the preset's own teachers, has them computed first under
    ``out/priors/ipc<N>/`` (:mod:`fadrm.priors`). Returns a summary with each stage's accuracy and wall
    time (and the committee's priors).
    """
    plan = plan_run(
        distill_options, eval_options, dataset=dataset, ipc=ipc, out=out, method=method, teachers=teachers, **options
    )
    return execute_run(plan, log)


# Each stage command: how its config is resolved (from a config file and options) and how it runs.
STAGE_COMMANDS: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
    "train-teacher": (teacher_config, _train_teacher),
    "distill": (distill_config, _distill),
    "evaluate": (eval_config, _evaluate),
    "stats": (stats_config, _compute_statistics),
    "priors": (priors_config, _compute_priors),
}
