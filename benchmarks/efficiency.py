"""The paper's efficiency table on this machine: seconds per image at 2000 iterations and peak memory.

    python benchmarks/efficiency.py --device cuda --json benchmarks/results/h100-efficiency.json
    python benchmarks/efficiency.py --dry-run          # toy shape on the CPU, seconds (CI)

The paper's setting (its efficiency table, on an RTX 4090): ImageNet-1k, ResNet-18, 100 images
per batch, stages of 200/224/200/224 pixels for FADRM and FADRM+ (the single-stage methods run
their one 224 px stage), 2000 iterations; FADRM 0.47 s per image with 2.9 GB peak, SRe2L++ 2.52 s,
EDC 4.99 s, CV-DD 8.20 s, G-VBSM 17.28 s. Each method runs in its own process (so its peak is its
own) with the ImageNet-1k preset's settings for it (stages, EMA, term drop, crops, jitter) and
its precision (SRe2L++, G-VBSM, EDC and CV-DD full precision as published; FADRM and FADRM+
``--amp``, fp16 by default on CUDA as the reference), at 100 images per batch (G-VBSM and EDC:
10 classes x 10 images), s/image = s/iteration x 2000 / 100, with the default statistics path and
with ``--fused-statistics``; beside them the bare teacher's forward +
backward and, when ``../shared/bench/reference_recover.py`` is present, the public
reference's own loop at the same shape (``imagenet-paper``).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from method_cases import DRY_SHAPES, Shape

PAPER_ITERATIONS = 2000
PAPER_SHAPE = Shape("resnet18", 1000, 100, (200, 224, 200, 224))
TABLE_METHODS = ["fadrm", "fadrm+", "sre2l++", "g-vbsm", "edc", "cv-dd"]
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "bench" / "reference_recover.py"


def worker(method: str, device: str, amp: str, fused: bool, iters: int, warmup: int, dry: bool) -> dict:
    """Time ``method`` in this process: seconds per iteration over ``iters`` per stage, and peak memory."""
    import torch
    from method_cases import build_case, preset_settings

    from fadrm.runtime import make_runtime

    shape = DRY_SHAPES["toy"] if dry else PAPER_SHAPE
    settings, preset_amp = preset_settings("fashion-mnist" if dry else "imagenet-1k", method)
    runtime = make_runtime(device, amp if preset_amp == "auto" else preset_amp, fused_statistics=fused)
    case = build_case(shape, method, runtime, settings)
    sync = torch.cuda.synchronize if runtime.device.type == "cuda" else (lambda: None)
    case.run(runtime, max(warmup, case.period))
    sync()
    if runtime.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    iters = -(-iters // case.period) * case.period
    started = time.perf_counter()
    case.run(runtime, iters)
    sync()
    seconds = (time.perf_counter() - started) / (iters * len(case.settings.sizes))
    return {
        "method": method,
        "fused_statistics": fused,
        "amp": runtime.amp,
        "batch": shape.batch,
        "sizes": case.settings.sizes,
        "seconds_per_iter": seconds,
        "s_per_image_at_2000_iters": seconds * PAPER_ITERATIONS / shape.batch,
        "peak_bytes": runtime.peak_memory(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", default="auto", help="precision of the methods without their own (auto: fp16 on CUDA)")
    parser.add_argument("--methods", nargs="+", default=TABLE_METHODS)
    parser.add_argument("--iters", type=int, default=8, help="timed iterations per stage")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dry-run", action="store_true", help="toy shape on the CPU: checks the script runs")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "FUSED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, fused = args.worker[0], args.worker[1] == "1"
        print(json.dumps(worker(method, args.device, args.amp, fused, args.iters, args.warmup, args.dry_run)))
        return
    rows = []
    for method in args.methods:
        for fused in (False, True):
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                method,
                str(int(fused)),
                "--device",
                args.device,
                "--amp",
                args.amp,
                "--iters",
                str(args.iters),
                "--warmup",
                str(args.warmup),
                *(["--dry-run"] if args.dry_run else []),
            ]
            rows.append(
                json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # partial results survive a timeout
    if REFERENCE.exists() and not args.dry_run:
        cmd = [
            sys.executable,
            str(REFERENCE),
            "imagenet-paper",
            "--device",
            args.device,
            "--iters",
            str(args.iters),
            "--warmup",
            str(args.warmup),
        ]
        reference = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        rows.append({"method": "reference FADRM loop", **reference})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"{'method':22s} {'fused':>5s} {'amp':>4s} {'s/iter':>8s} {'s/img@2000':>10s} {'peak GiB':>8s}")
    for r in rows:
        print(
            f"{r['method']:22s} {str(r.get('fused_statistics', '-')):>5s} {str(r.get('amp', 'fp16')):>4s} "
            f"{r['seconds_per_iter']:8.4f} {r['s_per_image_at_2000_iters']:10.3f} {r['peak_bytes'] / 2**30:8.2f}"
        )
    if args.json:
        import torch

        meta = {
            "device": args.device,
            "torch": torch.__version__,
            "machine": platform.machine(),
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
            "command": " ".join(["python", *sys.argv]),
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
