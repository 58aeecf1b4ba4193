"""The Fashion-MNIST reproduction study: every method at IPC 1/10/50 over seeds, ablations, results page.

    python scripts/fmnist_study.py --out runs/study            # everything (hours on a 2-core CPU)
    python scripts/fmnist_study.py --out runs/study --ipc 1 10 --seeds 0   # a slice
    python scripts/fmnist_study.py --out runs/study --report-only          # the page from what is finished

Runs in any order and resumes: each distilled set and each student run is
kept under --out and reused, so an interrupted study continues where it
stopped. Every student is trained by the common protocol (FADRM's); G-VBSM, EDC
and CV-DD are also evaluated once under their own published protocol at IPC 10
(first seed). After every finished cell the results page (docs/results.md by
default) and its plots are rewritten from what exists, with mean +- std over
the seeds that are done.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import yaml

import fadrm
from fadrm.config import load_preset_section
from fadrm.report import image_grid
from fadrm.data.datasets import read_image

METHODS = ["rded", "sre2l", "sre2l++", "fadrm", "fadrm+", "g-vbsm", "edc", "cv-dd"]
# Methods given both teachers (the others use the first): several teachers per method as published.
MULTI_TEACHER = {"fadrm+", "g-vbsm", "edc", "cv-dd"}
# Ablations at IPC 10 (the paper's): merge ratio, multi-resolution, number of residual merges.
# None marks the preset itself (alpha 0.5, four stages = three merges): the main table's fadrm cell.
ABLATIONS: dict[str, dict[str, Any] | None] = {
    **{f"alpha={a}": {"alpha": a} if a != 0.5 else None for a in (0.0, 0.25, 0.5, 0.75, 1.0)},
    "single-resolution": {"sizes": [28, 28, 28, 28]},
    "merges=0": {"sizes": [28], "budgets": [1000]},
    "merges=1": {"sizes": [24, 28], "budgets": [500, 500]},
    "merges=3": None,
}
# The methods this study adds beside FADRM's own comparisons: each also under its own protocol.
NEW_METHODS = ["g-vbsm", "edc", "cv-dd"]
# The paper's efficiency table: synthesis seconds per ImageNet-1k image, for ratios beside ours.
PAPER_SECONDS_PER_IMAGE = {"fadrm": 0.47, "sre2l++": 2.52, "edc": 4.99, "cv-dd": 8.20, "g-vbsm": 17.28}
STUDENT = "convnet-small"  # the first teacher's architecture: every student of the study
SECOND_TEACHER = {"model": "convnet", "model_args": {"width": 48, "depth": 2}}


def teachers(out: Path) -> tuple[Path, Path]:
    """The preset teacher, and a second architecture for FADRM+."""
    recipe = load_preset_section("fashion-mnist", "teacher")
    first = out / "teacher.pt"
    fadrm.train_teacher("fashion-mnist", recipe.pop("model"), first, **recipe)
    second = out / "teacher2.pt"
    fadrm.train_teacher(
        "fashion-mnist",
        SECOND_TEACHER["model"],
        second,
        model_args=SECOND_TEACHER["model_args"],
        epochs=recipe["epochs"],
    )
    return first, second


def finished_results(folder: Path, eval_folder: str, protocol: str) -> dict | None:
    """The results an earlier evaluation wrote in ``folder/eval_folder``, when the set is complete
    and they were made under ``protocol``; else None."""
    path = folder / eval_folder / "results.json"
    if not (folder / "manifest.json").exists() or not path.exists():
        return None
    results = json.loads(path.read_text())
    return results if results.get("protocol") == protocol else None


def cell(
    out: Path,
    name: str,
    method: str,
    ipc: int,
    seed: int,
    sources: list[Path],
    report_only: bool = False,
    **options: Any,
) -> list[dict]:
    """Distill one set (in its own process, so its peak memory is its own) and evaluate it under the
    common student protocol (FADRM's, ``--protocol common``), relabelled by the first teacher; rows of
    the results table. With ``report_only`` nothing is computed: the rows of a finished cell, else none."""
    folder = out / f"{name}-ipc{ipc}-seed{seed}"
    if report_only:
        results = finished_results(folder, "eval", "common")
        return [] if results is None else cell_rows(folder, name, ipc, seed, results)
    if not (folder / "manifest.json").exists():
        command = [
            sys.executable,
            "-m",
            "fadrm",
            "distill",
            "--dataset",
            "fashion-mnist",
            "--method",
            method,
            "--ipc",
            str(ipc),
            "--seed",
            str(seed),
            "--out",
            str(folder),
        ]
        for source in sources:
            command += ["--teacher", str(source)]
        if fadrm.METHODS.get(method).uses_priors:
            command += ["--priors-from", str(priors(out, sources, ipc, seed))]
        if options:
            extra = out / f"{name}-ipc{ipc}-seed{seed}.options.yaml"
            extra.write_text(yaml.safe_dump(options))
            command += ["--config", str(extra)]
        subprocess.run(command, check=True)
    baselines = ["random-real"] if name == "fadrm" else []
    results = fadrm.evaluate(folder, seed=seed, baselines=baselines, teachers=[str(sources[0])], protocol="common")
    return cell_rows(folder, name, ipc, seed, results)


def cell_rows(folder: Path, name: str, ipc: int, seed: int, results: dict) -> list[dict]:
    """The results table's rows of one evaluated set: its students and the baselines beside them."""
    manifest = json.loads((folder / "manifest.json").read_text())
    rows = []
    for run in results["runs"]:
        label = name if run["train_set"] == "distilled" else f"random-real ({run['labels']} labels)"
        rows.append(
            {
                "name": label,
                "ipc": ipc,
                "seed": seed,
                "top1": run["top1"],
                "student_seconds": run["seconds"],
                "synthesis_s_per_image": manifest["synthesis_seconds_per_image"],
                "peak_memory_mib": manifest["peak_memory_bytes"] / 2**20,
                "folder": str(folder),
            }
        )
    return rows


def own_protocol(out: Path, method: str, ipc: int, seed: int, report_only: bool = False) -> list[dict]:
    """A study set evaluated under its method's own published student protocol (its own teachers
    relabel, with the method's loss, EMA and schedule), kept in ``eval-own`` beside the common
    protocol's ``eval``; its row (none when ``report_only`` and not yet evaluated)."""
    folder = out / f"{method}-ipc{ipc}-seed{seed}"
    if report_only:
        results = finished_results(folder, "eval-own", "own")
        if results is None:
            return []
    else:
        results = fadrm.evaluate(folder, seed=seed, out=str(folder / "eval-own"), protocol="own")
    run = next(r for r in results["runs"] if r["train_set"] == "distilled")
    return [{"name": method, "ipc": ipc, "seed": seed, "top1": run["top1"], "student_seconds": run["seconds"]}]


def priors(out: Path, sources: list[Path], ipc: int, seed: int) -> Path:
    """A committee method's priors for these teachers at this IPC and seed, computed by ``fadrm priors``
    (one SRe2L++ set per teacher, scored by the study's student) and reused; the priors.json file."""
    folder = out / f"priors-ipc{ipc}-seed{seed}"
    if not (folder / "priors.json").exists():
        command = [
            sys.executable,
            "-m",
            "fadrm",
            "priors",
            "--dataset",
            "fashion-mnist",
            "--ipc",
            str(ipc),
            "--seed",
            str(seed),
            "--student",
            STUDENT,
            "--out",
            str(folder),
        ]
        for source in sources:
            command += ["--teacher", str(source)]
        subprocess.run(command, check=True)
    return folder / "priors.json"


def summarise(rows: list[dict], key: str = "top1") -> dict[tuple[str, int], tuple[float, float, int]]:
    """Mean, standard deviation and count of ``key`` per (name, IPC) over seeds."""
    groups: dict[tuple[str, int], list[float]] = defaultdict(list)
    for r in rows:
        groups[(r["name"], r["ipc"])].append(r[key])
    return {k: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)) for k, v in groups.items()}


