"""Carry out an evaluation's plan: train (or reuse, or resume) each student, then write the report.

The jobs and their identities come from :mod:`.plan`; one student's training loop is
:mod:`fadrm.students`; the label stores and finished runs on disk are :mod:`.store`'s; the
figures reported are :mod:`.summary`'s.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Sequence

import torch

from ..artifacts import StudentCheckpoint, checkpoint_dict, checkpoint_meta
from ..distilled import open_evaluated_set
from ..baselines import DISTILLED, FULL_DATA, REAL_SUBSETS, full_data_student
from ..config import EvalConfig, validate, write_config
from ..data import DatasetSpec, data_folder, eval_transform, get_dataset_spec, load_split
from ..data.datasets import ImageDataset, TrainingSet
from ..data.digest import data_digest
from ..distributed import Ranks, init_ranks
from ..errors import FadrmError
from ..io import default_cache, save_torch
from ..labels import TeacherLabeller, prior_weights
from ..locks import lock_or_nothing
from ..models import build_model
from ..report import write_report
from ..runtime import Runtime, make_runtime
from ..seeding import derive_seed
from ..students import train_student, with_best_of
from ..teachers import Teacher, load_teachers
from ..training import evaluate_accuracy, make_loader
from .jobs import job_count, train_concurrently
from .plan import EvaluatedSet, EvaluationPlan, StudentJob, check_against_set, plan_evaluation, settle
from .store import LabelStore, claim_evaluation_folder, fill_label_store, read_finished_run, write_finished_run
from .summary import summarise


def evaluate(config: EvalConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train each student on the distilled set (and each baseline), write results; returns them.

    Finished runs are kept in ``<out>/runs/`` and skipped when the command is
    repeated with the same settings, so an interrupted evaluation resumes; an
    unfinished student continues after its last finished epoch. Under torchrun the
    processes train each student together; rank 0 writes every file.
    """
    config, distilled_set, sources, weights = opened(config)
    runtime = student_runtime(config)
    ranks = init_ranks(runtime.device.type)
    try:
        return evaluate_ranked(config, distilled_set, sources, weights, runtime, ranks, log)
    finally:
        ranks.close()


def opened(config: EvalConfig) -> tuple[EvalConfig, EvaluatedSet, list[str], Sequence[float] | None]:
    """The evaluation's set opened and what it settles: the config (validated, with the set's holdout and
    priors), the set, the relabelling teachers and their weights (None: equal)."""
    validate(config)  # also for configs built by hand rather than resolved
    distilled_set = open_evaluated_set(config.distilled, config.dataset, config.data_root, config.teachers)
    config = settle(config, distilled_set)
    check_against_set(config, len(distilled_set.class_names))
    sources = list(config.teachers or [t["source"] for t in distilled_set.teachers])
    weights = (
        prior_weights(config.teacher_priors, config.prior_temperature, len(sources))
        if config.teacher_priors
        else config.teacher_weights
    )
    return config, distilled_set, sources, weights


def train_students(configs: Sequence[EvalConfig], jobs: str, log: Callable[[str], None] = print) -> int:
    """Train the unfinished students of several evaluations in one pool of ``jobs`` worker processes (a study's
    queue: no pool waits for one set's last student before the next set's start); returns how many trained.

    Each evaluation's folder is claimed and its label stores filled first, as :func:`evaluate` does; its
    full-data arm and report are left to :func:`evaluate`, which then finds every student finished.
    """
    with contextlib.ExitStack() as held:
        inputs: list[WorkerInputs] = []
        pending: list[str] = []
        device = None
        for index, config in enumerate(configs):
            config, distilled_set, sources, weights = opened(config)
            runtime = student_runtime(config)
            device = device or runtime.device
            bench = StudentBench.prepare(config, distilled_set, sources, weights, runtime, Ranks(), log)
            held.enter_context(lock_or_nothing(bench.plan.out, "--out", True))
            bench.claim(log)
            for repeat in range(len(bench.plan.repeats)):
                bench.filled_store(repeat, log)
            pending += [f"{index}:{job.key}" for _, _, job in bench.jobs() if bench.finished_run(job, quiet) is None]
            inputs.append(bench.worker_inputs())
        count = job_count(jobs, device or torch.device("cpu"))
        if pending:
            log(f"training {len(pending)} students of {len(configs)} sets in {min(count, len(pending))} processes")
            train_concurrently(several_trainer, inputs, pending, count, device, log)
        return len(pending)


