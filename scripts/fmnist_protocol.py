"""What the published student protocol changes on Fashion-MNIST, measured.

    python scripts/fmnist_protocol.py --valsearch runs/valsearch --study runs/study [--seeds 0 1 2]

Held-out split (IPC 10, the sets of ``fmnist_validation_search.py --candidates preset``, teacher
without the last 500 training images per class; the test set is not read): the students under
each protocol variant below, next to the previous protocol's students (trained into ``eval/`` by
fadrm 0.1's ``fmnist_validation_search.py --seeds 0 1 2 --candidates preset``, commit 62622db),
so each change is measured on its own: batch semantics (old-batching -> no-bssl) and BSSL
(no-bssl -> published).

Test set (the study's FADRM sets at IPC 10 and 50, ``fmnist_study.py``): the published protocol,
and with ``--study-variants`` any other variant.

Every student is kept under its set's ``eval-<variant>`` folder and reused, so the script
resumes; run variants or seeds in parallel processes and then once more to print the tables.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import fadrm
from fadrm.io import read_json, write_json

# Student protocol variants (name -> evaluate options), all under this version's code.
VARIANTS: dict[str, dict] = {
    # Loader batches of 16 in two micro-batches of 8, one step per batch, BSSL (named, so that
    # it stays the published protocol whatever the Fashion-MNIST preset chooses).
    "published": {"bssl": True},
    # The same with eval-mode teachers.
    "no-bssl": {"bssl": False},
    # The batching of fadrm before the protocol fix: BatchNorm over 16 and one step per 32 images
    # (loader batches of 32 in two micro-batches), eval-mode teachers. It differs from the old
    # code only in the weight-decay groups and in CutMix drawn per 32 images instead of per 16.
    "old-batching": {"bssl": False, "batch_size": 32},
}


def evaluate(folder: Path, variant: str, seed: int, holdout: int | None = None) -> list[dict]:
    """Students on ``folder`` (FADRM set and random real, soft and hard) under ``variant``."""
    options = {"holdout": holdout} if holdout is not None else {}
    results = fadrm.evaluate(
        folder,
        seed=seed,
        baselines=["random-real"],
        out=str(folder / f"eval-{variant}"),
        **VARIANTS[variant],
        **options,
    )
    return results["runs"]


def previous_protocol_runs(folder: Path) -> list[dict]:
    """The students fadrm 0.1 trained on ``folder`` (its ``eval/``), frozen on first use.

    Running the validation search again with this version retrains ``eval/`` under the new
    protocol, so the previous protocol's results are copied to ``eval-previous/`` and read from there.
    """
    frozen = folder / "eval-previous" / "results.json"
    if not frozen.exists():
        results = read_json(folder / "eval" / "results.json")
        if any("best_top1" in run for run in results["runs"]):
            raise SystemExit(f"{folder / 'eval'} holds this version's students, not fadrm 0.1's")
        write_json(frozen, results)
    return read_json(frozen)["runs"]


def label(run: dict) -> str:
    return "fadrm" if run["train_set"] == "distilled" else f"random-real ({run['labels']})"


def table(title: str, cells: dict[tuple[str, str], list[float]], columns: list[str]) -> None:
    """Print a Markdown table: mean +- sample std over seeds (and each seed's value) per (row, column)."""
    print(f"\n{title}\n")
    print("| | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for row in dict.fromkeys(r for r, _ in cells):
        values = []
        for column in columns:
            v = cells.get((row, column), [])
            spread = statistics.stdev(v) if len(v) > 1 else 0.0
            seeds = " / ".join(f"{x:.2f}" for x in v)
            values.append(f"{statistics.mean(v):.2f} ± {spread:.2f} ({seeds})" if v else "-")
        print(f"| {row} | " + " | ".join(values) + " |")


def add_margins(cells: dict[tuple[str, str], list[float]], columns: list[str]) -> None:
    """Add the row "fadrm - random-real (soft)": the paired margin of each seed, per column."""
    for column in columns:
        ours, baseline = cells.get(("fadrm", column), []), cells.get(("random-real (soft)", column), [])
        if ours and len(ours) == len(baseline):
            cells[("fadrm - random-real (soft)", column)] = [a - b for a, b in zip(ours, baseline)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--valsearch", type=Path, help="folder of fmnist_validation_search.py (held-out split)")
    parser.add_argument("--study", type=Path, help="folder of fmnist_study.py (test set)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--ipc", type=int, nargs="+", default=[10, 50], help="test-set IPCs")
    parser.add_argument(
        "--study-variants",
        nargs="+",
        default=["published"],
        choices=list(VARIANTS),
        help="protocol variants trained on the test-set cells",
    )
    args = parser.parse_args()
    if args.valsearch:
        cells: dict[tuple[str, str], list[float]] = {}
        for seed in args.seeds:
            folder = args.valsearch / f"preset-seed{seed}"
            previous = previous_protocol_runs(folder)
            for run in previous:
                cells.setdefault((label(run), "previous protocol"), []).append(run["top1"])
            for variant in args.variants:
                for run in evaluate(folder, variant, seed, holdout=500):
                    cells.setdefault((label(run), variant), []).append(run["top1"])
        columns = ["previous protocol", *args.variants]
        add_margins(cells, columns)
        table("Held-out top-1 (%), IPC 10, last epoch; mean ± std over seeds (each seed)", cells, columns)
    if args.study:
        for variant in args.study_variants:
            cells = {}
            for ipc in args.ipc:
                for seed in args.seeds:
                    for run in evaluate(args.study / f"fadrm-ipc{ipc}-seed{seed}", variant, seed):
                        cells.setdefault((label(run), f"IPC {ipc}"), []).append(run["top1"])
                        cells.setdefault((f"{label(run)} best", f"IPC {ipc}"), []).append(run["best_top1"])
            columns = [f"IPC {ipc}" for ipc in args.ipc]
            add_margins(cells, columns)
            table(
                f"Test top-1 (%), {variant} (last epoch; 'best': best of the validations); "
                "mean ± std over seeds (each seed)",
                cells,
                columns,
            )


if __name__ == "__main__":
    main()
