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

import platform
import resource
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from .._version import __version__
from ..config import DistillConfig, write_config
from ..data import DatasetSpec, ImageDataset, get_dataset_spec, load_split, normalize
from ..data.datasets import read_image
from ..data.transforms import denormalize
from ..distributed import Ranks, init_ranks
from ..errors import FadrmError
from ..io import atomic_path, read_json, safe_name, save_png, write_json
from ..runtime import Runtime, make_runtime
from .methods import METHODS, Method
from .patches import PatchSettings, scoring_input, select_class_patches
from .recover import RecoverSettings, recover
from .units import Unit, make_generator, plan_units
from ..teachers import Teacher, check_holdout, fit_teacher_to_dataset, load_teacher
from ..training import progress

MANIFEST_FORMAT = "fadrm-distilled"
MANIFEST_VERSION = 1
# What to pass to resume a set made by fadrm 0.1 whose defaults have changed since.
RESUME_HINTS = {
    "patch_scoring": "fadrm 0.1 scored patches with --patch-scoring resize",
    "budgets": "fadrm 0.1 gave SRe2L / SRe2L++ FADRM's budget: --equal-budget",
}
# Images per forward pass when --groups-per-batch is not given.
DEFAULT_BATCH_IMAGES = {"cpu": 100, "cuda": 1000}


@dataclass(frozen=True)
class Layout:
    """File names inside an output folder."""

    root: Path
    class_names: tuple[str, ...]
    ipc: int

    def class_dir(self, kind: str, label: int) -> Path:
        width = max(3, len(str(len(self.class_names) - 1)))
        return self.root / kind / f"{label:0{width}d}_{safe_name(self.class_names[label])}"

    def image(self, kind: str, label: int, ipc_index: int) -> Path:
        width = max(3, len(str(self.ipc - 1)))
        return self.class_dir(kind, label) / f"{ipc_index:0{width}d}.png"

    def init_record(self, label: int) -> Path:
        return self.root / "state" / "init" / f"class{label:05d}.json"

    def unit_record(self, unit: Unit) -> Path:
        return self.root / "state" / "units" / f"{unit.key}.json"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def run_file(self) -> Path:
        return self.root / "run.json"

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


# ------------------------------------------------------------------ checks
def effective_recover_settings(config: DistillConfig, method: Method) -> RecoverSettings:
    """The stage plan a method really runs: single-stage methods get one full-size stage."""
    sizes, budgets = list(config.sizes), list(config.budgets)
    if not method.optimize:
        sizes, budgets = [sizes[-1]], [0]
    elif not method.multi_stage:
        sizes, budgets = [sizes[-1]], [sum(budgets)]
    return RecoverSettings(
        sizes=tuple(sizes), budgets=tuple(budgets), lr=config.lr, r_bn=config.r_bn,
        first_bn_multiplier=config.first_bn_multiplier, jitter=config.jitter, alpha=config.alpha,
        crop_scale=(config.crop_scale[0], config.crop_scale[1]),
    )  # fmt: skip


def validate_config(config: DistillConfig, method: Method, spec: DatasetSpec) -> None:
    """Reject impossible settings with one clear line each."""
    if config.ipc < 1:
        raise FadrmError(f"--ipc must be at least 1, got {config.ipc}")
    if len(config.sizes) != len(config.budgets) or not config.sizes:
        raise FadrmError(
            f"--sizes and --budgets need one value per stage; got {len(config.sizes)} sizes and {len(config.budgets)} budgets"
        )
    if any(s < 1 for s in config.sizes) or any(b < 0 for b in config.budgets):
        raise FadrmError("--sizes must be positive and --budgets non-negative")
    if config.sizes[-1] != spec.image_size:
        raise FadrmError(
            f"the last stage must be at full resolution ({spec.image_size} px for {spec.name}), got {config.sizes[-1]}"
        )
    if not 0.0 <= config.alpha <= 1.0:
        raise FadrmError(f"--alpha must be in [0, 1], got {config.alpha}")
    if config.classes_per_group < 1:
        raise FadrmError("--classes-per-group must be at least 1")
    if config.groups_per_batch is not None and config.groups_per_batch < 1:
        raise FadrmError("--groups-per-batch must be at least 1")
    if config.factor < 1 or spec.image_size % config.factor:
        raise FadrmError(f"--factor must divide the image size {spec.image_size}")
    if config.lr <= 0 or config.r_bn < 0 or config.jitter < 0:
        raise FadrmError("--lr must be positive, --r-bn and --jitter non-negative")
    for name in ("crop_scale", "patch_crop_scale"):
        low, high = getattr(config, name)
        if not 0 < low <= high <= 1:
            raise FadrmError(f"--{name.replace('_', '-')} must be two numbers with 0 < low <= high <= 1")
    scoring_input(config.patch_scoring)  # an unknown --patch-scoring fails before any data is read
    if not config.teachers:
        raise FadrmError("give at least one --teacher")
    if method.max_teachers is not None and len(config.teachers) > method.max_teachers:
        raise FadrmError(f"method {method.name} uses one teacher, got {len(config.teachers)}; use fadrm+ for several")
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise FadrmError(f"--out {out} is a file; give a folder")