def evaluate_ranked(
    config: EvalConfig,
    distilled_set: EvaluatedSet,
    sources: Sequence[str],
    weights: Sequence[float] | None,
    runtime: Runtime,
    ranks: Ranks,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """:func:`evaluate` in one process of the group ``ranks`` (the only one without torchrun), relabelling
    with the teachers ``sources`` weighted by ``weights`` (None: equally)."""
    log = ranks.main_only(log)
    log(f"evaluating the {distilled_set.describe()}")
    bench = StudentBench.prepare(config, distilled_set, sources, weights, ranks.own_device(runtime), ranks, log)
    plan, spec = bench.plan, bench.spec
    jobs = job_count(config.jobs, runtime.device, ranks.world)
    # One writer per results folder (rank 0 for the group): a second evaluation into it is refused.
    with lock_or_nothing(plan.out, "--out", ranks.is_main):
        if ranks.is_main:
            bench.claim(log)
        ranks.barrier()
        for name in plan.students:
            build_model(name, 2, spec.channels, spec.image_size)  # fail now on an unknown student, not after hours
        runs = [
            full_data_run(
                config,
                spec,
                student,
                student_args(student, bench.teachers),
                bench.teachers,
                bench.val_loader,
                bench.runtime,
                log,
            )
            for student in plan.full_data
        ]
        stores = [bench.filled_store(r, log) for r in range(len(plan.repeats))]
        finished = {(r, j): bench.finished_run(job, log) for r, j, job in bench.jobs()}
        pending = [(r, j) for (r, j), run in finished.items() if run is None]
        if jobs > 1 and len(pending) > 1:
            log(f"training {len(pending)} students in {min(jobs, len(pending))} processes")
            names = {plan.repeats[r].jobs[j].key: (r, j) for r, j in pending}
            trained = train_concurrently(worker_trainer, bench.worker_inputs(), list(names), jobs, runtime.device, log)
            finished.update({names[name]: run for name, run in trained.items()})
        else:
            finished.update({(r, j): bench.train(r, j, log) for r, j in pending})
        for (r, _), run in finished.items():
            # Runs finished before repeats (or --no-augment) existed lack the field; the identity fixes it.
            runs.append({"augment": True, **run, "seed": plan.repeats[r].config.seed})
        results = summarise(plan, distilled_set, bench.teachers, runs, [s for s in stores if s is not None])
        if ranks.is_main:
            write_report(plan.out, results)
        return results


@dataclass
class StudentBench:
    """What every student of one evaluation shares: the set and its real subsets, the validation data,
    the relabelling teachers, the label stores and the plan. Built alike in the evaluating process and in
    each ``--jobs`` worker, which trains the jobs it is handed exactly as the evaluating process would."""

    config: EvalConfig
    distilled_set: EvaluatedSet
    spec: DatasetSpec
    distilled: TrainingSet
    val_classes: list[str]
    val_loader: torch.utils.data.DataLoader
    teachers: list[Teacher]
    labeller: TeacherLabeller
    plan: EvaluationPlan
    runtime: Runtime
    ranks: Ranks
    sources: Sequence[str]
    weights: Sequence[float] | None
    _train_split: ImageDataset | None = None
    _sets: dict[int, dict[str, TrainingSet]] = field(default_factory=dict)

    @classmethod
    def prepare(
        cls,
        config: EvalConfig,
        distilled_set: EvaluatedSet,
        sources: Sequence[str],
        weights: Sequence[float] | None,
        runtime: Runtime,
        ranks: Ranks,
        log: Callable[[str], None],
    ) -> StudentBench:
        """Load the set, the validation split and the teachers, and plan the evaluation (nothing is written)."""
        spec = get_dataset_spec(distilled_set.dataset)
        distilled = TrainingSet(DISTILLED, *distilled_set.images())
        val_set = load_split(spec, "val", config.data_root, config.holdout)
        val_set.transform = eval_transform(spec)
        val_loader = make_loader(val_set, 256, shuffle=False, workers=config.workers)
        teachers = load_teachers(sources, spec, val_set.classes, runtime, holdout=config.holdout)
        if not config.teachers:
            check_set_teachers(distilled_set, teachers)
        data_sha256 = data_digest(data_folder(spec, config.data_root), default_cache(), log)
        digests = [t.sha256 or t.source for t in teachers]
        plan = plan_evaluation(config, distilled_set, teachers[0].arch, digests, data_sha256)
        labeller = TeacherLabeller([t.model for t in teachers], weights, config.bssl, config.balance_teachers)
        return cls(
            config,
            distilled_set,
            spec,
            distilled,
            list(val_set.classes),
            val_loader,
            teachers,
            labeller,
            plan,
            runtime,
            ranks,
            sources,
            weights,
        )

    def claim(self, log: Callable[[str], None]) -> None:
        """Take the results folder for this evaluation (:func:`~.store.claim_evaluation_folder`) and write the
        resolved config there (the writing process only, holding the folder's lock)."""
        data_dir = data_folder(self.spec, self.config.data_root)
        claim_evaluation_folder(self.plan.out, self.distilled_set, self.config.overwrite, data_dir, log)
        write_config(self.plan.out / "config.yaml", self.plan.config)

    def jobs(self) -> Iterator[tuple[int, int, StudentJob]]:
        """Every student job with its repeat's and its own position, in the order they are reported."""
        for r, repeat in enumerate(self.plan.repeats):
            for j, job in enumerate(repeat.jobs):
                yield r, j, job

    def store(self, repeat: int) -> LabelStore | None:
        """The repeat's label store (None: live labels)."""
        rep = self.plan.repeats[repeat]
        if rep.store_folder is None:
            return None
        return LabelStore(
            rep.store_folder,
            rep.store_identity,
            len(self.distilled_set.class_names),
            rep.config.topk,
            rep.config.temperature,
            replaceable=self.config.labels_dir is None,  # the evaluation's own, in its folder
        )

    def filled_store(self, repeat: int, log: Callable[[str], None]) -> LabelStore | None:
        """The repeat's label store with every epoch stored (what its students then only read)."""
        store = self.store(repeat)
        if store is not None:
            trial = self.plan.repeats[repeat].config
            images = self.distilled.images
            fill_label_store(store, trial, images, self.spec, self.labeller, self.runtime, log, self.ranks)
        return store

    def training_set(self, repeat: int, train_set: str) -> TrainingSet:
        """The images an arm of ``repeat`` trains on: the set, or a real subset drawn at the repeat's seed."""
        if train_set == DISTILLED:
            return self.distilled
        if repeat not in self._sets:
            if self._train_split is None:
                self._train_split = load_split(self.spec, "train", self.config.data_root, self.config.holdout)
            seed, ipc = self.plan.repeats[repeat].config.seed, self.distilled_set.ipc
            self._sets[repeat] = {
                name: REAL_SUBSETS.get(name)(self._train_split, self.spec, ipc, seed) for name in self.plan.subsets
            }
        return self._sets[repeat][train_set]

    def finished_run(self, job: StudentJob, log: Callable[[str], None]) -> dict[str, Any] | None:
        """The job's finished run where one covers the validations asked for (logged as reused), else None."""
        finished = read_finished_run(job.run_file, job.identity, log)
        wanted = job.config.evaluation_epochs()
        # A finished run serves a validation schedule it covers; a denser one needs the student again.
        if finished is None or not set(wanted) <= set(finished["evaluated_epochs"]):
            return None
        run = with_best_of(finished, wanted)
        log(f"{job.key}: reusing finished run (top-1 {run['top1']:.2f}%)")
        return run

    def train(self, repeat: int, position: int, log: Callable[[str], None]) -> dict[str, Any]:
        """Train job ``position`` of ``repeat`` (resuming its checkpoint), save it as a teacher checkpoint and
        record it; returns its run record."""
        job = self.plan.repeats[repeat].jobs[position]
        return train_job(
            job,
            self.training_set(repeat, job.arm.train_set),
            self.store(repeat) if job.uses_store else None,
            self.labeller,
            self.teachers,
            self.spec,
            self.val_classes,
            self.val_loader,
            self.runtime,
            self.ranks,
            log,
        )

    def worker_inputs(self) -> WorkerInputs:
        """What a ``--jobs`` worker needs to build this bench again, and the identities it must plan."""
        identities = {(r, j): job.identity for r, j, job in self.jobs()}
        return WorkerInputs(self.config, list(self.sources), self.weights, identities)


@dataclass(frozen=True)
class WorkerInputs:
    """What a ``--jobs`` worker builds the evaluation's :class:`StudentBench` from: the settled config, the
    relabelling teachers and their weights; and the identity of every job, which it must plan alike."""

    config: EvalConfig
    sources: list[str]
    weights: Sequence[float] | None
    identities: dict[tuple[int, int], dict[str, Any]]


def student_runtime(config: EvalConfig) -> Runtime:
    """The evaluation's device and precision, its optimiser step and where its views are rendered."""
    return make_runtime(
        config.device,
        config.amp,
        stage="evaluate",
        fused_optimizer=config.fused_optimizer,
        views=config.views,
        prefetch_views=config.prefetch_views,
    )


def quiet(line: str) -> None:
    """A worker's log for what the evaluating process has already said (loading, digests)."""


def worker_trainer(inputs: WorkerInputs, device: torch.device) -> Callable[[Any, Callable[[str], None]], dict]:
    """In a ``--jobs`` worker: the bench built as the evaluating process built it, on ``device``; returns the
    function that trains one job, named by its key."""
    config = inputs.config
    distilled_set = open_evaluated_set(config.distilled, config.dataset, config.data_root, config.teachers)
    runtime = replace(student_runtime(config), device=device)
    bench = StudentBench.prepare(config, distilled_set, inputs.sources, inputs.weights, runtime, Ranks(), quiet)
    if {(r, j): job.identity for r, j, job in bench.jobs()} != inputs.identities:
        raise RuntimeError("a student process planned other runs than the evaluating process")
    positions = {job.key: (r, j) for r, j, job in bench.jobs()}
    return lambda name, log: bench.train(*positions[name], log)


def several_trainer(
    inputs: Sequence[WorkerInputs], device: torch.device
) -> Callable[[Any, Callable[[str], None]], dict]:
    """In a worker of :func:`train_students`: trains job ``"<evaluation>:<key>"``, building each evaluation's
    bench the first time one of its jobs comes."""
    trainers: dict[int, Callable[[Any, Callable[[str], None]], dict]] = {}

    def train(name: str, log: Callable[[str], None]) -> dict:
        index, key = name.split(":", 1)
        if int(index) not in trainers:
            trainers[int(index)] = worker_trainer(inputs[int(index)], device)
        return trainers[int(index)](key, log)

    return train


def check_set_teachers(distilled_set: EvaluatedSet, teachers: Sequence[Teacher]) -> None:
    """Refuse to relabel with a set's own teachers when a file at a recorded place is not the teacher the set
    was made with (its sha256 differs from the manifest's): the labels would belong to another teacher."""
    for teacher, recorded in zip(teachers, distilled_set.teachers):
        if recorded.get("sha256") and teacher.sha256 != recorded["sha256"]:
            raise FadrmError(
                f"{teacher.source} is not the teacher the set in {distilled_set.folder} was made with (its sha256 "
                "differs from the one its manifest records); restore that teacher, or name the teachers to "
                "relabel with by --teacher"
            )


def train_job(
    job: StudentJob,
    training_set: TrainingSet,
    store: LabelStore | None,
    labeller: TeacherLabeller,
    teachers: Sequence[Teacher],
    spec: DatasetSpec,
    class_names: Sequence[str],
    val_loader: torch.utils.data.DataLoader,
    runtime: Runtime,
    ranks: Ranks,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The job's student trained (resuming its checkpoint), saved as a teacher checkpoint and recorded; its
    run record. Everything it draws comes from the job's own seeds, so it trains alike in any process."""
    torch.manual_seed(derive_seed(job.config.seed, "student", job.student))
    args = student_args(job.student, teachers)
    model = build_model(job.student, len(class_names), spec.channels, spec.image_size, **args)
    checkpoint = StudentCheckpoint(job.checkpoint_file, job.identity)
    run = train_student(
        model,
        training_set,
        job.config,
        spec,
        runtime,
        val_loader,
        labeller if job.arm.labels == "soft" else None,
        store,
        desc=job.key,
        log=log,
        checkpoint=checkpoint,
        ranks=ranks,
    )
    run.update(
        {
            "student": job.student,
            "train_set": training_set.name,
            "labels": job.arm.labels,
            "augment": job.config.augment,
            "images": len(training_set.images),
            "recipe": job.recipe,
        }
    )
    if ranks.is_main:
        # The trained student as a teacher checkpoint: every command takes it as a teacher.
        meta = checkpoint_meta(
            job.student,
            args,
            spec.name,
            class_names,
            spec.channels,
            spec.image_size,
            spec.mean,
            spec.std,
            run["top1"],
            run["top5"],
            train_config=job.identity,
        )
        weights = model.to(memory_format=torch.contiguous_format)
        save_torch(job.weights_file, checkpoint_dict(weights, meta))
        write_finished_run(job.run_file, job.identity, run)
        checkpoint.remove()
    ranks.barrier()  # every rank sees the finished run before the next one
    log(
        f"{job.key}: top-1 {run['top1']:.2f}% at the last epoch (best {run['best_top1']:.2f}% at epoch "
        f"{run['best_epoch']}), top-5 {run['top5']:.2f}% ({run['seconds']:.0f}s)"
    )
    return run


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
