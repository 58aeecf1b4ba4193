"""Teachers: loading from every source, fitting them to a dataset, and training them.

A teacher is a classifier whose input is a normalised image; synthesis matches
the statistics of its BatchNorm layers (a teacher without any, such as AlexNet,
contributes its predictions only, next to teachers that have them). Our
checkpoints (format in :mod:`fadrm.artifacts`) carry their own metadata
(architecture, dataset, classes, channels, normalisation, accuracy, package
version), so every later command needs only the path. Loading never executes
pickled code.
"""

from __future__ import annotations

import contextlib

import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .locks import exclusive_file
from .artifacts import (
    checkpoint_dict,
    checkpoint_meta,
    is_checkpoint,
    load_teacher_progress,
    partial_path,
    require_same_settings,
    safe_torch_load,
    save_teacher_progress,
    teacher_config_path,
)
from .augment import train_transform
from .config import TeacherConfig, validate, write_config
from .data import DatasetSpec, data_folder, eval_transform, get_dataset_spec, load_split
from .data.digest import data_digest
from .data.specs import IMAGENET_MEAN, IMAGENET_STD
from .distributed import Ranks, init_ranks
from .errors import FadrmError, GroupRefusal
from .io import DAMAGE_ERRORS, default_cache, save_torch, set_aside, sha256_file
from .models import build_model
from .runtime import Runtime, make_runtime
from .seeding import epoch_seed
from .training import evaluate_accuracy, make_loader, train_one_epoch

_TORCHVISION_WEIGHTS = re.compile(r"^([a-z0-9_]+):([A-Za-z0-9_]+)$")


@dataclass
class Teacher:
    """A loaded, frozen teacher (eval mode) and what it was trained on.

    ``model`` maps normalised images (with ``mean``/``std``) to one logit per
    class of ``class_names``.
    """

    model: nn.Module
    arch: str
    dataset: str
    class_names: list[str]
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    sha256: str | None = None
    val_top1: float | None = None
    arch_args: dict[str, Any] = field(default_factory=dict)
    kind: str = "fadrm"  # "fadrm" checkpoint, plain "state_dict", or "torchvision" weights
    holdout: int = 0  # training images per class it never saw (see load_split)
    train_config: dict[str, Any] = field(default_factory=dict)  # what defined its training (ours only)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def has_batchnorm(self) -> bool:
        """Whether the model has BatchNorm layers (synthesis matches their statistics)."""
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules())

    def describe(self) -> dict[str, Any]:
        """JSON summary for manifests and result files."""
        return {
            "source": self.source,
            "sha256": self.sha256,
            "arch": self.arch,
            "arch_args": self.arch_args,
            "dataset": self.dataset,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "val_top1": self.val_top1,
            "kind": self.kind,
        }


