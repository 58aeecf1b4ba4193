"""Which students an evaluation trains, on which sets, under which identities: decided before anything trains.

:func:`plan_evaluation` takes the validated config and the opened set and returns every job with
its settings, identity and files (:class:`EvaluationPlan`). It reads nothing but the set's
description and the presets' student recipes and trains nothing, so what an evaluation will do,
and which finished runs it will reuse, can be known (and tested) without a model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, Sequence

from ..baselines import DISTILLED, FULL_DATA, REAL_SUBSETS, ROBUSTNESS_BASELINES, Arm, comparison_arms
from ..config import EvalConfig, student_recipe
from ..data.foreign import EVAL_FOLDER
from ..errors import FadrmError
from ..students import STUDENT_LOSSES
from .store import label_store_identity

# Version of the student protocol; finished runs of an older one are retrained. 2: accumulation
# splits each loader batch into micro-batches (one optimiser step per loader batch), weight decay
# on multi-dimensional weights only, BSSL by default. 3: each batch's crops and flips drawn in one block
# (fadrm.augment.VIEWS_VERSION 2), the same distribution from other random numbers.
STUDENT_PROTOCOL = 3


class EvaluatedSet(Protocol):
    """What planning reads of a set (:class:`~fadrm.distilled.DistilledSet` or
    :class:`~fadrm.data.foreign.ImageFolderSet`)."""

    folder: Path
    dataset: str
    method: str
    class_names: list[str]
    ipc: int
    holdout: int
    priors: list[float] | None
    teachers: list[dict[str, Any]]
    num_images: int

    @property
    def images_per_class(self) -> tuple[int, int]: ...

    def set_id(self) -> str: ...

    def labels_identity(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class StudentJob:
    """One student to train (or reuse) on one arm of one repeat.

    Attributes:
        key: the run's name, its files' stem (``distilled-resnet18-soft-repeat1``).
        student: the student architecture.
        arm: the training set, labels and augmentation.
        config: the run's settings: the repeat's seed, the recipe's ``lr`` and ``eta``, the arm's
            augmentation.
        recipe: the learning rate and stretch, and where they come from.
        identity: what a finished run or a checkpoint must have been made for to be reused.
        run_file: the finished run's record; the weights and the unfinished state lie beside it.
        uses_store: the run trains on exactly the views the repeat's label store holds.
    """

    key: str
    student: str
    arm: Arm
    config: EvalConfig
    recipe: dict[str, Any]
    identity: dict[str, Any]
    run_file: Path
    uses_store: bool

    @property
    def weights_file(self) -> Path:
        """The trained student as a teacher checkpoint."""
        return self.run_file.with_suffix(".pt")

    @property
    def checkpoint_file(self) -> Path:
        """The unfinished student's state (:class:`~fadrm.artifacts.StudentCheckpoint`)."""
        return self.run_file.with_suffix(".partial.pt")


@dataclass(frozen=True)
class Repeat:
    """One like-for-like comparison under its own seed: student initialisation, views, mixing and the
    random real subset change between repeats; the distilled images do not.

    Attributes:
        config: the evaluation's settings at this repeat's seed.
        store_folder: where its stored labels live (None: live labels).
        store_identity: what those labels are made for.
        jobs: its students, in the order they train and are reported.
    """

    config: EvalConfig
    store_folder: Path | None
    store_identity: dict[str, Any] | None
    jobs: tuple[StudentJob, ...]


@dataclass(frozen=True)
class EvaluationPlan:
    """Everything an evaluation does, in order.

    Attributes:
        config: the evaluation's config with what the set settles (its holdout, a committee's priors).
        out: the results folder.
        students: the student architectures.
        subsets: the real subsets the arms train on, drawn once per repeat.
        full_data: the students whose full-data arm is reported (trained once for every repeat).
        repeats: each repeat's label store and jobs.
    """

    config: EvalConfig
    out: Path
    students: tuple[str, ...]
    subsets: tuple[str, ...]
    full_data: tuple[str, ...]
    repeats: tuple[Repeat, ...]


def settle(config: EvalConfig, distilled_set: EvaluatedSet) -> EvalConfig:
    """``config`` with what it leaves to the set: the set's holdout, and under the set's own protocol a
    committee's priors (CV-DD's relabelling weighs the set's teachers by the priors it was made with)."""
    settled: dict[str, Any] = {}
    own_committee = (
        config.teacher_priors is None
        and config.teacher_weights is None
        and not config.teachers
        and config.protocol == "own"
        and distilled_set.priors
    )
    if own_committee:
        settled["teacher_priors"] = distilled_set.priors
    if config.holdout is None:
        settled["holdout"] = distilled_set.holdout
    return replace(config, **settled) if settled else config


def check_against_set(config: EvalConfig, num_classes: int) -> None:
    """Refuse, in one line, settings the set's classes or the chosen loss cannot serve."""
    if config.labels != "stored" or config.topk is None:
        return
    if config.topk >= num_classes:
        raise FadrmError(
            f"--topk {config.topk} keeps every one of the {num_classes} classes; give fewer, or "
            "leave it out to store full logits"
        )
    if STUDENT_LOSSES.get(config.loss).needs_logits:
        raise FadrmError(
            f"--loss {config.loss} needs the teachers' logits; --topk {config.topk} stores probabilities "
            "only: leave --topk out"
        )


