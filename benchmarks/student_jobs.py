"""Students per hour with one job and with several (``fadrm evaluate --jobs``), side by side in one run.

    python benchmarks/student_jobs.py --set runs/demo/fadrm-ipc10 --json benchmarks/results/cpu-2core-student-jobs.json
    python benchmarks/student_jobs.py --synthetic cifar100 --device cuda --jobs 1 auto --json OUT.json   # on a GPU
    python benchmarks/student_jobs.py --synthetic cifar100 --dry-run                                    # seconds, CI

Each measurement is the ``fadrm evaluate`` command users run, in its own process, into a fresh
folder, timed from start to exit (loading, label stores and report included): students per hour =
students trained / wall hours. The same students, protocol and seeds for every job count.

``--set`` evaluates an existing set (the demo's: its protocol, two repeats of the set and the random
real subset with soft and hard labels, six students). ``--synthetic cifar100`` makes, under a
temporary folder, a CIFAR-100 of random pixels in the dataset's own format, a random CIFAR ResNet-18
teacher and its RDED set at IPC 10, then evaluates that set by the common (FADRM) protocol for
``--epochs`` epochs, ``--repeats`` repeats of two students each (soft and hard labels): the
published student's step at a shorter schedule.
Random pixels and weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def synthetic_cifar100(root: Path, train: int, test: int) -> Path:
    """CIFAR-100 of random pixels in torchvision's python format under ``root``."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, count in (("train", train), ("test", test)):
        batch = {
            "data": rng.integers(0, 256, (count, 3 * 32 * 32), dtype=np.uint8),
            "fine_labels": [i % 100 for i in range(count)],
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"class{i:03d}" for i in range(100)]}))
    return root


def random_teacher(path: Path) -> Path:
    """A random CIFAR ResNet-18 teacher checkpoint for CIFAR-100."""
    import torch

    from fadrm.artifacts import checkpoint_dict, checkpoint_meta
    from fadrm.data import get_dataset_spec
    from fadrm.io import save_torch
    from fadrm.models import build_model

    spec = get_dataset_spec("cifar100")
    torch.manual_seed(0)
    model = build_model("cifar_resnet18", 100, 3, 32)
    names = [f"class{i:03d}" for i in range(100)]
    meta = checkpoint_meta("cifar_resnet18", {}, "cifar100", names, 3, 32, spec.mean, spec.std, 1.0)
    save_torch(path, checkpoint_dict(model, meta))
    return path


def fadrm(*args: str) -> list[str]:
    return [sys.executable, "-m", "fadrm", *args]


def prepare_synthetic(work: Path, args: argparse.Namespace) -> tuple[Path, list[str], int]:
    """The synthetic set and the evaluate options; returns (set, options, students)."""
    train, test = (200, 100) if args.dry_run else (10000, 10000)
    data = synthetic_cifar100(work / "data", train, test)
    teacher = random_teacher(work / "teacher.pt")
    distilled = work / "rded"
    ipc = 1 if args.dry_run else 10
    subprocess.run(
        fadrm(
            "distill",
            "--dataset",
            "cifar100",
            "--teacher",
            str(teacher),
            "--method",
            "rded",
            "--ipc",
            str(ipc),
            "--mipc",
            str(2 * ipc),
            "--num-crop",
            "1",
            "--data-root",
            str(data),
            "--device",
            args.device,
            "--out",
            str(distilled),
        ),
        check=True,
        capture_output=True,
    )
    epochs = "1" if args.dry_run else str(args.epochs)
    repeats = 2 if args.dry_run else args.repeats
    options = [
        "--data-root", str(data), "--protocol", "common", "--epochs", epochs, "--eval-every", "0",
        "--repeats", str(repeats), "--baseline", "hard-labels", "--device", args.device,
    ]  # fmt: skip
    return distilled, options, 2 * repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", help="an existing distilled set (its dataset in its usual place or --data-root)")
    parser.add_argument("--data-root", help="the set's dataset folder")
    parser.add_argument("--synthetic", choices=["cifar100"], help="make a random CIFAR-100, teacher and RDED set")
    parser.add_argument("--jobs", nargs="+", default=["1", "2"], help="the job counts compared (the first: baseline)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=int, default=5, help="--synthetic: epochs per student")
    parser.add_argument("--repeats", type=int, default=8, help="--synthetic: repeats (two students each)")
    parser.add_argument("--dry-run", action="store_true", help="--synthetic at toy size: checks the script runs")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if bool(args.set) == bool(args.synthetic):
        parser.error("give --set or --synthetic")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.synthetic:
            distilled, options, students = prepare_synthetic(work, args)
        else:
            distilled = Path(args.set)
            options = [*(["--data-root", args.data_root] if args.data_root else []), "--repeats", "2"]
            options += ["--baseline", "random-real", "--device", args.device]
            students = 6
        rows = []
        for jobs in args.jobs:
            out = work / f"eval-jobs-{jobs}"
            started = time.perf_counter()
            done = subprocess.run(
                fadrm("evaluate", str(distilled), *options, "--jobs", jobs, "--out", str(out)),
                capture_output=True,
                text=True,
            )
            seconds = time.perf_counter() - started
            if done.returncode:
                sys.exit(f"fadrm evaluate --jobs {jobs} failed:\n{done.stderr[-3000:]}")
            trained = sum("at the last epoch" in line for line in done.stdout.splitlines())
            runs = json.loads((out / "results.json").read_text())["runs"]
            row = {
                "jobs": jobs,
                "students": trained,
                "seconds": round(seconds, 1),
                "students_per_hour": round(3600 * trained / seconds, 1),
                "top1": [round(r["top1"], 2) for r in runs],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            if trained != students:
                sys.exit(f"--jobs {jobs} trained {trained} students, not {students}")
    for row in rows:
        row["speedup"] = round(row["students_per_hour"] / rows[0]["students_per_hour"], 2)
    print(f"{'jobs':>5s} {'students':>8s} {'seconds':>8s} {'per hour':>9s} {'speedup':>7s}")
    for r in rows:
        print(
            f"{r['jobs']:>5s} {r['students']:8d} {r['seconds']:8.1f} {r['students_per_hour']:9.1f} {r['speedup']:7.2f}"
        )
    if args.json:
        import torch

        meta = {
            "torch": torch.__version__,
            "machine": platform.machine(),
            "processor": platform.processor(),
            "device": torch.cuda.get_device_name()
            if args.device.startswith("cuda")
            else f"cpu, {len(os.sched_getaffinity(0))} cores",
            "command": " ".join(["python", *sys.argv]),
            "evaluate_options": options,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
