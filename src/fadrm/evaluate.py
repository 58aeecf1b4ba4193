"""Evaluate a distilled set: train fresh students on it alone, report real validation accuracy.

The orchestration of sections 4 and 5 of the method: which students train on
which sets (the distilled set, then the arms of each baseline of
:mod:`fadrm.baselines`), under which seeds, reusing finished runs, and the
robustness scores of :mod:`fadrm.robustness` where the arms allow them. One
student's training loop is :mod:`fadrm.students`.
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .artifacts import (
    EVAL_FOLDER,
    DistilledSet,
    ImageFolderSet,
    LabelStore,
    StudentCheckpoint,
    checkpoint_dict,
    checkpoint_meta,
    open_evaluated_set,
    read_finished_run,
    stored_label_bytes,
    write_finished_run,
)
from .baselines import (
    DISTILLED,
    FULL_DATA,
    REAL_SUBSETS,
    ROBUSTNESS_BASELINES,
    TrainingSet,
    comparison_arms,
    full_data_student,
)
from .config import EvalConfig, student_recipe, validate, write_config
from .data import DatasetSpec, eval_transform, get_dataset_spec, load_split
from .distributed import Ranks, init_ranks
from .errors import FadrmError
from .io import save_torch
from .labels import TeacherLabeller, label_epoch, prior_weights
from .models import build_model
from .robustness import robustness_summary
from .runtime import Runtime, make_runtime
from .seeding import derive_seed
from .students import train_student, with_best_of
from .teachers import Teacher, load_teachers
from .training import evaluate_accuracy, make_loader, progress

# Version of the student protocol; finished runs of an older one are retrained. 2: accumulation
# splits each loader batch into micro-batches (one optimiser step per loader batch), weight decay
# on multi-dimensional weights only, BSSL by default.
STUDENT_PROTOCOL = 2


# --------------------------------------------------------------------- API
def evaluate(config: EvalConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train each student on the distilled set (and each baseline), write results; returns them.

    Finished runs are kept in ``<out>/runs/`` and skipped when the command is
    repeated with the same settings, so an interrupted evaluation resumes; an
    unfinished student continues after its last finished epoch. Under torchrun the
    processes train each student together; rank 0 writes every file.
    """
    from .report import write_report

    validate(config)  # also for configs built by hand rather than resolved
    distilled_set = open_evaluated_set(config.distilled, config.dataset, config.data_root, config.teachers)
    spec = get_dataset_spec(distilled_set.dataset)
    class_names = distilled_set.class_names
    if config.labels == "stored" and config.topk is not None and config.topk >= len(class_names):
        raise FadrmError(
            f"--topk {config.topk} keeps every one of the {len(class_names)} classes; give fewer, or "
            "leave it out to store full logits"
        )
    relabelling = config.teachers or distilled_set.teachers
    if (
        config.teacher_priors is None
        and config.teacher_weights is None
        and not config.teachers
        and config.protocol == "own"
        and distilled_set.priors
    ):
        # A committee's own relabelling (CV-DD) weighs the set's teachers by the priors it was made with.
        config.teacher_priors = distilled_set.priors
    weights = (
        prior_weights(config.teacher_priors, config.prior_temperature, len(relabelling))
        if config.teacher_priors
        else config.teacher_weights
    )
    runtime = make_runtime(config.device, config.amp, stage="evaluate")
    ranks = init_ranks(runtime.device.type)
    runtime, log = ranks.own_device(runtime), ranks.main_only(log)
    out = Path(config.out or Path(config.distilled) / EVAL_FOLDER)
    log(f"evaluating the {distilled_set.describe()}")
    distilled = TrainingSet("distilled", *distilled_set.images())
    if config.holdout is None:
        config.holdout = distilled_set.holdout
    if ranks.is_main:
        write_config(out / "config.yaml", config)
    val_set = load_split(spec, "val", config.data_root, config.holdout)
    val_set.transform = eval_transform(spec)
    val_loader = make_loader(val_set, 256, shuffle=False, workers=config.workers)
    teachers = load_teachers(
        config.teachers or [t["source"] for t in distilled_set.teachers],
        spec,
        val_set.classes,
        runtime,
        holdout=config.holdout,
    )
    labeller = TeacherLabeller([t.model for t in teachers], weights, config.bssl, config.balance_teachers)
    students = config.students or [teachers[0].arch]
    for name in students:
        build_model(name, 2, spec.channels, spec.image_size)  # fail now on an unknown student, not after hours
    arms = comparison_arms([*config.baselines, *(ROBUSTNESS_BASELINES if config.robustness else ())])
    subsets = list(dict.fromkeys(arm.train_set for arm in arms if arm.train_set in REAL_SUBSETS))
    train_set = load_split(spec, "train", config.data_root, config.holdout) if subsets else None
    results: dict[str, Any] = {
        "distilled": str(config.distilled),
        "dataset": spec.name,
        "method": distilled_set.method,
        "ipc": distilled_set.ipc,
        "protocol": config.protocol,
        "images_per_class": list(distilled_set.images_per_class),
        "teachers": [t.describe() for t in teachers],
        "config": config.to_dict(),
        "runs": [],
    }
    if any(arm.train_set == FULL_DATA for arm in arms):
        for student in students:
            results["runs"].append(
                full_data_run(
                    config, spec, student, student_args(student, teachers), teachers, val_loader, runtime, log
                )
            )
    # A finished run is reused only for the same settings and the same images: re-distilling
    # into the folder (new pixels, new per-image losses) invalidates it.
    set_id = distilled_set.set_id()
    stores: list[LabelStore] = []
    for repeat in range(config.repeats):
        # One repeat is a whole like-for-like comparison under its own seed: student initialisation,
        # views and mixing, and the random real subset change; the distilled images do not.
        trial = replace(config, seed=config.seed + repeat)
        suffix = f"-repeat{repeat}" if repeat else ""
        sets = {DISTILLED: distilled}
        sets.update({name: REAL_SUBSETS.get(name)(train_set, spec, distilled_set.ipc, trial.seed) for name in subsets})
        store = None
        if config.labels == "stored":
            folder = Path(config.labels_dir or out / "labels")
            folder = folder.with_name(folder.name + suffix)
            store = prepare_store(trial, distilled_set, distilled, spec, labeller, runtime, folder, log, ranks)
            stores.append(store)
        for student, arm in itertools.product(students, arms):
            if arm.train_set == FULL_DATA:
                continue  # one run per student for every repeat, above
            training_set = sets[arm.train_set]
            key = arm.key(student) + suffix
            recipe = resolve_recipe(trial, spec.name, student, distilled_set.ipc)
            run_config = replace(trial, lr=recipe["lr"], eta=recipe["eta"], augment=trial.augment and arm.augment)
            identity = {**run_config.identity(), "distilled_set": set_id, "protocol": STUDENT_PROTOCOL}
            run_file = out / "runs" / f"{key}.json"
            finished = read_finished_run(run_file, identity)
            wanted = run_config.evaluation_epochs()
            # A finished run serves a validation schedule it covers; a denser one needs the student again.
            if finished is not None and set(wanted) <= set(finished["evaluated_epochs"]):
                run = with_best_of(finished, wanted)
                log(f"{key}: reusing finished run (top-1 {run['top1']:.2f}%)")
            else:
                torch.manual_seed(derive_seed(trial.seed, "student", student))
                args = student_args(student, teachers)
                model = build_model(student, len(class_names), spec.channels, spec.image_size, **args)
                # Stored labels are the teachers' outputs on exactly the views of the soft distilled arm.
                own_views = arm.train_set == DISTILLED and arm.labels == "soft" and run_config.augment == trial.augment
                checkpoint = StudentCheckpoint(run_file.with_suffix(".partial.pt"), identity)
                run = train_student(
                    model,
                    training_set,
                    run_config,
                    spec,
                    runtime,
                    val_loader,
                    labeller if arm.labels == "soft" else None,
                    store if own_views else None,
                    desc=key,
                    log=log,
                    checkpoint=checkpoint,
                    ranks=ranks,
                )
                run.update(
                    {
                        "student": student,
                        "train_set": training_set.name,
                        "labels": arm.labels,
                        "augment": run_config.augment,
                        "images": len(training_set.images),
                        "recipe": recipe,
                    }
                )
                if ranks.is_main:
                    # The trained student as a teacher checkpoint: every command takes it as a teacher.
                    meta = checkpoint_meta(
                        student,
                        args,
                        spec.name,
                        val_set.classes,
                        spec.channels,
                        spec.image_size,
                        spec.mean,
                        spec.std,
                        run["top1"],
                        run["top5"],
                        train_config=identity,
                    )
                    weights = model.to(memory_format=torch.contiguous_format)
                    save_torch(run_file.with_suffix(".pt"), checkpoint_dict(weights, meta))
                    write_finished_run(run_file, identity, run)
                    checkpoint.remove()
                ranks.barrier()  # every rank sees the finished run before the next one
                log(
                    f"{key}: top-1 {run['top1']:.2f}% at the last epoch (best {run['best_top1']:.2f}% at epoch "
                    f"{run['best_epoch']}), top-5 {run['top5']:.2f}% ({run['seconds']:.0f}s)"
                )
            # Runs finished before repeats (or --no-augment) existed lack the field; the identity fixes it.
            results["runs"].append({"augment": True, **run, "seed": trial.seed})
    results["summary"] = summarise_runs(results["runs"])
    robustness = robustness_summary(results["runs"])
    if robustness:
        results["robustness"] = robustness
    if stores:
        results["stored_labels"] = {
            "dirs": [str(store.folder) for store in stores],
            "bytes": sum(store.bytes_on_disk() for store in stores),
            "bytes_per_image_per_epoch": stored_label_bytes(len(class_names), config.topk),
        }
    if ranks.is_main:
        write_report(out, results)
    ranks.close()
    return results


