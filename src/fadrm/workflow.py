"""``fadrm run``: the whole pipeline (teachers, priors, distillation, evaluation) planned, then carried out.

:func:`plan_run` resolves every stage's config before anything runs, so a bad option fails
first; :func:`execute_run` runs the stages in order, each reusing what an earlier run finished.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .config import (
    PROTOCOL_WORDS,
    DistillConfig,
    EvalConfig,
    PriorsConfig,
    RunConfig,
    TeacherConfig,
    load_preset_section,
    resolve,
    written_form,
)
from .errors import FadrmError
from .evaluation import evaluate
from .priors import compute_priors, with_priors
from .synthesis.methods import METHODS, method_for
from .synthesis.pipeline import distill
from .teachers import is_torchvision_weights, load_teacher, train_teacher


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
    distillation = resolve(
        DistillConfig,
        {
            **shared,
            "teachers": [_teacher_path(t) for t in teachers],
            "out": str(distilled),
            "method": config.method,
            "ipc": config.ipc,
            "priors": config.priors,
            "fixed_committee": config.fixed_committee,
            **(distill_options or {}),
        },
    )
    method_for(distillation)  # a method that cannot run these teachers fails before any is trained
    priors, priors_source = None, None
    if METHODS.get(config.method).uses_priors and len(distillation.teachers) > 1:
        if distillation.priors_from:
            priors_source = f"from {distillation.priors_from}"
        elif distillation.synthesis.priors is not None:
            published = options.get("priors") is None and config.priors == distillation.synthesis.priors
            priors_source = f"the {config.dataset} preset's published values for its teachers" if published else "given"
        else:
            # Under the run's folder per IPC, as its sets are: another IPC's priors are others.
            priors = resolve(
                PriorsConfig,
                {
                    **shared,
                    "teachers": distillation.teachers,
                    "ipc": config.ipc,
                    "out": str(out / "priors" / f"ipc{config.ipc}"),
                    "student": config.prior_student,
                },
            )
            priors_source = f"computed: {Path(priors.out) / 'priors.json'}"
    eval_given = {
        "baselines": ["random-real"],
        "repeats": config.repeats,
        "robustness": config.robustness,
        "protocol": config.protocol,
        "jobs": config.jobs,
        **shared,
        **(eval_options or {}),
    }
    eval_given.pop("dataset")
    evaluation = resolve(
        EvalConfig,
        {"distilled": str(distilled), **eval_given},
        dataset=config.dataset,
        method=config.method,
        ipc=config.ipc,
    )
    return RunPlan(
        config,
        teachers,
        distillation,
        evaluation,
        priors,
        priors_source,
        dict(distill_options or {}),
        dict(eval_options or {}),
    )


def _preset_teacher_model(dataset: str) -> str | None:
    """The architecture the dataset's preset trains as its teacher, if it names one."""
    return load_preset_section(dataset, TeacherConfig.SECTION).get("model")


def make_set(
    plan: RunPlan, log: Callable[[str], None] = print
) -> tuple[dict[str, Any], DistillConfig, dict[str, float]]:
    """The stages of a :class:`RunPlan` before its evaluation: its teachers, its committee's priors where they are
    to be computed, and its set, each reusing what is finished. Returns the set's manifest, the distillation
    as run (with its priors) and each stage's seconds."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    for teacher in plan.teachers:
        if not isinstance(teacher, str):
            train_teacher(teacher, log=log)
    timings["teacher"] = time.perf_counter() - started
    distillation = plan.distill
    if plan.priors is not None:
        started = time.perf_counter()
        computed = compute_priors(plan.priors, log, plan.distill_options, plan.eval_options)
        distillation = with_priors(distillation, computed["priors"])
        timings["priors"] = time.perf_counter() - started
    started = time.perf_counter()
    manifest = distill(distillation, log=log)
    timings["distill"] = time.perf_counter() - started
    return manifest, distillation, timings


def execute_run(plan: RunPlan, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run a resolved :class:`RunPlan`; see :func:`run`."""
    manifest, distillation, timings = make_set(plan, log)
    teacher_acc = [load_teacher(_teacher_path(t)).val_top1 for t in plan.teachers]
    started = time.perf_counter()
    results = evaluate(plan.evaluate, log=log)
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
        priors = manifest["config"]["synthesis"]["priors"] if manifest else distillation.synthesis.priors
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
