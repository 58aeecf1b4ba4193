"""Host cost of one synthesis iteration, counted exactly: operators dispatched and scalars read back.

    python benchmarks/host_cost.py --json benchmarks/results/host-cost.json   # the committed figures
    python benchmarks/host_cost.py --dry-run                                  # toy shapes, seconds (CI)

On a GPU every operator is at least one kernel launch issued by the host, and every scalar read
waits for the device; when they dominate, the GPU idles (the "host-bound" synthesis of 0.3.0).
Both are counted with a dispatch mode (:mod:`fadrm.hostcost`) on the CPU code path, so the
figures are exact on any machine. Per iteration = (count at budget 2n - count at budget n) / n
per stage, so per-stage work (setup, ARC, the once-per-stage loss read) is left out.

For each config and method: our recover loop with the default per-layer statistics and with
``--fused-statistics``, beside the bare teacher's forward + backward (CE loss, same batch and
sizes, counted the same way) and, where ``../shared/bench/reference_recover.py`` is present, the
public reference's loop (FADRM only). Random weights; the counts do not depend on them.

Configs: cifar100 (CIFAR ResNet-18, batch 100 = 100 classes x 1, 32 px) and imagenet (ResNet-18,
batch 100 = 100 classes x 1, stages 200/224), each method with its own defaults (not a dataset's
preset). G-VBSM and EDC take class-major groups of 10 classes x 10 images and synthetic
statistics targets of the right shapes; FADRM+ runs four
ResNet-18s round robin (counted over a multiple of four iterations); CV-DD a committee of two.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from method_cases import DRY_SHAPES, METHOD_SETUPS, SHAPES, Shape, count_recover

from fadrm.hostcost import CountHostCost, HostCost
from fadrm.models import build_model
from fadrm.runtime import Runtime, make_runtime

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "bench" / "reference_recover.py"


def count_bare(shape: Shape, num_teachers: int, runtime: Runtime) -> HostCost:
    """The bare teachers' forward + backward (CE loss), per iteration, over the same sizes and schedule."""
    torch.manual_seed(0)
    teachers = [
        runtime.place(
            build_model(shape.model, shape.classes, shape.channels, shape.sizes[-1]).eval().requires_grad_(False)
        )
        for _ in range(num_teachers)
    ]
    labels = torch.arange(shape.batch) % shape.classes
    total = HostCost()
    iterations = 0
    for size in shape.sizes:
        x = runtime.batch(torch.randn(shape.batch, shape.channels, size, size)).requires_grad_(True)
        labels = labels.to(runtime.device)
        for teacher in teachers:
            with CountHostCost() as counted:
                with runtime.autocast():
                    loss = F.cross_entropy(teacher(x).float(), labels)
                torch.autograd.grad(loss, x)
            total = total + counted.cost
            iterations += 1
    return total.scaled(1 / iterations)


def count_reference(shape: Shape) -> HostCost | None:
    """The public reference loop's host cost per iteration (``../shared/bench``), or None without it."""
    if shape.reference is None or not REFERENCE.exists():
        return None
    spec = importlib.util.spec_from_file_location("reference_recover", REFERENCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.CONFIGS[shape.reference]
    torch.manual_seed(0)
    model = build_model(cfg["model"], cfg["classes"], 3, cfg["sizes"][-1]).eval().requires_grad_(False)
    hooks = [module.BNFeatureHook(m) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    targets = torch.arange(cfg["batch"]) % cfg["classes"]
    patch = torch.randn(cfg["batch"], 3, cfg["sizes"][-1], cfg["sizes"][-1])
    stages = len(cfg["sizes"])

    def run(budget: int) -> HostCost:
        with CountHostCost() as counted:
            module.reference_loop(
                patch.clone().requires_grad_(True),
                patch,
                targets,
                model,
                hooks,
                cfg,
                [budget] * stages,
                torch.device("cpu"),
            )
        return counted.cost

    # Iterations 2 and 3 of a stage; the reference also reads its loss at every 100th iteration
    # (its progress print), which adds 0.01 reads per iteration to what this counts.
    per_iteration = (run(3) - run(2)).scaled(1 / stages)
    per_iteration.scalar_reads += 0.01
    return per_iteration


def measure(
    shapes: dict[str, Shape], methods: list[str], device: str, amp: str, log: Callable[[str], None]
) -> list[dict]:
    """One row per (shape, method): per-iteration ops and scalar reads, default and fused, beside bare."""
    rows = []
    for name, shape in shapes.items():
        bare_by_teachers: dict[int, HostCost] = {}
        for method in methods:
            num_teachers = METHOD_SETUPS[method][0]
            if num_teachers not in bare_by_teachers:
                # A committee runs every member each iteration; round robin one teacher per iteration.
                committee = METHOD_SETUPS[method][1] is not None
                bare = count_bare(shape, num_teachers, make_runtime(device, amp))
                bare_by_teachers[num_teachers] = bare.scaled(num_teachers) if committee else bare
            bare = bare_by_teachers[num_teachers]
            row = {
                "config": name,
                "method": method,
                "teachers": num_teachers,
                "batch": shape.batch,
                "sizes": list(shape.sizes),
                "bare_ops": bare.total,
            }
            for mode, fused in (("default", False), ("fused", True)):
                cost = count_recover(shape, method, make_runtime(device, amp, fused_statistics=fused))
                row[f"{mode}_ops"] = cost.total
                row[f"{mode}_scalar_reads"] = cost.scalar_reads
                row[f"{mode}_ratio"] = round(cost.total / bare.total, 3)
            if method == "fadrm" and device == "cpu" and amp == "off":  # the reference loop runs in fp32
                reference = count_reference(shape)
                if reference is not None:
                    row["reference_ops"] = reference.total
                    row["reference_scalar_reads"] = round(reference.scalar_reads, 3)
                    row["reference_ratio"] = round(reference.total / bare.total, 3)
            log(json.dumps(row))
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument(
        "--methods", nargs="+", choices=list(METHOD_SETUPS), default=[m for m in METHOD_SETUPS if m != "sre2l++"]
    )
    parser.add_argument("--device", default="cpu", help="count this device's code path (cuda: on a GPU)")
    parser.add_argument("--amp", default="off", help="precision (the CPU path: off)")
    parser.add_argument("--dry-run", action="store_true", help="toy shapes only (seconds): checks the script runs")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # counts do not depend on threads; one keeps the run quiet beside others
    shapes = DRY_SHAPES if args.dry_run else {name: SHAPES[name] for name in args.configs}
    rows = measure(shapes, args.methods, args.device, args.amp, lambda line: print(line, file=sys.stderr, flush=True))
    print(
        f"{'config':9s} {'method':8s} {'bare':>6s} {'default':>8s} {'ratio':>6s} {'reads':>5s} "
        f"{'fused':>6s} {'ratio':>6s} {'reads':>5s} {'reference':>9s}"
    )
    for r in rows:
        ref = f"{r['reference_ops']:9.0f}" if "reference_ops" in r else f"{'-':>9s}"
        print(
            f"{r['config']:9s} {r['method']:8s} {r['bare_ops']:6.0f} {r['default_ops']:8.0f} "
            f"{r['default_ratio']:6.2f} {r['default_scalar_reads']:5.1f} {r['fused_ops']:6.0f} "
            f"{r['fused_ratio']:6.2f} {r['fused_scalar_reads']:5.1f} {ref}"
        )
    if args.json:
        meta = {
            "torch": torch.__version__,
            "machine": platform.machine(),
            "device": args.device,
            "amp": args.amp,
            "command": " ".join(["python", *sys.argv]),
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
