"""Choose Fashion-MNIST synthesis settings on a validation split held out from the training set.

    python scripts/fmnist_validation_search.py --out runs/valsearch [--holdout 500] [--seeds 0] [--ipc 10]

Trains a teacher without the last ``holdout`` training images of each class,
distills each candidate setting at the given IPC (10 by default), trains the same student on each
distilled set and on a random real subset (soft and hard labels), and ranks
the candidates by top-1 on the held-out images. The test set is never read.
Every step resumes: rerun the same command after an interruption.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import fadrm
from fadrm.config import load_preset_section

# Candidate departures from the preset, one change at a time (name -> distill options).
CANDIDATES: dict[str, dict] = {
    "preset": {},
    "rded": {"method": "rded"},
    "medium-band": {"difficulty": "medium"},
    "lr-0.05": {"lr": 0.05},
    "alpha-0.75": {"alpha": 0.75},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--holdout", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    args = parser.parse_args()
    out = Path(args.out)
    teacher = out / "teacher.pt"
    recipe = load_preset_section("fashion-mnist", "teacher")
    fadrm.train_teacher("fashion-mnist", recipe.pop("model"), teacher, holdout=args.holdout, **recipe)
    rows = []
    for seed in args.seeds:
        for name in args.candidates:
            options = {"method": "fadrm", **CANDIDATES[name]}
            folder = out / (f"{name}-seed{seed}" if args.ipc == 10 else f"{name}-ipc{args.ipc}-seed{seed}")
            fadrm.distill("fashion-mnist", [teacher], folder, ipc=args.ipc, seed=seed, holdout=args.holdout, **options)
            baselines = ["random-real"] if name == "preset" else []
            results = fadrm.evaluate(folder, seed=seed, baselines=baselines)
            for run in results["runs"]:
                label = name if run["train_set"] == "distilled" else f"random-real ({run['labels']})"
                rows.append({"candidate": label, "ipc": args.ipc, "seed": seed, "val_top1": run["top1"]})
    (out / f"search-ipc{args.ipc}.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nIPC {args.ipc}\ncandidate                    seed  held-out top-1")
    for row in sorted(rows, key=lambda r: -r["val_top1"]):
        print(f"{row['candidate']:28s} {row['seed']:4d}  {row['val_top1']:.2f}%")


if __name__ == "__main__":
    main()