def summarise_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample standard deviation of the final top-1/top-5 and the best top-1 over the repeats
    of each (student, set, labels, augmentation)."""
    groups: dict[tuple[str, str, str, bool], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["student"], run["train_set"], run["labels"], run.get("augment", True)), []).append(run)
    summary = []
    for (student, train_set, labels, augment), members in groups.items():
        row: dict[str, Any] = {
            "student": student,
            "train_set": train_set,
            "labels": labels,
            "augment": augment,
            "repeats": len(members),
        }
        for metric in ("top1", "top5", "best_top1"):
            values = [m[metric] for m in members]
            row[metric] = statistics.fmean(values)
            row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(row)
    return summary


def student_args(student: str, teachers: Sequence[Teacher]) -> dict[str, Any]:
    """Architecture options of a student: the first teacher's when the student is its architecture."""
    return dict(teachers[0].arch_args) if student == teachers[0].arch else {}


def full_data_run(
    config: EvalConfig,
    spec: DatasetSpec,
    student: str,
    model_args: dict[str, Any],
    teachers: Sequence[Teacher],
    val_loader: torch.utils.data.DataLoader,
    runtime: Runtime,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The full-data arm of ``student`` as a run record: trained (or reused) by
    :func:`fadrm.baselines.full_data_student`, validated on the evaluation's own split."""
    model, teacher_config = full_data_student(config, spec.name, student, model_args, teachers, log)
    started = time.perf_counter()
    metrics = evaluate_accuracy(runtime.place(model.model), val_loader, runtime, spec.mean, spec.std)
    epochs = teacher_config.epochs
    log(f"full-data-{student}-hard: top-1 {metrics['top1']:.2f}% (the teacher recipe, {epochs} epochs)")
    return {
        "student": student,
        "train_set": FULL_DATA,
        "labels": "hard",
        "augment": True,
        "top1": metrics["top1"],
        "top5": metrics["top5"],
        "best_top1": metrics["top1"],
        "best_epoch": epochs,
        "evaluated_epochs": [epochs],
        "epochs": epochs,
        "seconds": round(time.perf_counter() - started, 2),
        "history": [],
        "images": len(load_split(spec, "train", config.data_root, config.holdout)),
        "checkpoint": model.source,
        "recipe": {"source": "the dataset's teacher recipe", **teacher_config.identity()},
        "seed": config.seed,
    }


def resolve_recipe(config: EvalConfig, dataset: str, student: str, ipc: int) -> dict[str, Any]:
    """The lr and eta one student trains with: the user's where given, else the published recipe."""
    recipe = student_recipe(dataset, student, ipc)
    given = {k: getattr(config, k) for k in ("lr", "eta") if getattr(config, k) is not None}
    if given:
        recipe = {**recipe, **given, "source": f"{recipe['source']}; {', '.join(sorted(given))} given"}
    return recipe


def prepare_store(
    config: EvalConfig,
    distilled_set: DistilledSet | ImageFolderSet,
    distilled: TrainingSet,
    spec: DatasetSpec,
    labeller: TeacherLabeller,
    runtime: Runtime,
    folder: Path,
    log: Callable[[str], None],
    ranks: Ranks = Ranks(),
) -> LabelStore:
    """Open (or create) the label store in ``folder`` and compute the epochs it lacks (rank 0; the others wait)."""
    identity = {
        "images": len(distilled.images),
        "ipc": distilled_set.ipc,
        "seed": config.seed,
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "mix": config.mix,
        "mix_alpha": config.mix_alpha,
        "crop_scale": list(config.crop_scale),
        "temperature": config.temperature,
        "bssl": config.bssl,
        "teachers": [t["sha256"] for t in distilled_set.teachers] if not config.teachers else list(config.teachers),
        "teacher_weights": config.teacher_weights,
        **distilled_set.labels_identity(),
        # Stores made before these options keep their identity.
        **({} if config.augment else {"augment": False}),
        **(
            {"teacher_priors": config.teacher_priors, "prior_temperature": config.prior_temperature}
            if config.teacher_priors
            else {}
        ),
        **({"balance_teachers": True} if config.balance_teachers else {}),
        **({"rand_augment": True} if config.rand_augment else {}),
    }
    store = LabelStore(folder, identity, len(distilled_set.class_names), config.topk, config.temperature)
    if ranks.is_main:
        store.open()
        sampler = config.view_sampler(spec.image_size)
        missing = [e for e in range(config.epochs) if not store.has(e)]
        if missing:
            log(f"storing soft labels for {len(missing)} epochs in {store.folder}")
        for epoch in progress(missing, "labels"):
            logits = label_epoch(
                distilled.images, sampler, epoch, config.batch_size, labeller, spec.mean, spec.std, runtime
            )
            store.write(epoch, logits)
    ranks.barrier()
    return store
