"""Host cost of one synthesis iteration, or one student step, counted exactly: operators dispatched and
scalars read back.

    python benchmarks/host_cost.py --json benchmarks/results/host-cost.json   # the committed figures
    python benchmarks/host_cost.py --dry-run                                  # toy shapes, seconds (CI)
    OMP_NUM_THREADS=1 python benchmarks/host_cost.py --students --json benchmarks/results/host-cost-students.json

``--students``: per loader batch, our ``train_student`` step against its floor (count_student), on the CPU
code path, with two predictions for CUDA from exact counts: the default (the batch's crops rendered on the
GPU at once, ``augment.upsampled_crops``, counted on one batch in place of the CPU's crop by crop) and
``--views host`` (the crops are CPU work, then one copy).

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


# Student configs: (dataset, student and teacher architecture); counted at the loader batches below.
STUDENT_CONFIGS = {"fashion-mnist": ("fashion-mnist", "convnet-small"), "cifar100": ("cifar100", "cifar_resnet18")}
STUDENT_BATCHES = (16, 128)


def count_student(dataset: str, model: str, batch: int, runtime: Runtime) -> dict:
    """Per loader batch: our ``train_student`` step (views, rendering, live BSSL labels, two micro-batches, KL
    loss, AdamW) against its floor (the teacher's forward on the two BSSL halves, the student's forward and
    backward on the same micro-batches, one fused AdamW step), both counted the same way. Ours = (an epoch
    of 2n batches - an epoch of n) / n, so the per-epoch work (shuffle, schedule, loss read) is left out."""
    from fadrm.config import EvalConfig
    from fadrm.data import get_dataset_spec
    from fadrm.data.datasets import TrainingSet
    from fadrm.labels import TeacherLabeller, halves
    from fadrm.students import micro_batches, train_student, weight_decay_groups

    spec = get_dataset_spec(dataset)
    shape = (spec.channels, spec.image_size, spec.image_size)
    torch.manual_seed(0)
    teacher = runtime.place(
        build_model(model, spec.num_classes, *shape[:1], spec.image_size).eval().requires_grad_(False)
    )
    config = EvalConfig(distilled="count", epochs=1, batch_size=batch, lr=1e-3, eta=2.0, eval_every=0)
    labeller = TeacherLabeller([teacher], bssl=config.bssl)
    validation = [(torch.rand(2, *shape), torch.zeros(2, dtype=torch.long))]

    def ours(batches: int) -> HostCost:
        student = build_model(model, spec.num_classes, spec.channels, spec.image_size)
        images = torch.randint(0, 256, (batches * batch, *shape), dtype=torch.uint8)
        training = TrainingSet("count", images, torch.arange(len(images)) % spec.num_classes)
        with CountHostCost() as counted:
            train_student(student, training, config, spec, runtime, validation, labeller, log=lambda line: None)
        return counted.cost

    per_batch = (ours(4) - ours(2)).scaled(1 / 2)
    student = runtime.place(build_model(model, spec.num_classes, spec.channels, spec.image_size)).train()
    optimizer = torch.optim.AdamW(weight_decay_groups(student, config.weight_decay), lr=1e-3, fused=True)
    inputs = runtime.batch(torch.randn(batch, *shape))
    for layer in labeller.batchnorm_layers:
        layer.train()
    with CountHostCost() as floor:
        with torch.no_grad():
            for half in halves(inputs):
                teacher(half)
        for part in micro_batches(batch, config.accumulation, batch):
            student(inputs[part]).float().sum().backward()
        optimizer.step()
    # The CUDA path renders a batch's crops at once (augment.upsampled_crops) where the CPU resizes them one by
    # one: counted both ways on one batch's views, the difference predicts our step's count on CUDA.
    from fadrm.augment import ViewSampler, mixed_batch, render, upsampled_crops

    images = torch.randint(0, 256, (batch, *shape), dtype=torch.uint8)
    view = ViewSampler.from_config(config, spec.image_size).view(0, 0, torch.arange(batch), *shape[1:])
    with CountHostCost() as one_by_one:
        render(images, view, spec.image_size, "cpu")
    with CountHostCost() as at_once:
        mixed_batch(upsampled_crops(images[view.indices], view.boxes, view.flips, spec.image_size), view)
    cuda_path = per_batch.total - one_by_one.cost.total + at_once.cost.total
    # --views host on CUDA: the crops are CPU work (no launch), then one pinned copy (pin_memory, _to_copy).
    host_views = per_batch.total - one_by_one.cost.total + 2
    return {
        "config": dataset,
        "model": model,
        "batch": batch,
        "floor_ops": floor.cost.total,
        "ops": per_batch.total,
        "ratio": round(per_batch.total / floor.cost.total, 3),
        "scalar_reads": per_batch.scalar_reads,
        "cuda_render_ops": at_once.cost.total,
        "cpu_render_ops": one_by_one.cost.total,
        "predicted_cuda_ops": cuda_path,
        "predicted_cuda_ratio": round(cuda_path / floor.cost.total, 3),
        "predicted_cuda_host_views_ops": host_views,
        "predicted_cuda_host_views_ratio": round(host_views / floor.cost.total, 3),
        "top_ops": dict(per_batch.ops.most_common(12)),
    }


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
    parser.add_argument(
        "--students", action="store_true", help="count a student's training step against its floor instead"
    )
    args = parser.parse_args()
    if args.students:
        main_students(args)
        return
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


def main_students(args: argparse.Namespace) -> None:
    """``--students``: per loader batch, our step's operators and scalar reads against its floor."""
    torch.set_num_threads(1)
    configs = {"fashion-mnist": STUDENT_CONFIGS["fashion-mnist"]} if args.dry_run else STUDENT_CONFIGS
    rows = []
    for dataset, model in configs.values():
        for batch in (16,) if args.dry_run else STUDENT_BATCHES:
            row = count_student(dataset, model, batch, make_runtime(args.device, args.amp, stage="evaluate"))
            print(json.dumps({k: v for k, v in row.items() if k != "top_ops"}), file=sys.stderr, flush=True)
            rows.append(row)
    print(
        f"{'config':14s} {'batch':>5s} {'floor':>6s} {'ours':>6s} {'ratio':>6s} {'reads':>5s} "
        f"{'CUDA path':>9s} {'ratio':>6s} {'host views':>10s} {'ratio':>6s}"
    )
    for r in rows:
        print(
            f"{r['config']:14s} {r['batch']:5d} {r['floor_ops']:6.0f} {r['ops']:6.0f} {r['ratio']:6.2f} "
            f"{r['scalar_reads']:5.1f} {r['predicted_cuda_ops']:9.0f} {r['predicted_cuda_ratio']:6.2f} "
            f"{r['predicted_cuda_host_views_ops']:10.0f} {r['predicted_cuda_host_views_ratio']:6.2f}"
        )
    if args.json:
        meta = {
            "torch": torch.__version__,
            "device": args.device,
            "amp": args.amp,
            "command": " ".join(["python", *sys.argv]),
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
