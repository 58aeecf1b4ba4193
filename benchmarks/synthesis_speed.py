"""Synthesis speed and memory against the bare teacher cost, side by side.

    python benchmarks/synthesis_speed.py                 # all three configs, CPU fp32
    python benchmarks/synthesis_speed.py --device cuda --amp bf16 --json benchmarks/results/h100.json
    python benchmarks/synthesis_speed.py --configs cifar100 --rounds 1 --profile   # where the time goes
    python benchmarks/synthesis_speed.py --configs cifar100 --compile              # torch.compile'd teachers

For each config it times our recover loop (augmentation, BN-statistics hooks,
Adam, clamp: one full iteration) and the floor for the same maths: the frozen
eval-mode teacher's forward + backward with respect to the input at the same
batch and size, CE loss only. Every measurement runs in its own process (so
peak memory is its own), bare and ours alternate, and the median of the rounds
is reported. Random weights: speed does not depend on them.

Configs:
  cifar100     CIFAR-style ResNet-18, 100 classes per group, 32 px, one FADRM stage
  cifar100-4t  the same with four teachers round-robin (FADRM+)
  imagenet     torchvision ResNet-18, 10 classes per group, stages 200/224
  imagenet-b100  the same, 100 classes per group (the reference's batch; not run by default)
  fashion-mnist  (not run by default) the demo's ConvNet-w32, 10 groups of 10, stages 24/28
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

CONFIGS = {
    "cifar100": {"teachers": ["cifar_resnet18"], "classes": 100, "group": 100, "sizes": [32]},
    "cifar100-4t": {
        "teachers": ["cifar_resnet18", "densenet121", "shufflenet_v2_x1_0", "mobilenet_v2"],
        "classes": 100,
        "group": 100,
        "sizes": [32],
    },
    "imagenet": {"teachers": ["resnet18"], "classes": 1000, "group": 10, "sizes": [200, 224]},
    # The reference's ImageNet batch: 100 classes at one IPC index (issue 25's second shape).
    "imagenet-b100": {"teachers": ["resnet18"], "classes": 1000, "group": 100, "sizes": [200, 224]},
    # The README demo's shape: ten one-image-per-class groups of the CPU teacher in one pass.
    "fashion-mnist": {
        "teachers": ["convnet-small"],
        "classes": 10,
        "group": 10,
        "sizes": [24, 28],
        "channels": 1,
        "groups": 10,
    },
}
DEFAULT_CONFIGS = ["cifar100", "cifar100-4t", "imagenet"]
PAPER_BUDGET = 2000


def worker(
    config_name: str,
    mode: str,
    iters: int,
    warmup: int,
    device: str,
    amp: str,
    groups: int | None,
    memory_format: str,
    compile: bool = False,
    profile: bool = False,
    fused_statistics: bool = False,
) -> dict:
    """One measurement in this process: seconds per iteration and peak memory.

    With ``compile`` both modes run ``torch.compile``'d teachers (compilation
    falls in the warm-up); with ``profile`` the timed iterations run under the
    PyTorch profiler and its table of the most expensive operators goes to stderr.
    """
    import contextlib

    import torch
    import torch.nn.functional as F

    from fadrm.models import build_model
    from fadrm.runtime import make_runtime
    from fadrm.seeding import make_generator
    from fadrm.config import SynthesisConfig
    from fadrm.synthesis.recover import recover

    cfg = CONFIGS[config_name]
    groups = groups or cfg.get("groups", 1)
    channels = cfg.get("channels", 3)
    runtime = make_runtime(
        device,
        amp,
        channels_last=None if memory_format == "auto" else memory_format == "channels-last",
        compile=compile,
        fused_statistics=fused_statistics,
    )
    torch.manual_seed(0)
    size = cfg["sizes"][-1]
    teachers = []
    for name in cfg["teachers"]:
        model = build_model(name, cfg["classes"], channels, size).eval().requires_grad_(False)
        teachers.append(runtime.place(model, compile=True))
    batch = cfg["group"] * groups
    labels = (torch.arange(batch) % cfg["classes"]).to(runtime.device)
    sync = torch.cuda.synchronize if runtime.device.type == "cuda" else (lambda: None)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if runtime.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)

    @contextlib.contextmanager
    def timed() -> Iterator[None]:
        """Profile (when asked) what runs inside; print the operator table to stderr."""
        if not profile:
            yield
            return
        with torch.profiler.profile(activities=activities) as prof:
            yield
        sort = "self_cuda_time_total" if runtime.device.type == "cuda" else "self_cpu_time_total"
        print(
            f"== {config_name} {mode} ({iters} iterations)\n" + prof.key_averages().table(sort_by=sort, row_limit=15),
            file=sys.stderr,
        )

    if mode == "bare":
        per_size = []
        for s in cfg["sizes"]:
            x = torch.randn(batch, channels, s, s, device=runtime.device, requires_grad=True)
            if runtime.channels_last:
                x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)

            def step(t: int) -> None:
                with runtime.autocast():
                    loss = F.cross_entropy(teachers[t % len(teachers)](x).float(), labels)
                torch.autograd.grad(loss, x)

            for t in range(warmup):
                step(t)
            sync()
            with timed():
                start = time.perf_counter()
                for t in range(iters):
                    step(t)
                sync()
                per_size.append((time.perf_counter() - start) / iters)
        seconds = statistics.mean(per_size)
    else:
        init = torch.rand(batch, channels, size, size)
        bounds = (torch.full((1, channels, 1, 1), -3.0), torch.full((1, channels, 1, 1), 3.0))

        def settings(n: int) -> SynthesisConfig:
            return SynthesisConfig(sizes=list(cfg["sizes"]), budgets=[n] * len(cfg["sizes"]), jitter=4)

        def generators() -> list:
            return [make_generator(0, "bench", g) for g in range(groups)]

        recover(init, labels.cpu(), teachers, generators(), settings(warmup), runtime, bounds)
        sync()
        with timed():
            start = time.perf_counter()
            recover(init, labels.cpu(), teachers, generators(), settings(iters), runtime, bounds)
            sync()
            seconds = (time.perf_counter() - start) / (iters * len(cfg["sizes"]))
    peak = runtime.peak_memory()
    return {"seconds_per_iter": seconds, "peak_bytes": peak, "batch": batch}


def measure(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name in args.configs:
        samples: dict[str, list[dict]] = {"bare": [], "fadrm": []}
        for _ in range(args.rounds):
            for mode in ("bare", "fadrm"):
                cmd = [
                    sys.executable,
                    __file__,
                    "--worker",
                    name,
                    mode,
                    "--iters",
                    str(args.iters),
                    "--warmup",
                    str(args.warmup),
                    "--device",
                    args.device,
                    "--amp",
                    args.amp,
                    "--memory-format",
                    args.memory_format,
                    *(["--groups", str(args.groups)] if args.groups else []),
                    *(["--compile"] if args.compile else []),
                    *(["--profile"] if args.profile else []),
                    *(["--fused-statistics"] if args.fused_statistics else []),
                ]
                done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                if args.profile:
                    print(done.stderr)
                samples[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(
                    f"{name} {mode}: {samples[mode][-1]}", file=sys.stderr, flush=True
                )  # partial results survive a timeout
        bare = statistics.median(s["seconds_per_iter"] for s in samples["bare"])
        ours = statistics.median(s["seconds_per_iter"] for s in samples["fadrm"])
        bare_mem = max(s["peak_bytes"] for s in samples["bare"])
        ours_mem = max(s["peak_bytes"] for s in samples["fadrm"])
        batch = samples["fadrm"][0]["batch"]
        rows.append(
            {
                "config": name,
                "batch": batch,
                "bare_s_per_iter": bare,
                "fadrm_s_per_iter": ours,
                "time_ratio": ours / bare,
                "s_per_image_at_2000_iters": ours * PAPER_BUDGET / batch,
                "bare_peak_bytes": bare_mem,
                "fadrm_peak_bytes": ours_mem,
                "memory_ratio": ours_mem / bare_mem,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=list(CONFIGS))
    parser.add_argument("--iters", type=int, default=5, help="timed iterations per measurement (per stage)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="alternating bare/ours rounds; the median is kept")
    parser.add_argument("--groups", type=int, help="groups optimised in one forward pass (default: the config's, 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", default="off")
    parser.add_argument(
        "--memory-format",
        default="auto",
        choices=["auto", "channels-last", "contiguous"],
        help="auto: channels-last on CPU (the library's default)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the teachers (compiled in the warm-up)")
    parser.add_argument("--profile", action="store_true", help="print each measurement's profiler table")
    parser.add_argument("--fused-statistics", action="store_true", help="our loop with the fused statistics loss")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(
            json.dumps(
                worker(
                    *args.worker,
                    args.iters,
                    args.warmup,
                    args.device,
                    args.amp,
                    args.groups,
                    args.memory_format,
                    args.compile,
                    args.profile,
                    args.fused_statistics,
                )
            )
        )
        return
    rows = measure(args)
    gib = 1024**3
    print(
        f"{'config':12s} {'batch':>5s} {'bare s/it':>10s} {'fadrm s/it':>11s} {'ratio':>6s} "
        f"{'s/img@2000':>10s} {'bare GiB':>9s} {'fadrm GiB':>10s} {'mem ratio':>9s}"
    )
    for r in rows:
        print(
            f"{r['config']:12s} {r['batch']:5d} {r['bare_s_per_iter']:10.4f} {r['fadrm_s_per_iter']:11.4f} "
            f"{r['time_ratio']:6.3f} {r['s_per_image_at_2000_iters']:10.3f} {r['bare_peak_bytes'] / gib:9.2f} "
            f"{r['fadrm_peak_bytes'] / gib:10.2f} {r['memory_ratio']:9.3f}"
        )
    if args.json:
        import torch

        meta = {
            "device": args.device,
            "amp": args.amp,
            "groups": args.groups,
            "memory_format": args.memory_format,
            "compile": args.compile,
            "fused_statistics": args.fused_statistics,
            "iters": args.iters,
            "rounds": args.rounds,
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            "command": " ".join(sys.argv),
        }
        if args.device.startswith("cuda"):
            meta["gpu"] = torch.cuda.get_device_name()
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