def load_teachers(config: DistillConfig, spec: DatasetSpec, class_names: list[str], runtime: Runtime) -> list[Teacher]:
    """Load, check and place every teacher; they must all fit the dataset and at least one have BatchNorm.

    A teacher without BatchNorm (AlexNet in the published ImageNet-1k FADRM+)
    contributes only the cross-entropy term on its iterations.
    """
    teachers = []
    for source in config.teachers:
        teacher = fit_teacher_to_dataset(load_teacher(source, spec, config.teacher_arch), spec, class_names)
        check_holdout(teacher, config.holdout)
        teacher.model = runtime.place(teacher.model, compile=True)
        teachers.append(teacher)
    if not any(teacher.has_batchnorm() for teacher in teachers):
        raise FadrmError(
            f"none of the teachers ({', '.join(t.arch for t in teachers)}) has BatchNorm layers, "
            "so there are no statistics to match; add a teacher with BatchNorm"
        )
    first = teachers[0]
    for other in teachers[1:]:
        if other.class_names != first.class_names:
            raise FadrmError(f"teachers {first.source} and {other.source} disagree on the classes")
    return teachers


def prepare_output(config: DistillConfig, teachers: list[Teacher], layout: Layout, log: Callable[[str], None]) -> None:
    """Create DIR, or check that an existing DIR is the same run (resume); --overwrite starts afresh."""
    identity = {"config": config.identity(), "teachers_sha256": [t.sha256 for t in teachers]}
    if layout.run_file.exists():
        previous = read_json(layout.run_file)
        if previous == identity:
            log(f"resuming in {layout.root}")
        elif config.overwrite:
            log(f"--overwrite: removing the previous run's outputs in {layout.root}")
            for name in ("images", "init", "state"):
                shutil.rmtree(layout.root / name, ignore_errors=True)
            for path in (layout.manifest, layout.root / "config.yaml"):
                path.unlink(missing_ok=True)
        else:
            old, new = previous.get("config", {}), identity["config"]
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if previous.get("teachers_sha256") != identity["teachers_sha256"]:
                changed.append("teachers")
            hints = [RESUME_HINTS[k] for k in changed if k in RESUME_HINTS]
            raise FadrmError(
                f"{layout.root} holds a run with different settings ({', '.join(changed)}); "
                + "".join(f"{hint}; " for hint in hints)
                + "pass --overwrite to replace it or choose another --out"
            )
    elif layout.root.exists() and any(layout.root.iterdir()) and not config.overwrite:
        raise FadrmError(f"{layout.root} is not empty and is not a fadrm run; choose another --out")
    layout.root.mkdir(parents=True, exist_ok=True)
    write_json(layout.run_file, identity)
    write_config(layout.root / "config.yaml", config)


