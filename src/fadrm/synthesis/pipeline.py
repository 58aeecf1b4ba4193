"""``distill()``: patch selection and synthesis from raw data to an ImageFolder of distilled images.

Output folder::

    DIR/config.yaml                 the resolved config
    DIR/run.json                    what defines the run (refuses a resume into a different one)
    DIR/init/<class>/<ipc>.png      the selected real patches (P0; RDED's output)
    DIR/images/<class>/<ipc>.png    the distilled images (ImageFolder layout)
    DIR/state/                      one record per finished work unit (resume, sharding)
    DIR/manifest.json               written when every unit is done

Every file appears under its final name only when complete, and a unit's
record is written after its images, so an interrupted run resumes by redoing
only the units without a record.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from ..artifacts import read_priors
from ..distilled import DistilledSet, Layout, open_distilled_folder, write_manifest
from ..config import DEFAULT_BATCH_IMAGES, DistillConfig, validate
from ..data import DatasetSpec, data_folder, get_dataset_spec, load_split, normalize
from ..data.digest import data_digest
from ..data.transforms import denormalize
from ..distributed import Ranks, init_ranks
from ..errors import FadrmError
from ..io import atomic_path, default_cache, read_json, save_png, write_json
from ..locks import lock_or_nothing
from ..ownership import refuse_data_folder
from .statistics import distill_statistics_config, teacher_statistics
from ..runtime import Runtime, make_runtime
from ..teachers import Teacher, load_teachers
from .init import INITIALISERS, SynthesisRun
from .matching import MATCHERS
from .methods import METHODS, TEACHER_POLICIES, Method, TeacherPlan, method_for
from .recover import recover
from .units import UNIT_PLANS, Unit


def synthesis_teachers(
    config: DistillConfig, spec: DatasetSpec, class_names: list[str], runtime: Runtime
) -> list[Teacher]:
    """The run's teachers, loaded and placed; they must agree on the classes and, unless the method
    also matches convolutions, at least one have BatchNorm.

    A teacher without BatchNorm (AlexNet in the published ImageNet-1k FADRM+)
    contributes only the cross-entropy term on its iterations (and its convolutions'
    statistics where the method matches them).
    """
    teachers = load_teachers(
        config.teachers, spec, class_names, runtime, config.teacher_arch, config.holdout, compile=True
    )
    if not METHODS.get(config.method).needs_statistics and not any(teacher.has_batchnorm() for teacher in teachers):
        raise FadrmError(
            f"none of the teachers ({', '.join(t.arch for t in teachers)}) has BatchNorm layers, "
            "so there are no statistics to match; add a teacher with BatchNorm"
        )
    first = teachers[0]
    for other in teachers[1:]:
        if other.class_names != first.class_names:
            raise FadrmError(f"teachers {first.source} and {other.source} disagree on the classes")
    return teachers


# ------------------------------------------------------------------ stages
def _bounds(spec: DatasetSpec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Valid pixel range [0, 1] expressed in normalised space, per channel."""
    zeros = torch.zeros(1, spec.channels, 1, 1, device=device)
    return normalize(zeros, spec.mean, spec.std), normalize(zeros + 1, spec.mean, spec.std)


def _batches(units: list[Unit], groups_per_batch: int, plans: Callable[[Unit], TeacherPlan]) -> list[list[Unit]]:
    """Consecutive units of equal size and teacher plan, at most ``groups_per_batch`` per batch."""
    batches: list[list[Unit]] = []
    for unit in units:
        last = batches[-1] if batches else None
        if last and len(last) < groups_per_batch and last[0].size == unit.size and plans(last[0]) == plans(unit):
            last.append(unit)
        else:
            batches.append([unit])
    return batches


def _units(run: SynthesisRun, method: Method) -> list[Unit]:
    return UNIT_PLANS.get(method.units).plan(len(run.layout.class_names), run.config.ipc, run.config.synthesis)