def resolve_recipe(config: EvalConfig, dataset: str, student: str, ipc: int) -> dict[str, Any]:
    """The lr and eta one student trains with: the user's where given, else the published recipe."""
    recipe = student_recipe(dataset, student, ipc)
    given = {k: getattr(config, k) for k in ("lr", "eta") if getattr(config, k) is not None}
    if given:
        recipe = {**recipe, **given, "source": f"{recipe['source']}; {', '.join(sorted(given))} given"}
    return recipe


def plan_evaluation(
    config: EvalConfig,
    distilled_set: EvaluatedSet,
    default_student: str,
    teacher_digests: Sequence[str | None] = (),
    data_sha256: str | None = None,
) -> EvaluationPlan:
    """Every job of the evaluation of ``distilled_set`` by ``config`` (validated), in the order they run.

    Args:
        config: the evaluation's config; what it leaves to the set is settled here (:func:`settle`).
        distilled_set: the opened set.
        default_student: the student when ``config`` names none (the first relabelling teacher's
            architecture).
        teacher_digests: the sha256 of each teacher ``config.teachers`` names, in its order (a teacher
            without a file, such as torchvision's weights, by its name): what the relabelling is
            identified by. Unused when the set's own teachers relabel (its manifest records theirs).
        data_sha256: the content of the dataset the students validate on (and real subsets come from),
            part of every student's identity (:func:`fadrm.data.digest.data_digest`; None: left out).
    """
    if config.teachers and len(teacher_digests) != len(config.teachers):
        raise ValueError("plan_evaluation needs the digest of every teacher config.teachers names")
    config = settle(config, distilled_set)
    check_against_set(config, len(distilled_set.class_names))
    out = Path(config.out or Path(config.distilled) / EVAL_FOLDER)
    students = tuple(config.students or [default_student])
    arms = comparison_arms([*config.baselines, *(ROBUSTNESS_BASELINES if config.robustness else ())])
    subsets = tuple(dict.fromkeys(arm.train_set for arm in arms if arm.train_set in REAL_SUBSETS))
    full_data = students if any(arm.train_set == FULL_DATA for arm in arms) else ()
    # A finished run is reused only for the same settings and the same images: re-distilling
    # into the folder (new pixels, new per-image losses) invalidates it.
    set_id = distilled_set.set_id()
    teachers = list(teacher_digests) if config.teachers else [t["sha256"] for t in distilled_set.teachers]
    repeats = []
    for repeat in range(config.repeats):
        trial = replace(config, seed=config.seed + repeat)
        suffix = f"-repeat{repeat}" if repeat else ""
        folder = store_identity = None
        if config.labels == "stored":
            folder = Path(config.labels_dir or out / "labels")
            folder = folder.with_name(folder.name + suffix)
            store_identity = label_store_identity(
                trial, distilled_set.num_images, distilled_set.ipc, teachers, distilled_set.labels_identity()
            )
        jobs = [
            student_job(trial, student, arm, suffix, set_id, teachers, distilled_set, out, data_sha256)
            for student in students
            for arm in arms
            if arm.train_set != FULL_DATA
        ]
        repeats.append(Repeat(trial, folder, store_identity, tuple(jobs)))
    return EvaluationPlan(config, out, students, subsets, full_data, tuple(repeats))


def student_job(
    trial: EvalConfig,
    student: str,
    arm: Arm,
    suffix: str,
    set_id: str,
    teachers: Sequence[str | None],
    distilled_set: EvaluatedSet,
    out: Path,
    data_sha256: str | None = None,
) -> StudentJob:
    """The job of ``student`` on ``arm`` in the repeat whose settings are ``trial``, relabelled by the
    teachers whose digests are ``teachers``, validated on the data whose content is ``data_sha256``."""
    recipe = resolve_recipe(trial, distilled_set.dataset, student, distilled_set.ipc)
    run_config = replace(trial, lr=recipe["lr"], eta=recipe["eta"], augment=trial.augment and arm.augment)
    key = arm.key(student) + suffix
    # Stored labels are the teachers' outputs on exactly the views of the soft distilled arm.
    uses_store = (
        trial.labels == "stored"
        and arm.train_set == DISTILLED
        and arm.labels == "soft"
        and run_config.augment == trial.augment
    )
    data = {"data_sha256": data_sha256} if data_sha256 else {}
    identity = {
        **run_config.identity(),
        **trained_on(arm, set_id, teachers, trial, distilled_set),
        "protocol": STUDENT_PROTOCOL,
        **data,
    }
    return StudentJob(key, student, arm, run_config, recipe, identity, out / "runs" / f"{key}.json", uses_store)


def trained_on(
    arm: Arm, set_id: str, teachers: Sequence[str | None], trial: EvalConfig, distilled_set: EvaluatedSet
) -> dict[str, Any]:
    """What an arm's student learns from, by content and never by path (a moved set or teacher keeps its
    students), so that a changed input retrains only the students that depend on it.

    The distilled arms: the set's id, which covers its own teachers, and with soft labels the hashes of
    the teachers the user names. A real subset's arms: the subset's draw (the dataset and the set's IPC; the seed and
    holdout are settings) and, with soft labels, the relabelling teachers' hashes; not the set's images,
    so distilling the set again keeps its baselines.
    """
    soft = arm.labels == "soft"
    if arm.train_set == DISTILLED:
        return {**({"teachers": list(teachers)} if soft and trial.teachers else {}), "distilled_set": set_id}
    subset = {"real_subset": {"dataset": distilled_set.dataset, "ipc": distilled_set.ipc}}
    return {**subset, "teachers": list(teachers)} if soft else subset
