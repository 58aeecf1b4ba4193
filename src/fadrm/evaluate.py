"""Evaluate a distilled set: train fresh students on it alone, report real validation accuracy.

Implements sections 4 and 5 of the method: soft labels from the teacher(s) on
the exact augmented view the student sees (random-resized crop, flip, CutMix
or MixUp), KL divergence at temperature T, AdamW with a stretched cosine
schedule. The same loop trains like-for-like baselines on a random real
subset of the same size, with soft and with hard labels.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import defining_settings, student_recipe
from .data import DatasetSpec, eval_transform, get_dataset_spec, load_split, normalize
from .data.datasets import ImageDataset, read_image
from .errors import FadrmError
from .io import read_json, write_json
from .labels import (
    MIX_MODES, LabelStore, TeacherLabeller, ViewSampler, label_epoch, render, soft_targets, stored_label_bytes,
)  # fmt: skip
from .models import build_model
from .runtime import Runtime, make_runtime
from .synthesis.pipeline import MANIFEST_FORMAT, MANIFEST_VERSION
from .synthesis.units import make_generator
from .teachers import Teacher, check_holdout, fit_teacher_to_dataset, load_teacher
from .training import backward, check_finite, evaluate_accuracy, make_loader, optimizer_step, progress

BASELINES = ("random-real",)
# Version of the student protocol; finished runs of an older one are retrained. 2: accumulation
# splits each loader batch into micro-batches (one optimiser step per loader batch), weight decay
# on multi-dimensional weights only, BSSL by default.
STUDENT_PROTOCOL = 2


@dataclass
class EvalConfig:
    """Student training on a distilled set; each field is also a ``fadrm evaluate`` flag."""

    distilled: str
    out: str | None = None
    teachers: list[str] | None = None
    students: list[str] | None = None
    epochs: int = 300
    # The loader batch: one view draw (crops, flips, CutMix) and one optimiser step per batch.
    batch_size: int = 16
    # Micro-batches per loader batch, forwarded one after the other with their gradients summed
    # (each micro-batch's loss divided by ``accumulation``). With 16 and 2 the student's BatchNorm
    # sees 8 images and the optimiser steps once per 16 images, as the published runs do.
    accumulation: int = 2
    optimizer: str = "adamw"
    # None: the student recipe's value for (dataset, student, IPC), see config.student_recipe.
    lr: float | None = None
    weight_decay: float = 0.01
    eta: float | None = None
    temperature: float = 20.0
    mix: str = "cutmix"
    mix_alpha: float = 1.0
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    labels: str = "live"
    labels_dir: str | None = None
    topk: int | None = None
    # Batch-specific soft labels: teachers in train mode, each half of the loader batch on its own
    # (the published relabelling; off only for Tiny-ImageNet FADRM IPC 50).
    bssl: bool = True
    teacher_weights: list[float] | None = None
    # Validation after epochs 1, 1 + k, 1 + 2k, ... and the last (the reference's cadence for k = 10;
    # 0: the last epoch only) and after the epochs in ``eval_at``; the best of these is reported
    # beside the final-epoch accuracy.
    eval_every: int = 10
    eval_at: list[int] = field(default_factory=list)
    baselines: list[str] = field(default_factory=list)
    seed: int = 0
    # Whole comparisons repeated with seeds seed, seed + 1, ...: a single student run is noisy
    # (about a point on Fashion-MNIST IPC 10), so papers report the mean of several.
    repeats: int = 1
    holdout: int | None = None
    data_root: str | None = None
    device: str = "auto"
    # "auto" is full precision (fp32) for relabelling and students, as published.
    amp: str = "auto"
    workers: int | None = None

    # Settings that do not change what one student run computes; ``repeats`` adds runs with other
    # seeds (each run's identity holds its own seed), so finished runs survive a larger --repeats.
    EXECUTION_FIELDS = (
        "out", "labels_dir", "data_root", "device", "amp", "workers", "students", "baselines", "eval_every",
        "eval_at", "repeats",
    )  # fmt: skip

    def identity(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in self.EXECUTION_FIELDS}

    def view_sampler(self, size: int) -> ViewSampler:
        """The views of this run's students at ``size`` px (the same for live and stored labels)."""
        return ViewSampler(self.seed, size, (self.crop_scale[0], self.crop_scale[1]), self.mix, self.mix_alpha)

    def evaluation_epochs(self) -> list[int]:
        """The epochs (1-based) after which the student is validated; always ends with the last."""
        cadence = range(1, self.epochs + 1, self.eval_every) if self.eval_every > 0 else []
        return sorted({*cadence, *(e for e in self.eval_at if 1 <= e <= self.epochs), self.epochs})


