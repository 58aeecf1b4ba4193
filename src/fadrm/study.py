"""``fadrm study GRID.yaml``: a paper's table in one command.

A grid names a dataset, methods, IPCs, distillation seeds, students, a protocol and baselines. The
study trains (or takes) each method's teachers once, then runs every cell (method x IPC x seed) as
``fadrm run`` runs one, into ``<out>/seed<S>/<method>-ipc<N>/``: each stage resumes, so the same
command after a stop continues where it stopped and a finished study only writes its report again.
The sets are made one after another (each uses the whole device); with ``--jobs`` K > 1 every
unfinished student of every set then goes to one pool of K worker processes
(:func:`fadrm.evaluation.train_students`), so that no set's last student holds the others back. The
baselines are trained once per IPC and seed, with the first method's cell.

It writes into ``<out>``, an empty folder or one of its own: ``grid.yaml`` (the grid it was made from,
which ``fadrm study <out>/grid.yaml --out <out>`` replays), ``study.md`` (accuracy per method, IPC,
student and labels as mean ± std over every seed and repeat, with n; the synthesis cost per image),
``study.json`` (every run), ``accuracy-vs-ipc.png`` and ``grids/<method>-ipc<N>.png`` (the first
seed's images, a row per class, labelled), where matplotlib is installed for the plot.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from .config import PROTOCOL_WORDS, dump_yaml
from .data import data_folder, get_dataset_spec
from .distilled import DistilledSet
from .evaluation import train_students
from .errors import FadrmError
from .io import atomic_path, write_json
from .ownership import holds_nothing, refuse_data_folder
from .report import labelled_grid, plot_accuracy_by_ipc
from .synthesis.methods import METHODS
from .teachers import train_teacher
from .workflow import RunPlan, execute_run, make_set, plan_run
from .yaml_input import read_yaml


@dataclass(frozen=True)
class StudyGrid:
    """A study's cells and the options every cell shares (the grid file, key by key).

    Attributes:
        dataset: the registered dataset.
        methods: the methods compared (the first also trains the baselines).
        ipcs: the images per class.
        seeds: one distilled set per seed (its students start at that seed).
        students: the student architectures (default: the first teacher's).
        protocol: ``own`` or ``common`` (``fadrm run --protocol``).
        baselines: the evaluation's baselines (``fadrm evaluate --baseline``).
        repeats: students per set and arm, at seeds seed, seed+1, ...
        teachers: teacher files the methods use, a one-teacher method the first (default: each method's
            preset teachers, trained once).
        data_root: the dataset's folder (default: its usual place).
        distill: further options of every distillation (``fadrm distill`` keys).
        evaluate: further options of every evaluation (``fadrm evaluate`` keys).
    """

    dataset: str
    methods: list[str]
    ipcs: list[int]
    seeds: list[int] = field(default_factory=lambda: [0])
    students: list[str] | None = None
    protocol: str = "own"
    baselines: list[str] = field(default_factory=lambda: ["random-real"])
    repeats: int = 1
    teachers: list[str] | None = None
    data_root: str | None = None
    distill: dict[str, Any] = field(default_factory=dict)
    evaluate: dict[str, Any] = field(default_factory=dict)


# What each key of a grid file must hold: (check, what it must be).
_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "dataset": (lambda v: isinstance(v, str), "a dataset name"),
    "methods": (lambda v: _list_of(v, str), "a list of method names"),
    "ipcs": (lambda v: _list_of(v, int) and all(i >= 1 for i in v), "a list of whole numbers >= 1"),
    "seeds": (lambda v: _list_of(v, int), "a list of whole numbers"),
    "students": (lambda v: v is None or _list_of(v, str), "a list of architectures"),
    "protocol": (lambda v: v in PROTOCOL_WORDS, f"one of {', '.join(PROTOCOL_WORDS)}"),
    "baselines": (lambda v: isinstance(v, list) and all(isinstance(b, str) for b in v), "a list of baselines"),
    "repeats": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a whole number >= 1"),
    "teachers": (lambda v: v is None or _list_of(v, str), "a list of teacher files"),
    "data_root": (lambda v: v is None or isinstance(v, str), "a folder"),
    "distill": (lambda v: isinstance(v, dict), "a mapping of fadrm distill options"),
    "evaluate": (lambda v: isinstance(v, dict), "a mapping of fadrm evaluate options"),
}


def _list_of(value: Any, kind: type) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(v, kind) and not isinstance(v, bool) for v in value)
        and len(set(value)) == len(value)
    )


def read_grid(path: str | Path) -> StudyGrid:
    """The grid a study file holds, every key checked.

    Raises:
        FadrmError: one line naming the file and the key that is missing, unknown or of the wrong kind.
    """
    data = read_yaml(Path(path), f"the study grid {path}")
    if not isinstance(data, dict):
        raise FadrmError(f"the study grid {path} must be a mapping of keys ({', '.join(_KINDS)})")
    unknown = sorted(set(data) - set(_KINDS))
    if unknown:
        raise FadrmError(
            f"the study grid {path} has unknown keys ({', '.join(map(str, unknown))}); known: {', '.join(_KINDS)}"
        )
    missing = [name for name in ("dataset", "methods", "ipcs") if name not in data]
    if missing:
        raise FadrmError(f"the study grid {path} lacks {', '.join(missing)}")
    for key, value in data.items():
        check, what = _KINDS[key]
        if not check(value):
            raise FadrmError(f"the study grid {path}: {key} must be {what} (without repeats), not {value!r}")
    unknown_methods = [m for m in data["methods"] if m not in METHODS.names()]
    if unknown_methods:
        raise FadrmError(
            f"the study grid {path}: unknown methods {', '.join(unknown_methods)}; known: {', '.join(METHODS.names())}"
        )
    return StudyGrid(**data)


@dataclass(frozen=True)
class StudyPlan:
    """A study's teachers and the check of its options, resolved before anything runs.

    Attributes:
        teachers: the teachers to train first (each method's preset recipe; none when the grid gives files).
        method_teachers: each method's teacher files (those to train included).
        checked: (method, IPC, the ``fadrm run`` plan of the method at that IPC and the first seed): every option
            of the grid resolved, so a bad one fails before any work.
    """

    teachers: list[Any]
    method_teachers: dict[str, list[str]]
    checked: list[tuple[str, int, RunPlan]]


def cell_options(grid: StudyGrid, method: str, device: str, jobs: str) -> dict[str, Any]:
    """The ``plan_run`` options of ``method``'s cells (their IPC, seed, folder and teachers aside)."""
    evaluation = {
        **grid.evaluate,
        "baselines": grid.baselines if method == grid.methods[0] else [],
        **({"students": grid.students} if grid.students else {}),
    }
    return {
        "distill_options": dict(grid.distill),
        "eval_options": evaluation,
        "dataset": grid.dataset,
        "data_root": grid.data_root,
        "device": device,
        "method": method,
        "protocol": grid.protocol,
        "repeats": grid.repeats,
        "jobs": jobs,
    }


def plan_study(grid: StudyGrid, out: str | Path, jobs: str = "1", device: str = "auto") -> StudyPlan:
    """Resolve every option of ``grid`` for each method and IPC, and the teachers to train (nothing is read,
    trained or written): a bad option fails here."""
    out = Path(out)
    to_train: dict[str, Any] = {}
    method_teachers: dict[str, list[str]] = {}
    checked = []
    for method in grid.methods:
        for ipc in grid.ipcs:
            given = {"teachers": list(grid.teachers[: METHODS.get(method).max_teachers])} if grid.teachers else {}
            # Without files: the preset's teachers, planned into the study's folder (shared by name).
            plan = plan_run(
                **cell_options(grid, method, device, jobs), **given, out=str(out), ipc=ipc, seed=grid.seeds[0]
            )
            checked.append((method, ipc, plan))
        to_train.update({t.out: t for t in plan.teachers if not isinstance(t, str)})
        method_teachers[method] = [t if isinstance(t, str) else t.out for t in plan.teachers]
    return StudyPlan(list(to_train.values()), method_teachers, checked)


# The grid a study folder was made from: its marker, and the file that replays it (fadrm study OUT/grid.yaml).
GRID_FILE = "grid.yaml"


def claim_study_folder(out: Path, grid: StudyGrid) -> None:
    """Take ``out`` for the study: refused, in one line and before anything is written, when it holds files but
    no ``grid.yaml`` (not a fadrm study) or lies in the dataset's folder; then the grid is written there."""
    refuse_data_folder(out, data_folder(get_dataset_spec(grid.dataset), grid.data_root), "--out")
    if not holds_nothing(out) and not (out / GRID_FILE).is_file():
        raise FadrmError(
            f"--out {out} holds files and is not a fadrm study (no {GRID_FILE}); fadrm writes only into an empty "
            "folder or its own study: choose another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / GRID_FILE) as tmp:
        tmp.write_text(dump_yaml({f.name: getattr(grid, f.name) for f in fields(StudyGrid)}))


def run_study(
    grid: StudyGrid, out: str | Path, jobs: str = "1", device: str = "auto", log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run every cell of ``grid`` into ``out`` (resuming what is finished) and write the study's report.

    Every option is resolved before anything runs (:func:`plan_study`), so a bad one in the grid fails first.

    Returns:
        What ``study.json`` holds: the cells with their runs, the table's rows and the synthesis costs.
    """
    out = Path(out)
    plan = plan_study(grid, out, jobs, device)
    claim_study_folder(out, grid)
    for teacher in plan.teachers:
        train_teacher(teacher, log=log)
    cell_plans = [
        (
            method,
            ipc,
            seed,
            plan_run(
                **cell_options(grid, method, device, jobs),
                teachers=plan.method_teachers[method],
                out=str(out / f"seed{seed}"),
                ipc=ipc,
                seed=seed,
            ),
        )
        for seed in grid.seeds
        for method in grid.methods
        for ipc in grid.ipcs
    ]
    if jobs != "1":
        # Every set first, then every unfinished student of every set in one pool of workers.
        for number, (method, ipc, seed, run_plan) in enumerate(cell_plans, 1):
            log(f"== study set {number}/{len(cell_plans)}: {method}, IPC {ipc}, seed {seed} ==")
            make_set(run_plan, log)
        train_students([run_plan.evaluate for *_, run_plan in cell_plans], jobs, log)
    cells = []
    for number, (method, ipc, seed, run_plan) in enumerate(cell_plans, 1):
        log(f"== study cell {number}/{len(cell_plans)}: {method}, IPC {ipc}, seed {seed} ==")
        summary = execute_run(run_plan, log=log)
        manifest = DistilledSet.open(run_plan.distill.out).manifest
        cells.append(
            {
                "method": method,
                "ipc": ipc,
                "seed": seed,
                "set": run_plan.distill.out,
                "synthesis_seconds_per_image": manifest.get("synthesis_seconds_per_image"),
                "runs": summary["runs"],
            }
        )
    record = {
        "grid": {f.name: getattr(grid, f.name) for f in fields(StudyGrid)},
        "rows": table_rows(cells),
        "costs": cost_rows(cells),
        "cells": cells,
    }
    write_study_report(out, grid, record, log)
    return record


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def table_rows(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method (or baseline), IPC, student and labels: top-1 mean ± std over every seed and repeat."""
    groups: dict[tuple, list[float]] = {}
    for cell in cells:
        for run in cell["runs"]:
            arm = cell["method"] if run["train_set"] == "distilled" else run["train_set"]
            plain = "" if run.get("augment", True) else ", no augmentation"
            key = (arm, cell["ipc"], run["student"], run["labels"] + plain)
            groups.setdefault(key, []).append(run["top1"])
    rows = []
    for (arm, ipc, student, labels), top1 in groups.items():
        mean, std = _mean_std(top1)
        rows.append(
            {
                "arm": arm,
                "ipc": ipc,
                "student": student,
                "labels": labels,
                "top1": mean,
                "top1_std": std,
                "n": len(top1),
            }
        )
    return rows


def cost_rows(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Synthesis seconds per image per method and IPC, mean over the seeds (as each set's manifest records)."""
    groups: dict[tuple, list[float]] = {}
    for cell in cells:
        if cell["synthesis_seconds_per_image"] is not None:
            groups.setdefault((cell["method"], cell["ipc"]), []).append(cell["synthesis_seconds_per_image"])
    return [
        {"method": m, "ipc": i, "seconds_per_image": statistics.fmean(v), "sets": len(v)}
        for (m, i), v in groups.items()
    ]


def study_table(grid: StudyGrid, record: dict[str, Any]) -> str:
    """``study.md``: the accuracy table and the synthesis cost table."""
    lines = [
        f"# Study: {grid.dataset}, {', '.join(grid.methods)} at IPC {', '.join(map(str, grid.ipcs))}",
        "",
        f"Students by the {grid.protocol} protocol ({PROTOCOL_WORDS[grid.protocol]}); one set per distillation "
        f"seed ({', '.join(map(str, grid.seeds))}), {grid.repeats} student{'s' * (grid.repeats > 1)} per set and "
        "arm. Top-1 (%) on the real validation set at the last epoch: mean ± sample standard deviation over n "
        "students.",
        "",
        "| method | IPC | student | labels | top-1 | n |",
        "|---|---:|---|---|---:|---:|",
    ]
    for row in sorted(record["rows"], key=lambda r: (r["ipc"], r["arm"] not in grid.methods, r["arm"], r["labels"])):
        spread = f" ± {row['top1_std']:.2f}" if row["top1_std"] is not None else ""
        cells = (row["arm"], row["ipc"], row["student"], row["labels"], f"{row['top1']:.2f}{spread}", row["n"])
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += ["", "Synthesis time per image (seconds, as each set's manifest records; mean over its sets):", ""]
    lines += ["| method | IPC | s/image | sets |", "|---|---:|---:|---:|"]
    for row in sorted(record["costs"], key=lambda r: (r["method"], r["ipc"])):
        lines.append(f"| {row['method']} | {row['ipc']} | {row['seconds_per_image']:.3g} | {row['sets']} |")
    return "\n".join(lines) + "\n"


def write_study_report(out: Path, grid: StudyGrid, record: dict[str, Any], log: Callable[[str], None]) -> None:
    """Write ``study.json``, ``study.md``, the accuracy-vs-IPC plot and each method and IPC's image grid."""
    write_json(out / "study.json", record)
    with atomic_path(out / "study.md") as tmp:
        tmp.write_text(study_table(grid, record))
    if not plot_accuracy_by_ipc(out / "accuracy-vs-ipc.png", record["rows"], grid.methods):
        log("accuracy-vs-ipc.png not drawn: matplotlib is not installed (pip install 'fadrm[plots]')")
    for cell in record["cells"]:
        if cell["seed"] == grid.seeds[0]:
            distilled = DistilledSet.open(cell["set"])
            images, labels = distilled.images()
            picture = labelled_grid(images, labels, distilled.class_names, per_class=min(cell["ipc"], 10))
            path = out / "grids" / f"{cell['method']}-ipc{cell['ipc']}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                picture.save(tmp, format="PNG")
    log(f"wrote {out / 'study.md'}:\n{study_table(grid, record)}")
