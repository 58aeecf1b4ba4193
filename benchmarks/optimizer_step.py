"""A student's optimiser step by each of torch's implementations, side by side: time and host cost.

    OMP_NUM_THREADS=1 python benchmarks/optimizer_step.py --json benchmarks/results/cpu-1thread-optimizer-step.json
    python benchmarks/optimizer_step.py --device cuda --json OUT.json        # on a GPU

AdamW over the student's weight-decay groups (``fadrm.students.weight_decay_groups``) with random
gradients, as ``--fused-optimizer`` chooses it: torch's per-parameter loop (the CPU's default before
fused), its multi-tensor ``foreach`` step (CUDA's default) and its ``fused`` kernels. Per step: the
median time over ``--steps`` steps after one warm-up step, the operators dispatched and the scalar
reads (``fadrm.hostcost``). Models: the demo's ``convnet-small`` (Fashion-MNIST) and the CIFAR
ResNet-18 (CIFAR-100).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from fadrm.hostcost import CountHostCost
from fadrm.models import build_model
from fadrm.students import weight_decay_groups

MODELS = {"convnet-small": (10, 1, 28), "cifar_resnet18": (100, 3, 32)}
IMPLEMENTATIONS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def measure(model_name: str, implementation: str, device: str, steps: int) -> dict:
    """One model and implementation: median seconds per step, operators and scalar reads of one step."""
    torch.manual_seed(0)
    model = build_model(model_name, *MODELS[model_name]).to(device)
    optimizer = torch.optim.AdamW(weight_decay_groups(model, 0.01), lr=1e-3, **IMPLEMENTATIONS[implementation])
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    optimizer.step()
    with CountHostCost() as counted:
        optimizer.step()
    seconds = []
    for _ in range(steps):
        sync()
        started = time.perf_counter()
        optimizer.step()
        sync()
        seconds.append(time.perf_counter() - started)
    return {
        "model": model_name,
        "implementation": implementation,
        "seconds_per_step": statistics.median(seconds),
        "ops": counted.cost.total,
        "scalar_reads": counted.cost.scalar_reads,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    rows = [measure(m, i, args.device, args.steps) for m in MODELS for i in IMPLEMENTATIONS]
    print(f"{'model':15s} {'implementation':14s} {'ms/step':>8s} {'ops':>5s} {'reads':>5s}")
    for r in rows:
        print(
            f"{r['model']:15s} {r['implementation']:14s} {1000 * r['seconds_per_step']:8.2f} {r['ops']:5.0f} "
            f"{r['scalar_reads']:5.0f}"
        )
    if args.json:
        meta = {
            "torch": torch.__version__,
            "machine": platform.machine(),
            "device": args.device,
            "threads": torch.get_num_threads(),
            "command": " ".join(["python", *sys.argv]),
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
