"""Like-for-like baselines: what a distilled set is compared with, each as student runs ("arms").

A comparison is a list of :class:`Arm`: which training set (the distilled set,
a real subset of the same size from :data:`REAL_SUBSETS`, or the whole training
split), which labels (soft from the teachers, or hard), and whether the
student's augmentation is on. Each entry of :data:`BASELINES` adds arms;
together ``random-real``, ``hard-labels``, ``full-data`` and
``no-augmentation`` give every accuracy the robustness scores of
:mod:`fadrm.robustness` need.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from .artifacts import changed_settings
from .config import EvalConfig, TeacherConfig, resolve
from .data import DatasetSpec, eval_transform
from .data.datasets import ImageDataset, TrainingSet
from .errors import FadrmError
from .io import default_cache
from .registry import Registry
from .seeding import make_generator
from .teachers import Teacher, load_teacher, teacher_identity, train_teacher


# ------------------------------------------------------------- real subsets
# (real training split, spec, images per class, seed) -> a real training set of the distilled set's size.
SubsetFn = Callable[[ImageDataset, DatasetSpec, int, int], TrainingSet]
REAL_SUBSETS: Registry[SubsetFn] = Registry("real subset")


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


REAL_SUBSETS.add("random-real", random_real_subset)


# -------------------------------------------------------------------- arms
DISTILLED = "distilled"
# The whole training split: trained by the teacher recipe, not by the student loop (see full_data_student).
FULL_DATA = "full-data"


@dataclass(frozen=True)
class Arm:
    """One student run of a comparison.

    Attributes:
        train_set: ``"distilled"``, a :data:`REAL_SUBSETS` name, or ``"full-data"``.
        labels: ``"soft"`` (the teachers relabel every view) or ``"hard"`` (each image's class).
        augment: False turns the student's augmentation off (whole images, no flips, no mixing).
    """

    train_set: str
    labels: str
    augment: bool = True

    def key(self, student: str) -> str:
        """The run's file name stem (without the repeat suffix)."""
        return f"{self.train_set}-{student}-{self.labels}" + ("" if self.augment else "-noaug")


@dataclass(frozen=True)
class Baseline:
    """A registered baseline: a one-line summary and the arms it adds."""

    summary: str
    arms: tuple[Arm, ...]


BASELINES: Registry[Baseline] = Registry("baseline")
BASELINES.add(
    "random-real",
    Baseline(
        "a random real subset of the same IPC, with soft and with hard labels",
        (Arm("random-real", "soft"), Arm("random-real", "hard")),
    ),
)
BASELINES.add(
    "hard-labels",
    Baseline("the distilled set with hard labels (cross-entropy on each image's class)", (Arm(DISTILLED, "hard"),)),
)
BASELINES.add(
    "full-data",
    Baseline(
        "the whole training split with hard labels, by the dataset's teacher recipe "
        "(trained once per dataset, student and seed, then reused)",
        (Arm(FULL_DATA, "hard"),),
    ),
)
BASELINES.add(
    "no-augmentation",
    Baseline(
        "the distilled set and the random real subset with soft labels and without the student's augmentation",
        (Arm(DISTILLED, "soft", augment=False), Arm("random-real", "soft", augment=False)),
    ),
)

# What --robustness adds: every arm HLR, IOR, LRS and ARS need.
ROBUSTNESS_BASELINES = ("random-real", "hard-labels", "full-data", "no-augmentation")


def comparison_arms(baselines: Sequence[str]) -> list[Arm]:
    """The distilled set with soft labels, then each baseline's arms in the order given, each once."""
    arms = [Arm(DISTILLED, "soft")]
    for name in baselines:
        arms += BASELINES.get(name).arms
    return list(dict.fromkeys(arms))


# --------------------------------------------------------------- full data
def full_data_config(config: EvalConfig, dataset: str, student: str, model_args: dict) -> TeacherConfig:
    """How the full-data arm trains ``student``: the dataset's teacher recipe at the evaluation's seed and
    held-out split, written under ``--full-data-dir`` in a file named by what defines it."""
    given = {
        "dataset": dataset,
        "model": student,
        "model_args": model_args,
        "holdout": config.holdout,
        "seed": config.seed,
        "data_root": config.data_root,
        "device": config.device,
        "amp": config.amp,
        "workers": config.workers,
        "out": "full-data.pt",
    }
    teacher_config = resolve(TeacherConfig, given)
    digest = hashlib.sha256(json.dumps(teacher_config.identity(), sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(config.full_data_dir) if config.full_data_dir else default_cache() / "full-data"
    return replace(teacher_config, out=str(folder / f"{dataset}-{student}-{digest}.pt"))


def full_data_student(
    config: EvalConfig,
    dataset: str,
    student: str,
    model_args: dict,
    known: Sequence[Teacher],
    log: Callable[[str], None] = print,
) -> tuple[Teacher, TeacherConfig]:
    """The full-data student: one of ``known`` (e.g. the set's own teacher) when it was trained with
    exactly these settings, else the cached model, trained first (resumably) when missing."""
    teacher_config = full_data_config(config, dataset, student, model_args)
    identity = teacher_identity(teacher_config, log)
    for teacher in known:
        if teacher.train_config and not changed_settings(teacher.train_config, identity):
            log(f"full-data {student}: the teacher {teacher.source} was trained with these settings; reusing it")
            return teacher, teacher_config
    cached = Path(teacher_config.out)
    if cached.exists() and changed_settings(load_teacher(cached).train_config, identity) == ["data_sha256"]:
        # The cache is named by the settings (as before the data was recorded): a student of other data
        # keeps its file, and this data's student gets one named by the data too.
        data = identity["data_sha256"][:12]
        teacher_config = replace(teacher_config, out=str(cached.with_name(f"{cached.stem}-data{data}.pt")))
    log(f"full-data {student}: {teacher_config.out}")
    return train_teacher(teacher_config, log=log), teacher_config