# ------------------------------------------------------------------ stages
def _bounds(spec: DatasetSpec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Valid pixel range [0, 1] expressed in normalised space, per channel."""
    zeros = torch.zeros(1, spec.channels, 1, 1, device=device)
    return normalize(zeros, spec.mean, spec.std), normalize(zeros + 1, spec.mean, spec.std)


def select_patches(
    config: DistillConfig, spec: DatasetSpec, dataset: ImageDataset, teacher: Teacher, layout: Layout, runtime: Runtime,
    ranks: Ranks, log: Callable[[str], None],
) -> None:  # fmt: skip
    """Choose the initial images of every class (this rank's share), skipping finished classes."""
    settings = PatchSettings(
        mipc=config.mipc, num_crop=config.num_crop, factor=config.factor, difficulty=config.difficulty,
        crop_scale=(config.patch_crop_scale[0], config.patch_crop_scale[1]), scoring=config.patch_scoring,
    )  # fmt: skip
    todo = [c for c in ranks.shard(range(len(layout.class_names))) if not layout.init_record(c).exists()]
    if not todo:
        return
    log(f"selecting realistic patches for {len(todo)} classes")
    for label in progress(todo, "patches"):
        images, record = select_class_patches(
            dataset, label, config.ipc, teacher.model, spec.mean, spec.std, spec.image_size, settings,
            make_generator(config.seed, "patches", label), runtime,
        )  # fmt: skip
        for ipc_index, image in enumerate(images):
            save_png(layout.image("init", label, ipc_index), image)
        write_json(layout.init_record(label), record)


def _batches(units: list[Unit], groups_per_batch: int) -> list[list[Unit]]:
    """Consecutive units of equal group size, at most ``groups_per_batch`` per batch."""
    batches: list[list[Unit]] = []
    for unit in units:
        if batches and len(batches[-1]) < groups_per_batch and len(batches[-1][0].classes) == len(unit.classes):
            batches[-1].append(unit)
        else:
            batches.append([unit])
    return batches


def _peak_memory(runtime: Runtime) -> int:
    if runtime.device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(runtime.device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def synthesize(
    config: DistillConfig, spec: DatasetSpec, method: Method, teachers: list[Teacher], layout: Layout,
    runtime: Runtime, ranks: Ranks, log: Callable[[str], None],
) -> None:  # fmt: skip
    """Run the recover loop over this rank's unfinished units and write their images and records."""
    settings = effective_recover_settings(config, method)
    units = ranks.shard(plan_units(len(layout.class_names), config.ipc, config.classes_per_group))
    todo = [u for u in units if not layout.unit_record(u).exists()]
    if not todo:
        return
    per_batch = config.groups_per_batch or max(
        1, DEFAULT_BATCH_IMAGES[runtime.device.type] // config.classes_per_group
    )
    bounds = _bounds(spec, runtime.device)
    models = [t.model for t in teachers]
    log(f"{method.name}: {len(todo)} groups to synthesise, {per_batch} per batch, {settings.total_budget} iterations each")
    for batch in _batches(todo, per_batch):
        started = time.perf_counter()
        generators = [make_generator(config.seed, "synth", u.ipc_index, u.group) for u in batch]
        labels = torch.tensor([c for u in batch for c in u.classes])
        if method.init == "noise":
            shape = (len(batch[0].classes), spec.channels, spec.image_size, spec.image_size)
            init = torch.cat([torch.randn(shape, generator=g) for g in generators])
        else:
            init = torch.stack([
                read_image(layout.image("init", c, u.ipc_index), spec.channels) for u in batch for c in u.classes
            ])  # fmt: skip
            init = normalize(init.float().div_(255), spec.mean, spec.std)
        if runtime.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(runtime.device)
        bar = tqdm(total=settings.total_budget, desc=f"{batch[0].key}+{len(batch) - 1}", leave=False, disable=None)

        def on_step(step: int, loss: float) -> None:
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

        try:
            result = recover(init, labels, models, generators, settings, runtime, bounds, on_step)
        finally:
            bar.close()
        images = denormalize(result.images, spec.mean, spec.std).cpu()
        elapsed = time.perf_counter() - started
        per_group = len(batch[0].classes)
        for g, unit in enumerate(batch):
            records = []
            for j, label in enumerate(unit.classes):
                k = g * per_group + j
                path = layout.image("images", label, unit.ipc_index)
                if method.optimize:
                    save_png(path, images[k])
                else:
                    # RDED: the distilled image is the selected patch, byte for byte.
                    with atomic_path(path) as tmp:
                        shutil.copyfile(layout.image("init", label, unit.ipc_index), tmp)
                records.append({
                    "class": label, "class_name": layout.class_names[label], "ipc_index": unit.ipc_index,
                    "file": layout.relative(path), "ce": round(float(result.ce[k]), 6),
                })  # fmt: skip
            write_json(layout.unit_record(unit), {
                "unit": unit.key, "ipc_index": unit.ipc_index, "group": unit.group, "classes": list(unit.classes),
                "bn_loss": round(float(result.bn[g]), 6), "loss": round(float(result.loss[g]), 6),
                "iterations": result.iterations, "seconds": elapsed / len(batch),
                "seconds_per_image": elapsed / len(batch) / per_group, "batched_groups": len(batch),
                "peak_memory_bytes": _peak_memory(runtime), "rank": ranks.rank, "images": records,
            })  # fmt: skip


def write_manifest(
    config: DistillConfig, spec: DatasetSpec, method: Method, teachers: list[Teacher], layout: Layout,
    runtime: Runtime, wall_seconds: float,
) -> dict[str, Any]:  # fmt: skip
    """Gather every unit's record into ``manifest.json``; fails if a unit is missing."""
    units = plan_units(len(layout.class_names), config.ipc, config.classes_per_group)
    missing = [u.key for u in units if not layout.unit_record(u).exists()]
    if missing:
        raise FadrmError(f"{len(missing)} units are unfinished (e.g. {missing[0]}); run the same command again")
    records = [read_json(layout.unit_record(u)) for u in units]
    images = sorted((img for r in records for img in r["images"]), key=lambda r: (r["class"], r["ipc_index"]))
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "fadrm_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": runtime.describe(),
        "dataset": {**spec.to_dict(), "class_names": list(layout.class_names)},
        "method": method.name,
        "ipc": config.ipc,
        "seed": config.seed,
        "config": config.to_dict(),
        "recover_settings": effective_recover_settings(config, method).__dict__,
        "teachers": [t.describe() for t in teachers],
        "images": images,
        "units": [{k: v for k, v in r.items() if k != "images"} for r in records],
        "wall_seconds_this_session": round(wall_seconds, 3),
        "synthesis_seconds_per_image": round(sum(r["seconds"] for r in records) / max(len(images), 1), 6),
        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in records),
        "complete": True,
    }
    write_json(layout.manifest, manifest)
    return manifest


# --------------------------------------------------------------------- API
def distill(config: DistillConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build a distilled dataset as described by ``config``; returns the manifest.

    Resumable: run the same config again after an interruption. Under torchrun
    each process takes its share of the classes and units.
    """
    started = time.perf_counter()
    method = METHODS.get(config.method)
    spec = get_dataset_spec(config.dataset)
    validate_config(config, method, spec)
    runtime = make_runtime(config.device, config.amp, compile=config.compile)
    ranks = init_ranks(runtime.device.type)
    try:
        return _distill_ranked(config, method, spec, runtime, ranks, started, log)
    finally:
        ranks.close()


def _distill_ranked(
    config: DistillConfig, method: Method, spec: DatasetSpec, runtime: Runtime, ranks: Ranks, started: float,
    log: Callable[[str], None],
) -> dict[str, Any]:  # fmt: skip
    if ranks.world > 1 and runtime.device.type == "cuda":
        runtime = replace(runtime, device=torch.device("cuda", ranks.local_rank))
    dataset = load_split(spec, "train", config.data_root, config.holdout)
    class_names = list(spec.display_names or dataset.classes)
    teachers = load_teachers(config, spec, dataset.classes, runtime)
    layout = Layout(Path(config.out), tuple(class_names), config.ipc)
    if ranks.is_main:
        prepare_output(config, teachers, layout, log)
    ranks.barrier()
    if method.init == "patches":
        select_patches(config, spec, dataset, teachers[0], layout, runtime, ranks, log)
        ranks.barrier()
    synthesize(config, spec, method, teachers, layout, runtime, ranks, log)
    ranks.barrier()
    manifest: dict[str, Any] = {}
    if ranks.is_main:
        manifest = write_manifest(config, spec, method, teachers, layout, runtime, time.perf_counter() - started)
        log(f"wrote {len(manifest['images'])} images to {layout.root / 'images'}")
    ranks.barrier()
    return manifest