class LogitSubset(nn.Module):
    """Restrict a classifier's logits to some classes (an ImageNet-1k teacher on ImageNette)."""

    def __init__(self, model: nn.Module, indices: tuple[int, ...]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("indices", torch.tensor(indices, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).index_select(1, self.indices)


# ----------------------------------------------------------------- loading
def _load_state_into(model: nn.Module, state: dict[str, torch.Tensor], what: str, arch: str) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:200]
        raise FadrmError(f"{what} does not fit architecture {arch!r} ({detail})") from None


def _plain_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """Find a state dict inside common wrappers ({"state_dict": ...}, {"model": ...})."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            # DataParallel / DDP checkpoints prefix every key with "module."
            if all(k.startswith("module.") for k in obj):
                obj = {k[len("module.") :]: v for k, v in obj.items()}
            return obj
    return None


def _torchvision_teacher(arch: str, weights_name: str) -> Teacher:
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(arch)[weights_name]
    except (ValueError, KeyError):
        raise FadrmError(f"torchvision has no weights {arch}:{weights_name}") from None
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not cache.exists():
        raise FadrmError(
            f"weights {arch}:{weights_name} are not in the local torch cache; without network access, "
            f"download {weights.url} elsewhere and copy it to {cache}"
        )
    model = build_model(arch, num_classes=1000, in_channels=3)
    _load_state_into(model, safe_torch_load(cache), str(cache), arch)
    return Teacher(
        model=model.eval(),
        arch=arch,
        dataset="imagenet-1k",
        class_names=list(weights.meta["categories"]),
        in_channels=3,
        image_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        source=f"{arch}:{weights_name}",
        sha256=sha256_file(cache),
        val_top1=weights.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1"),
        kind="torchvision",
    )


def is_torchvision_weights(source: str | Path) -> bool:
    """Whether ``source`` names torchvision weights (``arch:WEIGHTS``) rather than a file that exists."""
    return bool(_TORCHVISION_WEIGHTS.match(str(source))) and not Path(source).exists()


def load_teacher(source: str | Path, spec: DatasetSpec | None = None, arch: str | None = None) -> Teacher:
    """Load a teacher from any supported source, frozen and in eval mode.

    Args:
        source: our checkpoint (.pt), a plain state dict (.pt/.pth), a .safetensors
            file, or torchvision weights as ``arch:WEIGHTS`` (e.g. ``resnet18:IMAGENET1K_V1``).
        spec: the dataset, needed for plain state dicts (classes, channels, normalisation).
        arch: the architecture, needed for plain state dicts.
    """
    path = Path(source)
    if is_torchvision_weights(source):
        teacher = _torchvision_teacher(*str(source).split(":"))
    elif not path.exists():
        raise FadrmError(f"teacher checkpoint {path} not found; train one with: fadrm train-teacher")
    elif path.is_dir():
        raise FadrmError(f"teacher {path} is a folder; give the checkpoint file")
    else:
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                obj: Any = load_file(str(path))
            except (SafetensorError, OSError, ValueError) as exc:
                raise FadrmError(f"cannot read safetensors file {path} ({exc})") from None
        else:
            obj = safe_torch_load(path)
        if is_checkpoint(obj, path):
            teacher = _teacher_from_checkpoint(obj, path)
        else:
            state = _plain_state_dict(obj)
            if state is None:
                raise FadrmError(f"{path} holds neither a fadrm checkpoint nor a state dict")
            if spec is None or arch is None or spec.num_classes is None:
                raise FadrmError(f"{path} is a plain state dict; also give --teacher-arch and --dataset")
            model = build_model(arch, spec.num_classes, spec.channels, spec.image_size)
            _load_state_into(model, state, str(path), arch)
            teacher = Teacher(
                model=model,
                arch=arch,
                dataset=spec.name,
                class_names=[str(i) for i in range(spec.num_classes)],
                in_channels=spec.channels,
                image_size=spec.image_size,
                mean=spec.mean,
                std=spec.std,
                source=str(path),
                sha256=sha256_file(path),
                kind="state_dict",
            )
    teacher.model.eval().requires_grad_(False)
    if not all(bool(torch.isfinite(t).all()) for t in teacher.model.state_dict().values() if t.is_floating_point()):
        # Caught here, not as a non-finite loss blamed on the learning rate hours later.
        raise FadrmError(f"teacher {path} holds non-finite weights (NaN or infinity); restore or retrain it")
    return teacher


# The metadata a fadrm teacher checkpoint holds, and the type of each (what checkpoint_meta writes).
CHECKPOINT_FIELDS = {
    "arch": str,
    "arch_args": dict,
    "dataset": str,
    "class_names": list,
    "in_channels": int,
    "image_size": int,
    "mean": list,
    "std": list,
    "state_dict": dict,
}


def checkpoint_problem(ckpt: dict[str, Any]) -> str | None:
    """What in a fadrm teacher checkpoint's metadata is missing or of the wrong type, or None."""
    for key, kind in CHECKPOINT_FIELDS.items():
        value = ckpt.get(key, {} if key == "arch_args" else None)
        if kind is list and isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return f"its {key!r} is {type(value).__name__}, not {kind.__name__}"
    numbers = [*ckpt["mean"], *ckpt["std"]]
    if not all(isinstance(x, (int, float)) for x in numbers) or not all(
        isinstance(n, str) for n in ckpt["class_names"]
    ):
        return "its 'mean', 'std' or 'class_names' hold values of the wrong type"
    if not isinstance(ckpt.get("train_config", {}), dict):
        return "its 'train_config' is not a mapping"
    return None


def _teacher_from_checkpoint(ckpt: dict[str, Any], path: Path) -> Teacher:
    problem = checkpoint_problem(ckpt)
    if problem:
        raise FadrmError(
            f"{path} is not a fadrm teacher checkpoint as fadrm writes it ({problem}); restore or retrain it"
        )
    arch, args = ckpt["arch"], dict(ckpt.get("arch_args", {}))
    model = build_model(arch, len(ckpt["class_names"]), ckpt["in_channels"], ckpt["image_size"], **args)
    _load_state_into(model, ckpt["state_dict"], str(path), arch)
    return Teacher(
        model=model,
        arch=arch,
        dataset=ckpt["dataset"],
        class_names=list(ckpt["class_names"]),
        in_channels=ckpt["in_channels"],
        image_size=ckpt["image_size"],
        mean=tuple(ckpt["mean"]),
        std=tuple(ckpt["std"]),
        source=str(path),
        sha256=sha256_file(path),
        val_top1=ckpt.get("val_top1"),
        arch_args=args,
        holdout=int(ckpt.get("train_config", {}).get("holdout", 0)),
        train_config=dict(ckpt.get("train_config", {})),
    )


def check_holdout(teacher: Teacher, holdout: int) -> None:
    """Refuse a teacher that was trained on the images a run holds out for validation."""
    if holdout and teacher.kind == "fadrm" and teacher.holdout != holdout:
        raise FadrmError(
            f"teacher {teacher.source} was trained with --holdout {teacher.holdout}, this run holds out {holdout} "
            "images per class; train the teacher with the same --holdout"
        )


def fit_teacher_to_dataset(teacher: Teacher, spec: DatasetSpec, class_names: list[str]) -> Teacher:
    """Check the teacher suits the dataset and adapt an ImageNet-1k teacher to an ImageNet subset.

    Args:
        teacher: a loaded teacher.
        spec: the dataset being distilled or evaluated.
        class_names: the dataset's classes as read from disk, in label order.

    Raises:
        FadrmError: when channels, class count, training dataset or class names differ.
    """
    if teacher.in_channels != spec.channels:
        raise FadrmError(
            f"teacher {teacher.source} takes {teacher.in_channels}-channel images, {spec.name} has "
            f"{spec.channels}; use a teacher trained on {spec.name}"
        )
    if teacher.num_classes == 1000 and teacher.dataset == "imagenet-1k" and spec.imagenet_indices is not None:
        # The mapping goes through each class's ImageNet index, never by position.
        model = LogitSubset(teacher.model, spec.imagenet_indices).eval()
        names = [teacher.class_names[i] for i in spec.imagenet_indices]
        return replace(teacher, model=model, class_names=names, dataset=spec.name)
    fix = f"train a teacher on {spec.name} with: fadrm train-teacher --dataset {spec.name}"
    if teacher.num_classes != len(class_names):
        raise FadrmError(
            f"teacher {teacher.source} predicts {teacher.num_classes} classes, {spec.name} has "
            f"{len(class_names)}; {fix}"
        )
    if teacher.kind == "state_dict":
        return replace(teacher, class_names=list(class_names))
    if teacher.dataset != spec.name:
        raise FadrmError(f"teacher {teacher.source} was trained on {teacher.dataset}, not {spec.name}; {fix}")
    if teacher.kind == "fadrm" and teacher.class_names != list(class_names):
        raise FadrmError(f"teacher {teacher.source} was trained on other classes than the data given; {fix}")
    return teacher


def load_teachers(
    sources: Sequence[str],
    spec: DatasetSpec,
    class_names: list[str],
    runtime: Runtime,
    arch: str | None = None,
    holdout: int = 0,
    compile: bool = False,
) -> list[Teacher]:
    """Load every teacher, check it suits the dataset and the held-out split, and place it on the device.

    Args:
        sources: anything :func:`load_teacher` takes.
        spec: the dataset; class_names: its classes as read from disk.
        runtime: where the teachers run; ``compile`` asks it to compile them.
        arch: the architecture of plain state-dict teachers.
        holdout: the images per class the run holds out (a teacher must not have seen them).
    """
    teachers = []
    for source in sources:
        teacher = fit_teacher_to_dataset(load_teacher(source, spec, arch), spec, class_names)
        check_holdout(teacher, holdout)
        teacher.model = runtime.place(teacher.model, compile=compile)
        teachers.append(teacher)
    return teachers


# ---------------------------------------------------------------- training
def train_teacher(config: TeacherConfig, log: Callable[[str], None] = print) -> Teacher:
    """Train a teacher on the full training set and save a self-describing checkpoint.

    SGD with Nesterov momentum and a per-step cosine schedule. State is saved
    after every epoch to ``<out>.partial``; running again continues from the
    last finished epoch. A finished checkpoint with the same settings is
    returned as is. The resolved config is written beside the checkpoint.
    Under torchrun the processes train the one teacher together (each forwards its
    share of every batch; BatchNorm statistics of the whole batch); rank 0 writes.
    """
    validate(config)
    out = Path(config.out)
    if out.exists() and config.overwrite and not _is_fadrm_teacher(out):
        raise FadrmError(
            f"{out} is not a fadrm teacher checkpoint; --overwrite replaces only fadrm's own: choose another --out"
        )
    identity = teacher_identity(config, log)
    if out.exists() and not config.overwrite:
        ckpt = safe_torch_load(out)
        require_same_settings(
            ckpt.get("train_config", {}) if isinstance(ckpt, dict) else {},
            identity,
            f"the teacher {out}",
            "pass --overwrite or another --out",
        )
        log(f"teacher {out} already trained with these settings (val top-1 {ckpt.get('val_top1'):.2f}%)")
        return load_teacher(out)
    runtime = make_runtime(config.device, config.amp, stage="teacher")
    ranks = init_ranks(runtime.device.type)
    try:
        # One writer per teacher file (rank 0 for the group): a second run training the same --out is refused.
        with exclusive_file(out, "--out") if ranks.is_main else contextlib.nullcontext():
            _train_teacher_ranked(config, identity, ranks.own_device(runtime), ranks, ranks.main_only(log))
        ranks.barrier()  # the checkpoint is written
        return load_teacher(out)
    finally:
        ranks.close()


def _is_fadrm_teacher(path: Path) -> bool:
    """Whether ``path`` holds a teacher checkpoint fadrm wrote (what ``--overwrite`` may replace)."""
    try:
        return is_checkpoint(safe_torch_load(path))
    except FadrmError:
        return False


def teacher_identity(config: TeacherConfig, log: Callable[[str], None]) -> dict[str, Any]:
    """What defines a trained teacher: its defining settings and the content of the dataset it trains on
    (:func:`fadrm.data.digest.data_digest`; left out when the data is not there, which loading it then
    reports)."""
    folder = data_folder(get_dataset_spec(config.dataset), config.data_root)
    if folder is None or not folder.is_dir():
        return config.identity()
    return {**config.identity(), "data_sha256": data_digest(folder, default_cache(), log)}


def _train_teacher_ranked(
    config: TeacherConfig, identity: dict[str, Any], runtime: Runtime, ranks: Ranks, log: Callable[[str], None]
) -> None:
    out = Path(config.out)
    spec = get_dataset_spec(config.dataset)
    train_set = load_split(spec, "train", config.data_root, config.holdout)
    val_set = load_split(spec, "val", config.data_root, config.holdout)
    train_set.transform = train_transform(spec)
    val_set.transform = eval_transform(spec)
    num_classes = len(train_set.classes)
    torch.manual_seed(config.seed)
    model = build_model(config.model, num_classes, spec.channels, spec.image_size, **config.model_args)
    runtime.place(model)
    network = ranks.parallel(model)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, nesterov=True, weight_decay=config.weight_decay
    )
    # Dropping the ragged last batch keeps BatchNorm away from tiny batches, unless it is the only batch.
    drop_last = len(train_set) > config.batch_size
    if min(config.batch_size, len(train_set)) < ranks.world:
        raise GroupRefusal(
            f"{ranks.world} processes need batches of at least {ranks.world} images; use fewer processes"
        )
    steps_per_epoch = len(make_loader(train_set, config.batch_size, shuffle=True, workers=0, drop_last=drop_last))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=config.lr,
        total_steps=config.epochs * steps_per_epoch,
        pct_start=0.15,
        anneal_strategy="cos",
        div_factor=25.0,
        final_div_factor=1e3,
    )
    history: list[dict[str, float]] = []
    start_epoch = 0
    partial = partial_path(out)
    state = load_teacher_progress(partial, identity, log) if partial.exists() and not config.overwrite else None
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            history, start_epoch = list(state["history"]), int(state["epoch"])
        except DAMAGE_ERRORS as exc:
            # The model may be half restored: the run starts again in a fresh run of the command.
            raise FadrmError(
                f"{partial} is damaged ({type(exc).__name__}); kept as {set_aside(partial).name}: run the same "
                "command again to train the teacher from the start"
            ) from None
        log(f"resuming {out} after epoch {start_epoch}")
    if ranks.is_main:
        write_config(teacher_config_path(out), config)  # once the settings are known to fit what is on disk
    val_loader = make_loader(val_set, 512, shuffle=False, workers=config.workers)
    metrics = history[-1] if history else {"top1": float("nan"), "top5": float("nan")}
    started = time.perf_counter()
    for epoch in range(start_epoch, config.epochs):
        epoch_started = time.perf_counter()
        # Seeding per epoch makes a resumed run see the same batches and augmentations (and every
        # rank the same batches, of which it keeps its share).
        torch.manual_seed(epoch_seed(config.seed, epoch))
        loader = make_loader(
            train_set,
            config.batch_size,
            shuffle=True,
            seed=epoch_seed(config.seed, epoch),
            workers=config.workers,
            drop_last=drop_last,
        )
        loss = train_one_epoch(
            network,
            loader,
            optimizer,
            scheduler,
            runtime,
            spec.mean,
            spec.std,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            ranks=ranks,
        )
        metrics = evaluate_accuracy(model, val_loader, runtime, spec.mean, spec.std, ranks=ranks)
        seconds = round(time.perf_counter() - epoch_started, 2)
        history.append({"epoch": epoch + 1, "train_loss": loss, **metrics, "seconds": seconds})
        if ranks.is_main:
            save_teacher_progress(
                partial,
                identity,
                epoch + 1,
                history,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                },
            )
        log(
            f"epoch {epoch + 1}/{config.epochs}: train loss {loss:.4f}, val top-1 {metrics['top1']:.2f}%, "
            f"top-5 {metrics['top5']:.2f}% ({time.perf_counter() - started:.0f}s)"
        )
    if not ranks.is_main:
        return
    meta = checkpoint_meta(
        config.model,
        config.model_args,
        spec.name,
        train_set.classes,
        spec.channels,
        spec.image_size,
        spec.mean,
        spec.std,
        metrics["top1"],
        metrics["top5"],
        history=history,
        train_config=identity,
        trained_on=runtime.describe(),
    )
    save_torch(out, checkpoint_dict(model.to(memory_format=torch.contiguous_format), meta))
    partial.unlink(missing_ok=True)
    log(f"saved teacher to {out} (val top-1 {metrics['top1']:.2f}%)")
