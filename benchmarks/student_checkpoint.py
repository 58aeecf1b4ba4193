"""What the per-epoch student checkpoint costs against the student's epoch, on the demo's shape.

    python benchmarks/student_checkpoint.py            # Fashion-MNIST shape, IPC 10, convnet-small
    python benchmarks/student_checkpoint.py --epochs 60 --threads 2

One student (``convnet-small``, 22k parameters) trains on 100 random 28 px images (the
size of an IPC-10 set) under the default protocol (loader batches of 16 in two
micro-batches, CutMix, live labels from a random ``convnet-small`` teacher, no
validation), once with a checkpoint after every epoch and once without, alternating;
the median epoch of each and the median time of one save are reported. Random
weights and pixels: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from fadrm.artifacts import StudentCheckpoint
from fadrm.data.datasets import TrainingSet
from fadrm.config import EvalConfig
from fadrm.data import get_dataset_spec
from fadrm.labels import TeacherLabeller
from fadrm.models import build_model
from fadrm.runtime import make_runtime

students = importlib.import_module("fadrm.students")


def epoch_seconds(config: EvalConfig, checkpoint: StudentCheckpoint | None) -> list[float]:
    """Seconds of each epoch of one student but the first: a clock at each epoch's validation, so each
    interval holds one epoch and, with a checkpoint, one save."""
    spec = get_dataset_spec("fashion-mnist")
    runtime = make_runtime("cpu", "off")
    generator = torch.Generator().manual_seed(0)
    train = TrainingSet(
        "distilled",
        torch.randint(0, 256, (100, 1, 28, 28), generator=generator, dtype=torch.uint8),
        torch.arange(100) % 10,
    )
    torch.manual_seed(0)
    teacher = build_model("convnet-small", 10, 1, 28).eval().requires_grad_(False)
    stamps: list[float] = []

    def validation(*args: object, **kwargs: object) -> dict[str, float]:  # called after every epoch: a clock
        stamps.append(time.perf_counter())
        return {"top1": 0.0, "top5": 0.0, "loss": 0.0}

    students.evaluate_accuracy = validation
    started = time.perf_counter()
    students.train_student(
        build_model("convnet-small", 10, 1, 28),
        train,
        config,
        spec,
        runtime,
        None,
        TeacherLabeller([runtime.place(teacher)]),
        log=lambda line: None,
        checkpoint=checkpoint,
    )
    return [b - a for a, b in zip([started, *stamps], stamps)][1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = replace(EvalConfig(distilled="-", epochs=args.epochs, eval_every=1), lr=1e-3, eta=2.0)
    folder = Path(tempfile.mkdtemp())
    epochs: dict[str, list[float]] = {"without": [], "with": []}
    for round_ in range(args.rounds):
        epochs["without"] += epoch_seconds(config, None)
        checkpoint = StudentCheckpoint(folder / f"{round_}.partial.pt", {"round": round_})
        epochs["with"] += epoch_seconds(config, checkpoint)
    saves = []
    state = torch.load(folder / "0.partial.pt", weights_only=True)
    for _ in range(50):
        started = time.perf_counter()
        StudentCheckpoint(folder / "save.partial.pt", state["identity"]).save(
            state["epoch"],
            state["history"],
            state["seconds"],
            {k: state[k] for k in ("model", "optimizer", "scheduler", "random")},
        )
        saves.append(time.perf_counter() - started)
    without, with_ = statistics.median(epochs["without"]), statistics.median(epochs["with"])
    save = statistics.median(saves)
    print(
        f"{args.threads} threads: epoch {without * 1e3:.1f} ms without a checkpoint, {with_ * 1e3:.1f} ms with; "
        f"one save {save * 1e3:.2f} ms ({(folder / 'save.partial.pt').stat().st_size} bytes), "
        f"{100 * save / without:.1f}% of an epoch"
    )


if __name__ == "__main__":
    main()