def write_page(
    page: Path, rows: list[dict], ablation_rows: list[dict], teacher_info: list[dict], args, own_rows: list[dict] = ()
) -> None:
    """Rewrite the generated block of ``page`` (text outside the markers is the author's and is kept)."""
    images = page.parent / "images"
    table = summarise(rows)
    names = ["random-real (hard labels)", "random-real (soft labels)", *METHODS]
    ipcs = sorted({r["ipc"] for r in rows})

    def mean_sd(summary, key) -> str:
        if key not in summary:
            return "-"
        mean, sd, n = summary[key]
        return f"{mean:.2f} ± {sd:.2f} (n={n})" if n > 1 else f"{mean:.2f} (n=1)"

    lines = [
        f"Generated by `python scripts/fmnist_study.py {' '.join(args.argv)}`; every number in this block "
        "comes from that command.",
        "",
        "Teachers, trained on the whole training set by `fadrm train-teacher` (test top-1):",
        "",
    ]
    for t in teacher_info:
        seconds = f", {t['seconds'] / 60:.1f} min to train" if t["seconds"] else ""
        options = ", ".join(f"{k} {v}" for k, v in t["arch_args"].items())
        lines.append(f"- `{t['file']}`: {t['arch']}{f' ({options})' if options else ''}, {t['top1']:.2f}%{seconds}")
    lines += [
        "",
        "The first teacher relabels every student and is also the student architecture, so its accuracy "
        "is the whole-training-set upper bound.",
        "",
        "### Test top-1 (%), ConvNet student, common protocol (FADRM's students), mean ± std over seeds",
        "",
        "| method | " + " | ".join(f"IPC {i}" for i in ipcs) + " |",
        "|---|" + "---:|" * len(ipcs),
    ]
    lines += [f"| {name} | " + " | ".join(mean_sd(table, (name, i)) for i in ipcs) + " |" for name in names]
    synthesis = summarise([r for r in rows if r["name"] in METHODS], "synthesis_s_per_image")
    memory = summarise([r for r in rows if r["name"] in METHODS and "peak_memory_mib" in r], "peak_memory_mib")
    student = summarise(rows, "student_seconds")
    lines += [
        "",
        "### Cost per stage (mean over seeds)",
        "",
        (
            "Synthesis: seconds per distilled image (patch selection and recovery, from each manifest) and the "
            "peak resident memory of the distilling process (MiB). Student: seconds to train and evaluate one "
            "student."
        ),
        "",
        "| method | "
        + " | ".join(f"IPC {i} synthesis s/img | IPC {i} peak MiB | IPC {i} student s" for i in ipcs)
        + " |",
        "|---|" + "---:|---:|---:|" * len(ipcs),
    ]

    def number(summary, key, digits: int) -> str:
        return f"{summary[key][0]:.{digits}f}" if key in summary else "-"

    for name in names:
        cells = [
            c
            for i in ipcs
            for c in (number(synthesis, (name, i), 3), number(memory, (name, i), 0), number(student, (name, i), 0))
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    fadrm_cost = synthesis.get(("fadrm", 10))
    if fadrm_cost:
        lines += [
            "",
            "### Synthesis cost against the paper's efficiency table",
            "",
            (
                "Seconds per distilled image at IPC 10 (one thread, Fashion-MNIST, each method's own iteration "
                "count) and as a multiple of FADRM's, beside the paper's seconds per ImageNet-1k image and their "
                "multiple of FADRM's. Wall clock from each manifest: it compares methods only when their sets "
                "were made on an otherwise idle machine."
            ),
            "",
            "| method | s/img here | x FADRM here | paper s/img (ImageNet-1k) | x FADRM in the paper |",
            "|---|---:|---:|---:|---:|",
        ]
        for name in METHODS:
            if (name, 10) in synthesis:
                ours = synthesis[(name, 10)][0]
                paper = PAPER_SECONDS_PER_IMAGE.get(name)
                lines.append(
                    f"| {name} | {ours:.3f} | {ours / fadrm_cost[0]:.2f} | "
                    + (f"{paper:.2f} | {paper / PAPER_SECONDS_PER_IMAGE['fadrm']:.2f} |" if paper else "- | - |")
                )
    if own_rows:
        common = {(r["name"], r["ipc"], r["seed"]): r["top1"] for r in rows}
        lines += [
            "",
            "### Each new method under its own published student protocol",
            "",
            (
                "The same sets (IPC 10, one seed) trained by the method's own protocol (`fadrm evaluate SET`, its "
                "teachers relabelling) against the common protocol of the table above (`--protocol common`, "
                "the first teacher relabelling); test top-1 %."
            ),
            "",
            "| method | seed | common protocol | own protocol | higher |",
            "|---|---:|---:|---:|---|",
        ]
        for r in own_rows:
            shared = common.get((r["name"], r["ipc"], r["seed"]))
            higher = (
                "-" if shared is None else ("own" if r["top1"] > shared else "common" if r["top1"] < shared else "tie")
            )
            shared_text = "-" if shared is None else f"{shared:.2f}"
            lines.append(f"| {r['name']} | {r['seed']} | {shared_text} | {r['top1']:.2f} | {higher} |")
    lines += ["", "![accuracy vs IPC](images/fmnist_acc_vs_ipc.png)", ""]
    plot_accuracy(images / "fmnist_acc_vs_ipc.png", table, names, ipcs)
    if ablation_rows:
        abl = summarise(ablation_rows)
        lines += [
            "### Ablations (FADRM, IPC 10, test top-1 %)",
            "",
            (
                "Each row changes one thing of the preset (alpha 0.5, stages 24/28/24/28 px of 250 iterations: "
                "three residual merges). merges=0: one 28 px stage of 1000 iterations; merges=1: 24 then 28 px, "
                "500 each; single-resolution: four 28 px stages of 250 with the three merges."
            ),
            "",
            "| setting | top-1 |",
            "|---|---:|",
        ]
        lines += [f"| {n} | {mean_sd(abl, (n, 10))} |" for n in ABLATIONS if (n, 10) in abl]
        lines += ["", "![ablations](images/fmnist_ablations.png)", ""]
        plot_ablations(images / "fmnist_ablations.png", abl)
    lines += ["![distilled images](images/fmnist_grid.png)", ""]
    replace_block(page, "\n".join(lines))


BEGIN, END = "<!-- BEGIN fmnist_study (generated) -->", "<!-- END fmnist_study -->"


def replace_block(page: Path, block: str) -> None:
    """Put ``block`` between the markers, keeping everything else in the page."""
    text = page.read_text() if page.exists() else "# Fashion-MNIST results\n\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
    else:
        head, tail = text.rstrip("\n") + "\n\n", "\n"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(f"{head}{BEGIN}\n{block}\n{END}{tail}")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(path: Path, table, names: list[str], ipcs: list[int]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
        points = [(i, *table[(name, i)][:2]) for i in ipcs if (name, i) in table]
        if points:
            x, y, e = zip(*points)
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=name)
    ax.set(xscale="log", xlabel="images per class", ylabel="test top-1 (%)", title="Fashion-MNIST, ConvNet student")
    ax.legend(fontsize=8)
    save(fig, path)


def plot_ablations(path: Path, abl) -> None:
    """Left: accuracy against the merge ratio alpha. Right: stage plans (merges, multi-resolution)."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    alphas = [
        (float(n.split("=")[1]), *abl[(n, 10)][:2]) for n in ABLATIONS if n.startswith("alpha") and (n, 10) in abl
    ]
    if alphas:
        x, y, e = zip(*alphas)
        left.errorbar(x, y, yerr=e, marker="o", capsize=3)
    left.set(xlabel="alpha (1: no residual)", ylabel="test top-1 (%)", title="ARC merge ratio")
    plans = [(n, *abl[(n, 10)][:2]) for n in ABLATIONS if not n.startswith("alpha") and (n, 10) in abl]
    if plans:
        labels, y, e = zip(*plans)
        right.bar(range(len(y)), y, yerr=e, capsize=3)
        right.set_xticks(range(len(y)), labels, rotation=20, fontsize=8)
        right.set_ylim(min(y) - 3, max(y) + 2)
    right.set(ylabel="test top-1 (%)", title="stages and residual merges")
    save(fig, path)


def save(fig, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def grid(path: Path, folders: dict[str, Path]) -> None:
    """First image of every class for each method, one row per method."""
    rows = []
    for name, folder in folders.items():
        files = sorted((folder / "images").glob("*/000.png"))
        rows += [read_image(f, 1).float().div(255) for f in files]
    if rows:
        image_grid(torch.stack(rows), 10, scale=3).save(path)


def describe_teacher(path: Path) -> dict:
    """Accuracy, architecture and training time (when the checkpoint records it) of one teacher."""
    teacher = fadrm.load_teacher(path)
    history = torch.load(path, weights_only=True, map_location="cpu").get("history", [])
    seconds = sum(epoch.get("seconds", 0.0) for epoch in history)
    return {
        "file": path.name,
        "arch": teacher.arch,
        "arch_args": teacher.arch_args,
        "top1": teacher.val_top1,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--ipc", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--no-ablations", action="store_true")
    parser.add_argument("--ablation-seeds", type=int, nargs="+", help="seeds of the ablations (default: --seeds)")
    parser.add_argument("--page", default="docs/results.md")
    parser.add_argument(
        "--report-only", action="store_true", help="compute nothing: rewrite the page from the cells already finished"
    )
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    out = Path(args.out)
    first, second = teachers(out)
    teacher_info = [describe_teacher(t) for t in (first, second)]
    rows: list[dict] = []
    ablation_rows: list[dict] = []
    for ipc in args.ipc:
        for seed in args.seeds:
            for method in args.methods:
                sources = [first, second] if method in MULTI_TEACHER else [first]
                rows += cell(out, method, method, ipc, seed, sources, args.report_only)
                write_page(Path(args.page), rows, ablation_rows, teacher_info, args)
    if not args.no_ablations:
        for seed in args.ablation_seeds or args.seeds:
            for name, options in ABLATIONS.items():
                done = (
                    cell(out, "fadrm", "fadrm", 10, seed, [first], args.report_only)
                    if options is None
                    else cell(out, f"ablation-{name}", "fadrm", 10, seed, [first], args.report_only, **options)
                )
                ablation_rows += [{**r, "name": name} for r in done if not r["name"].startswith("random-real")]
                write_page(Path(args.page), rows, ablation_rows, teacher_info, args)
    own_rows = [
        row
        for m in NEW_METHODS
        if m in args.methods and 10 in args.ipc
        for row in own_protocol(out, m, 10, args.seeds[0], args.report_only)
    ]
    if own_rows:
        write_page(Path(args.page), rows, ablation_rows, teacher_info, args, own_rows)
    ipc = 10 if 10 in args.ipc else args.ipc[0]
    folders = {m: out / f"{m}-ipc{ipc}-seed{args.seeds[0]}" for m in args.methods}
    grid(Path(args.page).parent / "images" / "fmnist_grid.png", {m: f for m, f in folders.items() if f.exists()})
    study = {"rows": rows, "ablations": ablation_rows, "own_protocol": own_rows}
    (out / "study.json").write_text(json.dumps(study, indent=2) + "\n")


if __name__ == "__main__":
    main()