def synthesize(run: SynthesisRun, method: Method) -> None:
    """Run the recover loop over this rank's unfinished batches and write their images and records.

    The batches are planned over all units and then shared out, so which groups are optimised
    together depends only on the plan and the device kind: never on the number of processes,
    nor on which units an interrupted run had finished (a batch with any unit missing is redone
    whole, rewriting the same bytes for the units it had).
    """
    config, layout, runtime = run.config, run.layout, run.runtime
    settings = method.stage_plan(config.synthesis)
    initialiser = INITIALISERS.get(method.initialiser)
    plans = TEACHER_POLICIES.get(method.teacher_policy).plans(config, len(run.teachers))
    units = _units(run, method)
    per_batch = config.groups_per_batch or max(1, DEFAULT_BATCH_IMAGES[runtime.device.type] // units[0].size)
    batches = run.ranks.shard(_batches(units, per_batch, plans))
    todo = [batch for batch in batches if not all(unit_finished(run, unit) for unit in batch)]
    if not todo:
        return
    bounds = _bounds(run.spec, runtime.device)
    models = [t.model for t in run.teachers]
    targets = [t for t, _ in run.statistics] if run.statistics is not None else None
    run.log(
        f"{method.name}: {sum(map(len, todo))} groups to synthesise, {per_batch} per batch, "
        f"{settings.total_budget} iterations each"
    )
    for batch in todo:
        started = time.perf_counter()
        generators = [u.generator(config.seed) for u in batch]
        labels = torch.tensor([c for u in batch for c, _ in u.images])
        init = initialiser.initial_images(run, batch, generators)
        if runtime.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(runtime.device)
        bar = tqdm(total=settings.total_budget, desc=f"{batch[0].key}+{len(batch) - 1}", leave=False, disable=None)

        def on_step(step: int, loss: float | None) -> None:
            bar.update(1)
            if loss is not None:  # the end of a stage
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

        try:
            result = recover(
                init,
                labels,
                models,
                generators,
                settings,
                runtime,
                bounds,
                on_step,
                matcher=MATCHERS.get(method.matcher).build,
                plan=plans(batch[0]),
                targets=targets,
                slots=batch[0].slots,
            )
        finally:
            bar.close()
        images = denormalize(result.images, run.spec.mean, run.spec.std).cpu()
        elapsed = time.perf_counter() - started
        per_group = batch[0].size
        for g, unit in enumerate(batch):
            records = []
            for j, (label, ipc_index) in enumerate(unit.images):
                k = g * per_group + j
                path = layout.image("images", label, ipc_index)
                source = initialiser.source_file(run, label, ipc_index)
                if not method.optimises and source is not None:
                    # Not optimised (RDED): the distilled image is the initial one, byte for byte.
                    with atomic_path(path) as tmp:
                        shutil.copyfile(source, tmp)
                else:
                    save_png(path, images[k])
                records.append(
                    {
                        "class": label,
                        "class_name": layout.class_names[label],
                        "ipc_index": ipc_index,
                        **layout.image_record(path),
                        "ce": round(float(result.ce[k]), 6),
                    }
                )
            write_json(
                layout.unit_record(unit.key),
                {
                    "unit": unit.key,
                    "ipc_index": unit.ipc_index,
                    "group": unit.group,
                    "classes": list(unit.classes),
                    "bn_loss": round(float(result.bn[g]), 6),
                    "loss": round(float(result.loss[g]), 6),
                    "iterations": result.iterations,
                    "seconds": elapsed / len(batch),
                    "seconds_per_image": elapsed / len(batch) / per_group,
                    "batched_groups": len(batch),
                    "peak_memory_bytes": runtime.peak_memory(),
                    "rank": run.ranks.rank,
                    **plans(unit).describe(),
                    "images": records,
                },
            )


def unit_finished(run: SynthesisRun, unit: Unit) -> bool:
    """Whether ``unit``'s record is intact and its images are the ones it recorded (else it is synthesised
    again, rewriting the same bytes)."""
    files = [run.layout.image("images", label, ipc_index) for label, ipc_index in unit.images]
    record_path = run.layout.unit_record(unit.key)
    return run.layout.intact_record(record_path, files, f"synthesising unit {unit.key}", run.log) is not None


def gather_manifest(run: SynthesisRun, method: Method, wall_seconds: float) -> dict[str, Any]:
    """Gather every unit's record into ``manifest.json``; fails if a unit is missing."""
    config, layout = run.config, run.layout
    units = _units(run, method)
    missing = [u.key for u in units if not layout.unit_record(u.key).exists()]
    if missing:
        raise FadrmError(f"{len(missing)} units are unfinished (e.g. {missing[0]}); run the same command again")
    records = [read_json(layout.unit_record(u.key)) for u in units]
    images = sorted((img for r in records for img in r["images"]), key=lambda r: (r["class"], r["ipc_index"]))
    return write_manifest(
        layout,
        {
            "device": run.runtime.describe(),
            "dataset": {**run.spec.to_dict(), "class_names": list(layout.class_names)},
            "method": method.name,
            "ipc": config.ipc,
            "seed": config.seed,
            "config": config.to_dict(),
            "stage_plan": asdict(method.stage_plan(config.synthesis)),
            "teachers": [t.describe() for t in run.teachers],
            **({"statistics": [d for _, d in run.statistics]} if run.statistics is not None else {}),
            "images": images,
            "units": [{k: v for k, v in r.items() if k != "images"} for r in records],
            "wall_seconds_this_session": round(wall_seconds, 3),
            "synthesis_seconds_per_image": round(sum(r["seconds"] for r in records) / max(len(images), 1), 6),
            "peak_memory_bytes": max(r["peak_memory_bytes"] for r in records),
        },
    )


# --------------------------------------------------------------------- API
def distill(config: DistillConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build a distilled dataset as described by ``config`` (already resolved and validated,
    see :func:`fadrm.config.resolver`); returns the manifest.

    Resumable: run the same config again after an interruption. Under torchrun
    each process takes its share of the classes and units.
    """
    started = time.perf_counter()
    validate(config)  # also for configs built by hand rather than resolved
    method = method_for(config)
    spec = get_dataset_spec(config.dataset)
    fused = config.fused_statistics
    if fused and config.compile:
        log(
            "--fused-statistics: the fused path replaces BatchNorm layers, which a compiled teacher cannot take; "
            "using the per-layer one with --compile"
        )
        fused = False
    refuse_data_folder(Path(config.out), data_folder(spec, config.data_root), "--out")
    runtime = make_runtime(config.device, config.amp, compile=config.compile, fused_statistics=fused)
    ranks = init_ranks(runtime.device.type)
    try:
        # One writer per set (rank 0 for the group): a second distillation into --out is refused.
        with lock_or_nothing(config.out, "--out", ranks.is_main):
            return _distill_ranked(config, method, spec, runtime, ranks, started, log)
    finally:
        ranks.close()


def _distill_ranked(
    config: DistillConfig,
    method: Method,
    spec: DatasetSpec,
    runtime: Runtime,
    ranks: Ranks,
    started: float,
    log: Callable[[str], None],
) -> dict[str, Any]:
    if ranks.world > 1 and runtime.device.type == "cuda":
        runtime = replace(runtime, device=torch.device("cuda", ranks.local_rank))
    dataset = load_split(spec, "train", config.data_root, config.holdout)
    class_names = list(spec.display_names or dataset.classes)
    teachers = synthesis_teachers(config, spec, dataset.classes, runtime)
    data_sha256 = data_digest(data_folder(spec, config.data_root), default_cache(), log)
    if config.priors_from:
        teachers_sha256 = [t.sha256 for t in teachers]
        priors = read_priors(config.priors_from, teachers_sha256, config.synthesis.priors, data_sha256)
        config = replace(config, synthesis=replace(config.synthesis, priors=priors))
        validate(config)
    if method.uses_priors and config.synthesis.priors is None and len(teachers) > 1 and ranks.is_main:
        log(f"{method.name}: no --prior given, so the committee's members weigh the same (fadrm priors computes them)")
    layout = Layout(Path(config.out), tuple(class_names), config.ipc)
    statistics = None
    if method.needs_statistics:
        # Several processes would each compute a missing file: they ask for it to be made first.
        statistics = teacher_statistics(
            distill_statistics_config(config), teachers, dataset, runtime, ranks.world == 1, log, data_sha256
        )
    run = SynthesisRun(config, spec, dataset, teachers, layout, runtime, ranks, log, statistics, data_sha256)
    INITIALISERS.get(method.initialiser).check(run)  # before anything is written
    if ranks.is_main:
        open_distilled_folder(
            layout,
            config,
            [t.sha256 for t in teachers],
            log,
            [d["sha256"] for _, d in statistics] if statistics is not None else None,
            DistilledSet.open(config.init_from).set_id() if config.init_from else None,
            data_sha256,
        )
    ranks.barrier()
    INITIALISERS.get(method.initialiser).prepare(run)
    ranks.barrier()
    synthesize(run, method)
    ranks.barrier()
    manifest: dict[str, Any] = {}
    if ranks.is_main:
        manifest = gather_manifest(run, method, time.perf_counter() - started)
        log(f"wrote {len(manifest['images'])} images to {layout.root / 'images'}")
    ranks.barrier()
    return manifest
