"""A committee method's priors (CV-DD): what each teacher is worth on its own.

A teacher's prior is the last-epoch top-1 (%) of one fixed student trained on an SRe2L++ set
distilled from that teacher alone, each set made and scored exactly as ``fadrm distill`` and
``fadrm evaluate`` make and score any other (the dataset's SRe2L++ preset and student protocol,
the same IPC, seed and held-out split for every teacher). Output folder::

    DIR/sre2l++-<teacher stem>-<sha8>/   each teacher's set, its students in eval/
    DIR/priors.json                      per teacher: source, sha256, prior, set; the student, the protocol

Both stages resume and reuse what is finished, so the same command again trains nothing twice.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping

from ._version import __version__
from .artifacts import write_priors
from .config import DistillConfig, EvalConfig, PriorsConfig, resolve, validate
from .data import data_folder, get_dataset_spec
from .data.digest import data_digest
from .errors import FadrmError
from .evaluation import STUDENT_PROTOCOL, evaluate, student_args
from .io import default_cache, safe_name
from .synthesis.pipeline import distill
from .teachers import Teacher, load_teacher

# The method of each teacher's own set: CV-DD's priors score its SRe2L++ baseline.
PRIOR_METHOD = "sre2l++"
PRIORS_FILE = "priors.json"


def prior_set_folder(out: str | Path, source: str, sha256: str) -> Path:
    """Where a teacher's own set is distilled: named by its file and the start of its hash, so
    another teacher never resumes into it."""
    return Path(out) / f"{PRIOR_METHOD}-{safe_name(Path(source).stem)}-{sha256[:8]}"


def prior_flags(priors: list[float]) -> str:
    """The ``--prior`` flags that pass ``priors`` to ``fadrm distill``."""
    return " ".join(f"--prior {p:g}" for p in priors)


def fixed_student(config: PriorsConfig, teachers: list[Teacher]) -> tuple[str, dict[str, Any]]:
    """The one student every teacher's set trains, and its architecture options.

    ``fadrm evaluate`` builds a student of its set's teacher's architecture with that teacher's
    options, so a student must come out the same on every set, or the priors would compare
    different students.

    Raises:
        FadrmError: when the student would differ between two teachers' sets.
    """
    student = config.student or teachers[0].arch
    options = [student_args(student, [teacher]) for teacher in teachers]
    for teacher, args in zip(teachers[1:], options[1:]):
        if args != options[0]:
            raise FadrmError(
                f"the student {student} would be built with {options[0] or 'its defaults'} on the set of "
                f"{teachers[0].source} but with {args or 'its defaults'} on that of {teacher.source} (a "
                "student of a teacher's architecture takes its options); give --student another "
                "architecture"
            )
    return student, options[0]


def _teachers_and_student(config: PriorsConfig) -> tuple[list[dict[str, Any]], str, dict[str, Any]]:
    """Each teacher's description (source, hash, architecture) and the fixed student with its options.
    The weights loaded to learn them are not kept: each stage loads its own."""
    spec = get_dataset_spec(config.dataset)
    teachers = [load_teacher(source, spec) for source in config.teachers]
    student, student_options = fixed_student(config, teachers)
    return [teacher.describe() for teacher in teachers], student, student_options


def compute_priors(
    config: PriorsConfig,
    log: Callable[[str], None] = print,
    distill_options: Mapping[str, Any] | None = None,
    eval_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Distill an SRe2L++ set per teacher, train the fixed student on each, write ``priors.json``.

    Args:
        config: the teachers, dataset, IPC, student and where to work.
        distill_options, eval_options: further options of every set and every student (keys of
            :class:`~fadrm.config.DistillConfig` and :class:`~fadrm.config.EvalConfig`, e.g. a
            shorter budget); the teacher, method, IPC, seed and split are always the config's.

    Returns:
        What ``priors.json`` holds; ``priors`` lists the values in ``--teacher`` order.
    """
    validate(config)
    described, student, student_options = _teachers_and_student(config)
    # The priors are the teachers' worth on this data: a distillation on other data refuses them.
    data_sha256 = data_digest(data_folder(get_dataset_spec(config.dataset), config.data_root), default_cache(), log)
    shared = {
        "dataset": config.dataset,
        "seed": config.seed,
        "holdout": config.holdout,
        "data_root": config.data_root,
        "device": config.device,
        "amp": config.amp,
    }
    entries: list[dict[str, Any]] = []
    protocol: dict[str, Any] = {}
    for teacher in described:
        folder = prior_set_folder(config.out, teacher["source"], teacher["sha256"])
        log(f"prior of {teacher['source']}: its {PRIOR_METHOD} set in {folder}")
        own_set = {
            **(distill_options or {}),
            **shared,
            "teachers": [teacher["source"]],
            "out": str(folder),
            "method": PRIOR_METHOD,
            "ipc": config.ipc,
        }
        distill(resolve(DistillConfig, own_set), log=log)
        # Only the last epoch counts, so the student validates only then (no choice on the validation set).
        students = {
            "eval_every": 0,
            **(eval_options or {}),
            **shared,
            "distilled": str(folder),
            "students": [student],
            "baselines": [],
            "robustness": False,
            "repeats": 1,
        }
        students.pop("dataset")
        evaluation: EvalConfig = resolve(
            EvalConfig, students, dataset=config.dataset, method=PRIOR_METHOD, ipc=config.ipc
        )
        (run,) = evaluate(evaluation, log=log)["runs"]
        # The same for every teacher: everything but the set is the config's.
        protocol = {
            **{k: v for k, v in evaluation.identity().items() if k != "distilled"},
            "student_protocol": STUDENT_PROTOCOL,
            "recipe": run["recipe"],
        }
        # Rounded as fadrm reports accuracies, so the printed flags and this file give the same synthesis.
        entries.append(
            {
                "source": teacher["source"],
                "sha256": teacher["sha256"],
                "arch": teacher["arch"],
                "prior": round(run["top1"], 2),
                "top1": run["top1"],
                "set": str(folder),
                "results": str(folder / "eval" / "results.json"),
            }
        )
    priors = [entry["prior"] for entry in entries]
    record = {
        "fadrm_version": __version__,
        "dataset": config.dataset,
        "ipc": config.ipc,
        "seed": config.seed,
        "holdout": config.holdout,
        "data_sha256": data_sha256,
        "method": PRIOR_METHOD,
        "student": student,
        "student_options": student_options,
        "prior": "last-epoch top-1 (%) of the student on the teacher's own set, rounded to 2 decimals",
        "protocol": protocol,
        "teachers": entries,
        "priors": priors,
        "flags": prior_flags(priors),
    }
    path = Path(config.out) / PRIORS_FILE
    record = write_priors(path, record)
    log(
        "\n".join(
            [
                f"priors (last-epoch top-1 of {student} on each teacher's {PRIOR_METHOD} set, IPC {config.ipc}):",
                *(f"  {entry['source']}: {entry['prior']:.2f}" for entry in entries),
                f"wrote {path}; pass them to fadrm distill as {record['flags']} (or --priors-from {path})",
            ]
        )
    )
    return record


def with_priors(config: DistillConfig, priors: list[float]) -> DistillConfig:
    """``config`` with its committee weighed by ``priors`` (checked against its teachers)."""
    weighed = replace(config, synthesis=replace(config.synthesis, priors=list(priors)))
    validate(weighed)
    return weighed
