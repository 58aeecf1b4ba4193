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

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .artifacts import open_evaluated_set
from .config import (
    PROTOCOL_WORDS,
    DistillConfig,
    EvalConfig,
    PriorsConfig,
    RunConfig,
    StatsConfig,
    TeacherConfig,
    check_option,
    read_config_file,
    resolve,
    written_form,
)
from .errors import FadrmError
from .registry import registry

# Imported here, not lazily: importing the module fadrm.evaluate later would rebind the name
# fadrm.evaluate (this API function) to the module.
from .evaluate import evaluate as _evaluate
from .synthesis.statistics import compute_statistics as _compute_statistics
from .priors import compute_priors as _compute_priors
from .priors import with_priors
from .synthesis.pipeline import distill as _distill
from .teachers import Teacher, is_torchvision_weights, load_teacher
from .teachers import train_teacher as _train_teacher


def teacher_config(config_file: str | Path | None = None, **options: Any) -> TeacherConfig:
    """The resolved, validated config of a teacher training run (nothing is read or trained)."""
    return resolve(TeacherConfig, options, config_file)


def _one_teacher_as_a_list(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with a single teacher given as a path turned into a list of one."""
    teachers = options.get("teachers")
    return {**options, "teachers": [teachers]} if isinstance(teachers, (str, Path)) else options


def distill_config(config_file: str | Path | None = None, **options: Any) -> DistillConfig:
    """The resolved, validated config of a distillation (nothing is read or trained)."""
    return resolve(DistillConfig, _one_teacher_as_a_list(options), config_file)


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
    method = distilled_set.method if distilled_set.method in registry("method") else None
    return resolve(
        EvalConfig, options, config_file, dataset=distilled_set.dataset, method=method, ipc=distilled_set.ipc
    )


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


# ---------------------------------------------------------------------- run
@dataclass
class RunPlan:
    """Every stage of ``fadrm run``, resolved before anything runs (a bad option fails first).

    Attributes:
        run: the run's own options.
        teachers: per teacher, the config that trains it (reused when finished), or the
            checkpoint / torchvision weights name used as given.
        distill: the distillation (without its priors where they are still to be computed).
        evaluate: the evaluation (with the random-real baseline).
        priors: the priors to compute before distilling (a committee method whose priors are
            neither given nor the preset's for its own teachers), or None.
        priors_source: where the distillation's priors come from, for the summary (None: no priors).
        distill_options, eval_options: the extra options given for distillation and evaluation,
            which the priors' sets and students take as well.
    """

    run: RunConfig
    teachers: list[TeacherConfig | str]
    distill: DistillConfig
    evaluate: EvalConfig
    priors: PriorsConfig | None = None
    priors_source: str | None = None
    distill_options: dict[str, Any] = field(default_factory=dict)
    eval_options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Every stage as its config file would hold it."""
        teachers = [t if isinstance(t, str) else written_form(t) for t in self.teachers]
        priors = {"priors": written_form(self.priors)} if self.priors is not None else {}
        return {
            "run": written_form(self.run),
            "teachers": teachers,
            **priors,
            "distill": written_form(self.distill),
            "evaluate": written_form(self.evaluate),
        }


def _teacher_path(teacher: TeacherConfig | str) -> str:
    return teacher if isinstance(teacher, str) else teacher.out


def plan_run(
    distill_options: dict[str, Any] | None = None, eval_options: dict[str, Any] | None = None, **options: Any
) -> RunPlan:
    """Resolve every stage of ``fadrm run`` from the run's options (:class:`~fadrm.config.RunConfig`
    keys) and extra options for distillation and evaluation; nothing is read or trained."""
    config: RunConfig = resolve(RunConfig, options)
    out = Path(config.out)
    shared = {
        "dataset": config.dataset,
        "data_root": config.data_root,
        "seed": config.seed,
        "holdout": config.holdout,
        "device": config.device,
        "amp": config.amp,
    }
    teachers: list[TeacherConfig | str]
    if config.teachers:
        teachers = list(config.teachers)
    else:
        default_model = _preset_teacher_model(config.dataset)
        models = config.teacher_models or ([default_model] if default_model else [])
        if not models:
            raise FadrmError(
                f"{config.dataset} has no default teacher recipe; train one with fadrm train-teacher and pass --teacher"
            )
        teachers = []
        for model in models:
            if is_torchvision_weights(model):
                teachers.append(model)
                continue
            # The default model keeps the name every method shares; others are named by architecture.
            path = out / ("teacher.pt" if model == default_model else f"teacher-{model}.pt")
            # With the run's method and IPC, so the preset's teacher.overrides for them apply.
            teachers.append(
                resolve(
                    TeacherConfig, {**shared, "model": model, "out": str(path)}, method=config.method, ipc=config.ipc
                )
            )
    distilled = out / f"{config.method}-ipc{config.ipc}"
    distill = distill_config(
        **{
            **shared,
            "teachers": [_teacher_path(t) for t in teachers],
            "out": str(distilled),
            "method": config.method,
            "ipc": config.ipc,
            "priors": config.priors,
            "fixed_committee": config.fixed_committee,
            **(distill_options or {}),
        }
    )
    priors, priors_source = None, None
    if registry("method").get(config.method).uses_priors and len(distill.teachers) > 1:
        if distill.priors_from:
            priors_source = f"from {distill.priors_from}"
        elif distill.synthesis.priors is not None:
            published = options.get("priors") is None and config.priors == distill.synthesis.priors
            priors_source = f"the {config.dataset} preset's published values for its teachers" if published else "given"
        else:
            # Under the run's folder per IPC, as its sets are: another IPC's priors are others.
            priors = resolve(
                PriorsConfig,
                {
                    **shared,
                    "teachers": distill.teachers,
                    "ipc": config.ipc,
                    "out": str(out / "priors" / f"ipc{config.ipc}"),
                    "student": config.prior_student,
                },
            )
            priors_source = f"computed: {Path(priors.out) / 'priors.json'}"
    evaluation = {
        "baselines": ["random-real"],
        "repeats": config.repeats,
        "robustness": config.robustness,
        "protocol": config.protocol,
        **shared,
        **(eval_options or {}),
    }
    evaluation.pop("dataset")
    evaluate = resolve(
        EvalConfig,
        {"distilled": str(distilled), **evaluation},
        dataset=config.dataset,
        method=config.method,
        ipc=config.ipc,
    )
    return RunPlan(
        config,
        teachers,
        distill,
        evaluate,
        priors,
        priors_source,
        dict(distill_options or {}),
        dict(eval_options or {}),
    )


def _preset_teacher_model(dataset: str) -> str | None:
    """The architecture the dataset's preset trains as its teacher, if it names one."""
    from .config import load_preset_section

    return load_preset_section(dataset, TeacherConfig.SECTION).get("model")


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


def execute_run(plan: RunPlan, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run a resolved :class:`RunPlan`; see :func:`run`."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    for teacher in plan.teachers:
        if not isinstance(teacher, str):
            _train_teacher(teacher, log=log)
    timings["teacher"] = time.perf_counter() - started
    teacher_acc = [load_teacher(_teacher_path(t)).val_top1 for t in plan.teachers]
    distill = plan.distill
    if plan.priors is not None:
        started = time.perf_counter()
        computed = _compute_priors(plan.priors, log, plan.distill_options, plan.eval_options)
        distill = with_priors(distill, computed["priors"])
        timings["priors"] = time.perf_counter() - started
    started = time.perf_counter()
    manifest = _distill(distill, log=log)
    timings["distill"] = time.perf_counter() - started
    started = time.perf_counter()
    results = _evaluate(plan.evaluate, log=log)
    timings["evaluate"] = time.perf_counter() - started
    summary = {
        "teacher_top1": teacher_acc,
        "protocol": results["protocol"],
        "runs": results["runs"],
        "summary": results["summary"],
        "robustness": results.get("robustness", []),
        "seconds": timings,
        "distilled": plan.distill.out,
    }
    lines = [
        f"teacher top-1: {', '.join(f'{a:.2f}%' for a in teacher_acc if a is not None)}",
        f"students: the {plan.evaluate.protocol} protocol ({PROTOCOL_WORDS[plan.evaluate.protocol]})",
    ]
    if plan.priors_source is not None:
        # As the set was made with them (--priors-from is read when the teachers are loaded).
        priors = manifest["config"]["synthesis"]["priors"] if manifest else distill.synthesis.priors
        summary["priors"] = {"values": priors, "source": plan.priors_source}
        lines.append(f"committee priors: {', '.join(f'{p:g}' for p in priors or [])} ({plan.priors_source})")
    for r in results["summary"]:
        spread = f" ± {r['top1_std']:.2f} (mean of {r['repeats']} seeds)" if r["repeats"] > 1 else ""
        best = f"; best top-1 over the validations {r['best_top1']:.2f}%"
        plain = "" if r.get("augment", True) else ", no augmentation"
        lines.append(
            f"{r['student']} on {r['train_set']} ({r['labels']} labels{plain}): last-epoch top-1 "
            f"{r['top1']:.2f}%{spread}{best}"
        )
    for r in results.get("robustness", []):
        scores = ", ".join(f"{name.upper()} {r[name]:.4f}" for name in ("hlr", "ior", "lrs", "ars") if name in r)
        seeds = f"mean of {r['repeats']} seeds" if r["repeats"] > 1 else "one seed"
        lines.append(f"{r['student']} robustness scores (accuracies as fractions, {seeds}): {scores}")
    lines.append("wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    log("\n".join(["== fadrm run summary ==", *lines]))
    return summary


# Each stage command: how its config is resolved (from a config file and options) and how it runs.
STAGE_COMMANDS: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
    "train-teacher": (teacher_config, _train_teacher),
    "distill": (distill_config, _distill),
    "evaluate": (eval_config, _evaluate),
    "stats": (stats_config, _compute_statistics),
    "priors": (priors_config, _compute_priors),
}