@dataclass
class TrainingSet:
    """Images (uint8, N x C x H x W) and their classes: a distilled set or a baseline subset."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor


# ----------------------------------------------------------------- loading
def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a distilled set, checked for format and completeness."""
    path = Path(folder) / "manifest.json"
    if not path.exists():
        raise FadrmError(f"{folder} is not a distilled set (no manifest.json); make one with: fadrm distill")
    manifest = read_json(path)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise FadrmError(f"{path} is not a fadrm manifest")
    if manifest.get("format_version", 0) > MANIFEST_VERSION:
        raise FadrmError(f"{path} was written by a newer fadrm ({manifest.get('fadrm_version')}); upgrade fadrm")
    return manifest


def distilled_set_id(manifest: dict[str, Any]) -> str:
    """A fingerprint of a distilled set's content: the settings that define it and its per-image records.

    Execution choices (device, batching, compilation, ...) and timings are left
    out, so resuming a set with other execution flags, or with a version that
    added one, keeps its finished evaluations.
    """
    defining = defining_settings(manifest["config"])
    payload = json.dumps({"config": defining, "images": manifest["images"]}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def load_distilled(folder: str | Path, manifest: dict[str, Any]) -> TrainingSet:
    """Every image the manifest lists, in class order."""
    folder = Path(folder)
    images, labels = [], []
    for record in manifest["images"]:
        path = folder / record["file"]
        if not path.exists():
            raise FadrmError(f"{path} listed in the manifest is missing; rerun fadrm distill")
        images.append(read_image(path, manifest["dataset"]["channels"]))
        labels.append(record["class"])
    return TrainingSet("distilled", torch.stack(images), torch.tensor(labels))


def random_real_subset(dataset: ImageDataset, spec: DatasetSpec, ipc: int, seed: int) -> TrainingSet:
    """``ipc`` random real training images per class (the like-for-like baseline), at the spec's size."""
    gen = make_generator(seed, "random-real")
    images, labels = [], []
    for label in range(len(dataset.classes)):
        pool = dataset.indices_of_class(label)
        if len(pool) < ipc:
            raise FadrmError(f"class {label} has only {len(pool)} images, fewer than IPC {ipc}")
        for i in torch.randperm(len(pool), generator=gen)[:ipc].tolist():
            image = dataset.load(pool[i])
            if image.shape[-2:] != (spec.image_size, spec.image_size):
                image = eval_transform(spec)(image).mul(255).round().to(torch.uint8)
            images.append(image)
            labels.append(label)
    return TrainingSet("random-real", torch.stack(images), torch.tensor(labels))


# ---------------------------------------------------------------- training
def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Parameter groups as the reference builds them: decay only on weights with more than one dimension.

    BatchNorm weights, every bias and other one-dimensional parameters get none
    (the reference's ``get_parameters``: named "weight" and more than one dimension).
    """
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        (decay if "weight" in name and parameter.ndim > 1 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _optimizer(config: EvalConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    groups = weight_decay_groups(model, config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    raise FadrmError(f"unknown --optimizer {config.optimizer!r}; choose adamw or sgd")


def stretched_cosine(epoch: int, epochs: int, eta: float) -> float:
    """Learning-rate factor 0.5 * (1 + cos(pi * epoch / (eta * epochs))): eta > 1 stops before zero."""
    return 0.5 * (1 + math.cos(math.pi * epoch / (eta * epochs)))


def micro_batches(batch_size: int, accumulation: int, num_images: int) -> list[slice]:
    """How one loader batch of ``num_images`` is forwarded: micro-batches of ``batch_size // accumulation``.

    A short last loader batch gets fewer micro-batches (the reference's ``ceil``); every
    micro-batch's loss is divided by ``accumulation`` all the same.
    """
    size = batch_size // accumulation
    return [slice(start, start + size) for start in range(0, num_images, size)]


def train_student(
    model: nn.Module,
    train: TrainingSet,
    config: EvalConfig,
    spec: DatasetSpec,
    runtime: Runtime,
    val_loader: torch.utils.data.DataLoader,
    labeller: TeacherLabeller | None,
    store: LabelStore | None = None,
    desc: str = "student",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train ``model`` on ``train`` only; soft labels from ``store`` or ``labeller``, hard labels when both are None.

    ``config.lr`` and ``config.eta`` must be resolved (see :func:`fadrm.config.student_recipe`).
    Returns the per-epoch loss, every validation, the final top-1/top-5 and the best top-1
    over the validations (which selects on the validation set: report it as such).
    """
    if config.lr is None or config.eta is None:
        raise ValueError("train_student needs a resolved lr and eta")
    sampler = config.view_sampler(spec.image_size)
    runtime.place(model)
    optimizer = _optimizer(config, model, config.lr)
    eta = config.eta
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: stretched_cosine(e, config.epochs, eta))
    scaler = runtime.grad_scaler()
    evaluate_after = set(config.evaluation_epochs())
    history: list[dict[str, Any]] = []
    started = time.perf_counter()
    for epoch in progress(range(config.epochs), desc):
        model.train()
        targets_epoch = store.read(epoch) if store is not None else None
        offset, total, count = 0, 0.0, 0
        for b, indices in enumerate(sampler.batches(epoch, len(train.images), config.batch_size)):
            # Views, mixing and soft labels belong to the loader batch (BSSL halves included).
            view = sampler.view(epoch, b, indices, train.images.shape[-2], train.images.shape[-1])
            pixels = normalize(runtime.batch(render(train.images, view, spec.image_size)), spec.mean, spec.std)
            if targets_epoch is not None:
                targets = targets_epoch[offset : offset + len(indices)].to(runtime.device)
            elif labeller is not None:
                targets = soft_targets(labeller(pixels, runtime), config.temperature)
            else:
                targets = None
                hard = train.labels[indices].to(runtime.device)
                partner_hard = hard[view.partner.to(runtime.device)]
            offset += len(indices)
            optimizer.zero_grad(set_to_none=True)
            for part in micro_batches(config.batch_size, config.accumulation, len(indices)):
                with runtime.autocast():
                    logits = model(pixels[part]).float()
                if targets is not None:
                    loss = F.kl_div(
                        F.log_softmax(logits / config.temperature, dim=1), targets[part], reduction="batchmean"
                    )
                else:
                    loss = view.lam * F.cross_entropy(logits, hard[part]) + (1 - view.lam) * F.cross_entropy(
                        logits, partner_hard[part]
                    )
                check_finite(loss, f"training {desc}")
                backward(loss / config.accumulation, scaler)
                total += float(loss.detach()) * len(logits)
                count += len(logits)
            optimizer_step(optimizer, scaler)
        scheduler.step()
        record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": total / count}
        if epoch + 1 in evaluate_after:
            record.update(evaluate_accuracy(model, val_loader, runtime, spec.mean, spec.std))
            if epoch + 1 != config.epochs:
                log(f"{desc}: epoch {epoch + 1}: top-1 {record['top1']:.2f}%")
        history.append(record)
    result = {"top1": history[-1]["top1"], "top5": history[-1]["top5"], "epochs": config.epochs,
              "seconds": round(time.perf_counter() - started, 2), "history": history}  # fmt: skip
    return with_best_of(result, sorted(evaluate_after))


def with_best_of(result: dict[str, Any], epochs: list[int]) -> dict[str, Any]:
    """``result`` with the best top-1 (and its epoch) over the validations after ``epochs``.

    The earliest epoch wins a tie. A finished run validated at more epochs than asked
    is reported over the asked ones only.
    """
    validations = [h for h in result["history"] if h["epoch"] in epochs and "top1" in h]
    best = max(validations, key=lambda h: h["top1"])
    return {**result, "best_top1": best["top1"], "best_epoch": best["epoch"], "evaluated_epochs": epochs}


# --------------------------------------------------------------------- API
def evaluate(config: EvalConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train each student on the distilled set (and each baseline), write results; returns them.

    Finished runs are kept in ``<out>/runs/`` and skipped when the command is
    repeated with the same settings, so an interrupted evaluation resumes.
    """
    from .report import write_report

    validate_eval_config(config)
    manifest = read_manifest(config.distilled)
    spec = get_dataset_spec(manifest["dataset"]["name"])
    runtime = make_runtime(config.device, config.amp, stage="evaluate")
    out = Path(config.out or Path(config.distilled) / "eval")
    distilled = load_distilled(config.distilled, manifest)
    class_names = list(manifest["dataset"]["class_names"])
    if config.holdout is None:
        config.holdout = int(manifest["config"].get("holdout", 0))
    val_set = load_split(spec, "val", config.data_root, config.holdout)
    val_set.transform = eval_transform(spec)
    val_loader = make_loader(val_set, 256, shuffle=False, workers=config.workers)
    teachers = load_eval_teachers(config, manifest, spec, val_set.classes, runtime)
    labeller = TeacherLabeller([t.model for t in teachers], config.teacher_weights, config.bssl)
    students = config.students or [teachers[0].arch]
    for name in students:
        build_model(name, 2, spec.channels, spec.image_size)  # fail now on an unknown student, not after hours
    train_set = None
    if "random-real" in config.baselines:
        train_set = load_split(spec, "train", config.data_root, config.holdout)
    results: dict[str, Any] = {
        "distilled": str(config.distilled), "dataset": spec.name, "method": manifest["method"], "ipc": manifest["ipc"],
        "teachers": [t.describe() for t in teachers], "config": asdict(config), "runs": [],
    }  # fmt: skip
    # A finished run is reused only for the same settings and the same images: re-distilling
    # into the folder (new pixels, new per-image losses) invalidates it.
    set_id = distilled_set_id(manifest)
    stores: list[LabelStore] = []
    for repeat in range(config.repeats):
        # One repeat is a whole like-for-like comparison under its own seed: student initialisation,
        # views and mixing, and the random real subset change; the distilled images do not.
        trial = replace(config, seed=config.seed + repeat)
        suffix = f"-repeat{repeat}" if repeat else ""
        # (training set, labels) in report order: the distilled set, then each baseline soft and hard.
        arms = [(distilled, "soft")]
        if train_set is not None:
            subset = random_real_subset(train_set, spec, manifest["ipc"], trial.seed)
            arms += [(subset, "soft"), (subset, "hard")]
        store = None
        if config.labels == "stored":
            folder = Path(config.labels_dir or out / "labels")
            folder = folder.with_name(folder.name + suffix)
            store = prepare_store(trial, manifest, distilled, spec, labeller, runtime, folder, log)
            stores.append(store)
        for student, (training_set, label_mode) in itertools.product(students, arms):
            key = f"{training_set.name}-{student}-{label_mode}{suffix}"
            recipe = resolve_recipe(trial, spec.name, student, manifest["ipc"])
            run_config = replace(trial, lr=recipe["lr"], eta=recipe["eta"])
            identity = {**run_config.identity(), "distilled_set": set_id, "protocol": STUDENT_PROTOCOL}
            run_file = out / "runs" / f"{key}.json"
            finished = read_json(run_file) if run_file.exists() else {}
            wanted = run_config.evaluation_epochs()
            # A finished run serves a validation schedule it covers; a denser one needs the student again.
            if finished.get("identity") == identity and set(wanted) <= set(finished["result"]["evaluated_epochs"]):
                run = with_best_of(finished["result"], wanted)
                log(f"{key}: reusing finished run (top-1 {run['top1']:.2f}%)")
            else:
                torch.manual_seed(make_generator(trial.seed, "student", student).initial_seed())
                args = teachers[0].arch_args if student == teachers[0].arch else {}
                model = build_model(student, len(class_names), spec.channels, spec.image_size, **args)
                use_store = store if training_set.name == "distilled" else None
                run = train_student(
                    model, training_set, run_config, spec, runtime, val_loader,
                    labeller if label_mode == "soft" else None, use_store, desc=key, log=log,
                )  # fmt: skip
                run.update({"student": student, "train_set": training_set.name, "labels": label_mode,
                            "images": len(training_set.images), "recipe": recipe})  # fmt: skip
                write_json(run_file, {"identity": identity, "result": run})
                log(f"{key}: top-1 {run['top1']:.2f}% at the last epoch (best {run['best_top1']:.2f}% at epoch "
                    f"{run['best_epoch']}), top-5 {run['top5']:.2f}% ({run['seconds']:.0f}s)")  # fmt: skip
            # Runs finished before repeats existed lack the field; the identity fixes the seed.
            results["runs"].append({**run, "seed": trial.seed})
    results["summary"] = summarise_runs(results["runs"])
    if stores:
        results["stored_labels"] = {
            "dirs": [str(store.folder) for store in stores], "bytes": sum(store.bytes_on_disk() for store in stores),
            "bytes_per_image_per_epoch": stored_label_bytes(len(class_names), config.topk),
        }  # fmt: skip
    write_report(out, results)
    return results


def summarise_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample standard deviation of the final top-1/top-5 and the best top-1 over the repeats
    of each (student, set, labels)."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["student"], run["train_set"], run["labels"]), []).append(run)
    summary = []
    for (student, train_set, labels), members in groups.items():
        row: dict[str, Any] = {"student": student, "train_set": train_set, "labels": labels, "repeats": len(members)}
        for metric in ("top1", "top5", "best_top1"):
            values = [m[metric] for m in members]
            row[metric] = statistics.fmean(values)
            row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(row)
    return summary


def resolve_recipe(config: EvalConfig, dataset: str, student: str, ipc: int) -> dict[str, Any]:
    """The lr and eta one student trains with: the user's where given, else the published recipe."""
    recipe = student_recipe(dataset, student, ipc)
    given = {k: getattr(config, k) for k in ("lr", "eta") if getattr(config, k) is not None}
    if given:
        recipe = {**recipe, **given, "source": f"{recipe['source']}; {', '.join(sorted(given))} given"}
    return recipe


def validate_eval_config(config: EvalConfig) -> None:
    """Reject impossible settings with one clear line each."""
    if min(config.epochs, config.batch_size, config.accumulation, config.repeats) < 1:
        raise FadrmError("--epochs, --batch-size, --accumulation and --repeats must be at least 1")
    if config.mix not in MIX_MODES:
        raise FadrmError(f"unknown --mix {config.mix!r}; choose one of {', '.join(MIX_MODES)}")
    if config.labels not in ("live", "stored"):
        raise FadrmError(f"unknown --labels {config.labels!r}; choose live or stored")
    unknown = set(config.baselines) - set(BASELINES)
    if unknown:
        raise FadrmError(f"unknown --baseline {sorted(unknown)[0]!r}; choose one of {', '.join(BASELINES)}")
    if config.batch_size % config.accumulation:
        raise FadrmError(
            f"--accumulation {config.accumulation} must divide --batch-size {config.batch_size} "
            "(each loader batch is split into equal micro-batches)"
        )
    if not all(v is None or (math.isfinite(v) and v > 0) for v in (config.temperature, config.eta, config.lr)):
        raise FadrmError("--temperature, --eta and --student-lr must be positive numbers")
    if not (math.isfinite(config.weight_decay) and config.weight_decay >= 0):
        raise FadrmError("--weight-decay must be a non-negative number")
    if not (math.isfinite(config.mix_alpha) and config.mix_alpha > 0):
        raise FadrmError("--mix-alpha must be a positive number")
    if config.eval_every < 0:
        raise FadrmError("--eval-every must be 0 (the last epoch only) or positive")
    late = [e for e in config.eval_at if not 1 <= e <= config.epochs]
    if late:
        raise FadrmError(f"--eval-at {late[0]} is outside the {config.epochs} training epochs")


def load_eval_teachers(
    config: EvalConfig, manifest: dict[str, Any], spec: DatasetSpec, class_names: list[str], runtime: Runtime
) -> list[Teacher]:
    """The relabelling teachers (the distilled set's own unless given), checked against the set's dataset."""
    sources = config.teachers or [t["source"] for t in manifest["teachers"]]
    teachers = []
    for source in sources:
        teacher = load_teacher(source, spec)
        if teacher.dataset not in (spec.name, "imagenet-1k"):
            raise FadrmError(
                f"teacher {source} was trained on {teacher.dataset}, but {config.distilled} is a {spec.name} set"
            )
        teacher = fit_teacher_to_dataset(teacher, spec, class_names)
        check_holdout(teacher, config.holdout or 0)
        runtime.place(teacher.model)
        teachers.append(teacher)
    return teachers


def prepare_store(
    config: EvalConfig, manifest: dict[str, Any], distilled: TrainingSet, spec: DatasetSpec,
    labeller: TeacherLabeller, runtime: Runtime, folder: Path, log: Callable[[str], None],
) -> LabelStore:  # fmt: skip
    """Open (or create) the label store in ``folder`` and compute the epochs it lacks."""
    identity = {
        "images": len(distilled.images), "ipc": manifest["ipc"], "seed": config.seed, "epochs": config.epochs,
        "batch_size": config.batch_size, "mix": config.mix, "mix_alpha": config.mix_alpha,
        "crop_scale": list(config.crop_scale), "temperature": config.temperature, "bssl": config.bssl,
        "teachers": [t["sha256"] for t in manifest["teachers"]] if not config.teachers else list(config.teachers),
        "teacher_weights": config.teacher_weights,
    }  # fmt: skip
    store = LabelStore(folder, identity, len(manifest["dataset"]["class_names"]),
                       config.topk, config.temperature)  # fmt: skip
    store.open()
    sampler = config.view_sampler(spec.image_size)
    missing = [e for e in range(config.epochs) if not store.has(e)]
    if missing:
        log(f"storing soft labels for {len(missing)} epochs in {store.folder}")
    for epoch in progress(missing, "labels"):
        logits = label_epoch(distilled.images, sampler, epoch, config.batch_size, labeller, spec.mean, spec.std, runtime)
        store.write(epoch, logits)
    return store
