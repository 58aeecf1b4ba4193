"""Student-training speed against the bare cost of the same maths, side by side.

    python benchmarks/student_speed.py --threads 1 --rounds 5 --json benchmarks/results/cpu-1thread-students.json
    python benchmarks/student_speed.py --device cuda --json benchmarks/results/h100-students.json
    python benchmarks/student_speed.py --configs fashion-mnist --batch-sizes 16 --rounds 5

For each config and loader batch size it times our step, one loader batch of
``fadrm.students.train_student`` as users run it (view draw, rendering, normalising,
live soft labels from the teacher with BSSL, the student's micro-batched forward and
backward at the EvalConfig defaults (2 micro-batches), the KL loss, AdamW's step):
the real function over a set of exactly ``steps`` loader batches for one epoch, its
whole time divided by ``steps``, nothing subtracted (it includes the epoch's
shuffle, learning-rate step and a final validation on 2 images). The floor is the
same maths bare: the teacher's forward on the batch's two halves with batch
statistics (BSSL), then the student's forward and backward on the same micro-batches
(loss: the sum of the logits), on one fixed input already on the device; no views,
labels, loss or optimiser. Every measurement runs in its own process (so peak memory
is its own), floor and ours alternate, and the median of the rounds is reported, in
wall-clock seconds and in the process's CPU seconds (with one thread on a CPU shared
with other work, the steadier measure of the work itself; on CUDA read the wall clock).
Random weights and images: speed does not depend on them.

Configs:
  fashion-mnist  the README demo's shape: convnet-small teacher and student, 28 px grey, 10 classes
  cifar100       CIFAR ResNet-18 (cifar_resnet18) teacher and student, 32 px RGB, 100 classes
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

CONFIGS = {
    "fashion-mnist": {"dataset": "fashion-mnist", "model": "convnet-small", "steps": {16: 100, 128: 20}},
    "cifar100": {"dataset": "cifar100", "model": "cifar_resnet18", "steps": {16: 6, 128: 2}},
}
DEFAULT_STEPS = 4  # for a batch size a config does not list


def worker(
    config_name: str,
    mode: str,
    batch_size: int,
    steps: int,
    warmup: int,
    device: str,
    amp: str,
    lean: dict | None = None,
) -> dict:
    """One measurement in this process: seconds per loader batch and peak memory."""
    import torch

    from fadrm.data.datasets import TrainingSet
    from fadrm.config import EvalConfig
    from fadrm.data import get_dataset_spec
    from fadrm.labels import TeacherLabeller, halves
    from fadrm.models import build_model
    from fadrm.runtime import make_runtime
    from fadrm.students import micro_batches, train_student

    cfg = CONFIGS[config_name]
    spec = get_dataset_spec(cfg["dataset"])
    # ``lean``: the student's views, prefetching and optimiser step (fadrm.runtime.make_runtime's options).
    runtime = make_runtime(device, amp, stage="evaluate", **(lean or {}))
    shape = (spec.channels, spec.image_size, spec.image_size)
    torch.manual_seed(0)
    teacher = build_model(cfg["model"], spec.num_classes, spec.channels, spec.image_size).eval().requires_grad_(False)
    runtime.place(teacher)
    student = build_model(cfg["model"], spec.num_classes, spec.channels, spec.image_size)
    # The demo's learning-rate recipe; every other setting is EvalConfig's default (BSSL on).
    config = EvalConfig(distilled="benchmark", epochs=1, batch_size=batch_size, lr=1e-3, eta=2.0, eval_every=0)
    sync = torch.cuda.synchronize if runtime.device.type == "cuda" else (lambda: None)

    if mode == "floor":
        runtime.place(student).train()
        inputs = runtime.batch(torch.randn(batch_size, *shape))
        parts = micro_batches(batch_size, config.accumulation, batch_size)
        for layer in TeacherLabeller([teacher]).batchnorm_layers:
            layer.train()  # BSSL: each half normalised by its own statistics

        def step() -> None:
            with torch.no_grad(), runtime.autocast():
                for half in halves(inputs):
                    teacher(half)
            for part in parts:
                with runtime.autocast():
                    student(inputs[part]).float().sum().backward()

        for _ in range(warmup):
            step()
        sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            step()
        sync()
    else:
        labeller = TeacherLabeller([teacher], bssl=config.bssl)
        validation = [(torch.rand(2, *shape), torch.zeros(2, dtype=torch.long))]

        def train(batches: int) -> None:
            images = torch.randint(0, 256, (batches * batch_size, *shape), dtype=torch.uint8)
            training_set = TrainingSet("benchmark", images, torch.arange(len(images)) % spec.num_classes)
            train_student(student, training_set, config, spec, runtime, validation, labeller, log=lambda line: None)

        train(warmup)
        sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        train(steps)
        sync()
    seconds, cpu_seconds = (time.perf_counter() - start) / steps, (time.process_time() - start_cpu) / steps
    peak = runtime.peak_memory()
    return {"seconds_per_step": seconds, "cpu_seconds_per_step": cpu_seconds, "peak_bytes": peak}


def measure(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name in args.configs:
        for batch_size in args.batch_sizes:
            steps = args.steps or CONFIGS[name]["steps"].get(batch_size, DEFAULT_STEPS)
            samples: dict[str, list[dict]] = {"floor": [], "fadrm": []}
            for _ in range(args.rounds):
                for mode in ("floor", "fadrm"):
                    cmd = [
                        sys.executable,
                        __file__,
                        "--worker",
                        name,
                        mode,
                        "--batch-sizes",
                        str(batch_size),
                        "--steps",
                        str(steps),
                        "--warmup",
                        str(args.warmup),
                        "--device",
                        args.device,
                        "--amp",
                        args.amp,
                        *(["--threads", str(args.threads)] if args.threads else []),
                        *(["--views", args.views, "--prefetch-views", args.prefetch_views]),
                        *(["--fused-optimizer", args.fused_optimizer]),
                    ]
                    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                    samples[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
                    print(
                        f"{name} {mode}: {samples[mode][-1]}", file=sys.stderr, flush=True
                    )  # partial results survive a timeout
            row = {"config": name, "batch": batch_size, "steps": steps}
            # Wall clock, and the process's CPU time: on an oversubscribed CPU, the work done
            # whatever else runs.
            for clock, key in (("", "seconds_per_step"), ("cpu_", "cpu_seconds_per_step")):
                floor = [s[key] for s in samples["floor"]]
                ours = [s[key] for s in samples["fadrm"]]
                row.update(
                    {
                        f"floor_{clock}s_per_step": statistics.median(floor),
                        f"fadrm_{clock}s_per_step": statistics.median(ours),
                        f"{clock}time_ratio": statistics.median(ours) / statistics.median(floor),
                        f"floor_{clock}samples": floor,
                        f"fadrm_{clock}samples": ours,
                    }
                )
            floor_mem = max(s["peak_bytes"] for s in samples["floor"])
            ours_mem = max(s["peak_bytes"] for s in samples["fadrm"])
            rows.append(
                {
                    **row,
                    "floor_peak_bytes": floor_mem,
                    "fadrm_peak_bytes": ours_mem,
                    "memory_ratio": ours_mem / floor_mem,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[16, 128], help="loader batches (--batch-size)")
    parser.add_argument("--steps", type=int, help="timed loader batches per measurement (default: per config)")
    parser.add_argument("--warmup", type=int, default=1, help="loader batches run before timing")
    parser.add_argument("--rounds", type=int, default=5, help="alternating floor/ours rounds; the median is kept")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", default="off")
    parser.add_argument("--threads", type=int, help="torch threads in each measurement (default: torch's)")
    parser.add_argument("--views", default="auto", help="where our step renders its views: auto, device or host")
    parser.add_argument("--prefetch-views", default="auto", help="auto, on or off")
    parser.add_argument("--fused-optimizer", default="auto", help="auto, on or off")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        lean = {"views": args.views, "prefetch_views": args.prefetch_views, "fused_optimizer": args.fused_optimizer}
        print(
            json.dumps(worker(*args.worker, args.batch_sizes[0], args.steps, args.warmup, args.device, args.amp, lean))
        )
        return
    rows = measure(args)
    gib = 1024**3
    print(
        f"{'config':14s} {'batch':>5s} {'floor s/step':>12s} {'fadrm s/step':>12s} {'ratio':>6s} "
        f"{'floor cpu s':>11s} {'fadrm cpu s':>11s} {'ratio':>6s} {'floor GiB':>9s} {'fadrm GiB':>9s}"
    )
    for r in rows:
        print(
            f"{r['config']:14s} {r['batch']:5d} {r['floor_s_per_step']:12.4f} {r['fadrm_s_per_step']:12.4f} "
            f"{r['time_ratio']:6.3f} {r['floor_cpu_s_per_step']:11.4f} {r['fadrm_cpu_s_per_step']:11.4f} "
            f"{r['cpu_time_ratio']:6.3f} {r['floor_peak_bytes'] / gib:9.2f} "
            f"{r['fadrm_peak_bytes'] / gib:9.2f}"
        )
    if args.json:
        import torch

        from fadrm.io import write_json

        meta = {
            "device": args.device,
            "amp": args.amp,
            "threads": args.threads or torch.get_num_threads(),
            "warmup": args.warmup,
            "rounds": args.rounds,
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            "command": " ".join(sys.argv),
        }
        if args.device.startswith("cuda"):
            meta["gpu"] = torch.cuda.get_device_name()
        write_json(args.json, {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
