"""The statistics pass of G-VBSM and EDC (``fadrm stats``, :func:`fadrm.compute_statistics`), one file per teacher.

For each teacher, in eval mode and without gradients, one pass over the training split (without
the images a run holds out) with the teacher's training augmentation, in batches of
``batch_size`` in a seeded order, recording at the input of every convolution and BatchNorm
layer:

* global targets (convolutions only: a BatchNorm layer's are its running buffers): per batch,
  the channel mean and biased variance over (B, H, W) and the patch statistics; the target is
  the mean of the per-batch statistics weighted by batch size, as the published pre-pass;
* per-class targets (every hooked layer; EDC's): per image, the channel mean and the variance
  within the image over (H, W), and for a convolution the patch statistics over (C, P, P);
  averaged over the class's images.

Each image's augmentation is drawn from (seed, image index) and the order from the seed, so the
file depends neither on the loader's workers nor on interruptions: the sums so far are saved to
``<file>.partial`` every minute and a rerun continues from them.

The file (``fadrm-statistics``, version 1) is ``<teacher>.stats-<hash>.safetensors`` and, written
after it, a JSON description of what made it (``.json`` beside it: its presence means complete).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch.utils.data import Dataset, Subset

from safetensors.torch import load_file, save_file

from .._version import __version__
from ..artifacts import RECORDED_SINCE_0_4, load_unfinished, require_same_settings
from ..augment import train_transform
from ..config import DistillConfig, StatsConfig, resolve, validate
from ..data import DatasetSpec, ImageDataset, data_folder, get_dataset_spec, load_split, normalize
from ..data.digest import data_digest
from ..errors import FadrmError
from ..locks import exclusive_file
from ..io import (
    default_cache,
    atomic_path,
    file_digest_matches,
    seal,
    read_own_json,
    safe_name,
    save_torch,
    set_aside,
    sha256_file,
    write_json,
)
from ..runtime import Runtime, make_runtime
from ..seeding import derive_seed, make_generator
from .targets import (
    LayerTargets,
    TeacherTargets,
    cell_size,
    image_moments,
    image_patch_moments,
    matched_layers,
    patch_moments,
)
from ..teachers import Teacher, is_torchvision_weights, load_teachers
from ..training import make_loader, progress

# ------------------------------------------------------------- the file format
STATISTICS_FORMAT = "fadrm-statistics"
STATISTICS_VERSION = 1


def statistics_description(path: Path) -> Path:
    """The JSON that describes a statistics file (written after it: its presence means complete)."""
    return path.with_suffix(".json")


def write_statistics(path: Path, tensors: dict[str, torch.Tensor], description: dict[str, Any]) -> dict[str, Any]:
    """Atomically write a statistics file, then its description (with the format header and the
    tensors' hash); returns the description."""
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    description = {
        "format": STATISTICS_FORMAT,
        "format_version": STATISTICS_VERSION,
        "fadrm_version": __version__,
        **description,
        "sha256": sha256_file(path),
    }
    write_json(statistics_description(path), description)
    return description


def read_statistics_description(
    path: Path, expected: Mapping[str, Any], fix: str, log: Callable[[str], None] = print
) -> dict[str, Any] | None:
    """The description of a complete statistics file (None if there is none), checked against ``expected``.

    A damaged description, or a file whose bytes are not those its description records, is set aside
    (one line) and None returned: the file is computed again.

    Raises:
        FadrmError: one line naming the settings that differ from ``expected`` and ``fix``.
    """
    described = statistics_description(path)
    if not (path.exists() and described.exists()):
        return None
    description = read_own_json(described, "computing the statistics", log)
    if description is None:
        return None
    if description.get("format") != STATISTICS_FORMAT or description.get("format_version", 0) > STATISTICS_VERSION:
        raise FadrmError(f"{described} is not a statistics file this fadrm reads; {fix}")
    if not file_digest_matches(path, description.get("sha256", "")):
        log(f"{path} is not the file its description records; kept as {set_aside(path).name}, computing it again")
        set_aside(described)
        return None
    # (A file written before fadrm 0.4 lacks its data's digest: taken as made from the same data.)
    found = {k: description.get(k) for k in expected if k in description or k not in RECORDED_SINCE_0_4}
    require_same_settings(found, expected, f"the statistics file {path}", fix)
    return description


def read_statistics(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a statistics file."""
    return load_file(str(path))


# How often an unfinished pass saves its sums (a save costs about one batch for ImageNet-1k).
SAVE_EVERY_SECONDS = 60.0


def statistics_file(teacher: Teacher, stats_dir: str | Path | None = None) -> Path:
    """``<teacher file>.stats-<first 12 hex digits of its sha256>.safetensors`` beside the teacher
    (torchvision weights: beside their cached file), or in ``stats_dir``."""
    if is_torchvision_weights(teacher.source):
        folder, name = Path(torch.hub.get_dir()) / "checkpoints", safe_name(teacher.source)
    else:
        folder, name = Path(teacher.source).parent, Path(teacher.source).name
    return Path(stats_dir or folder) / f"{name}.stats-{(teacher.sha256 or '')[:12]}.safetensors"


def _identity(teacher: Teacher, spec: DatasetSpec, config: StatsConfig, data_sha256: str) -> dict[str, Any]:
    """What a statistics file's numbers depend on (``data_sha256``: the dataset's content,
    :func:`fadrm.data.digest.data_digest`)."""
    return {
        "teacher_sha256": teacher.sha256,
        "dataset": spec.name,
        "holdout": config.holdout,
        "batch_size": config.batch_size,
        "seed": config.seed,
        "cell": cell_size(spec.image_size),
        "data_sha256": data_sha256,
    }


def _data_sha256(config: StatsConfig, spec: DatasetSpec, log: Callable[[str], None]) -> str:
    return data_digest(data_folder(spec, config.data_root), default_cache(), log)


class _SeededViews(Dataset):
    """The teacher's training augmentation of each image, drawn from (seed, index) alone."""

    def __init__(self, dataset: ImageDataset, spec: DatasetSpec, seed: int) -> None:
        self.dataset, self.transform, self.seed = dataset, train_transform(spec), seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        # The transform draws from torch's global RNG: seed it for this image, then put it back.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, "stats-view", index))
            return self.transform(self.dataset.load(index)), self.dataset.targets[index]


class _Sums:
    """Running float64 sums of every statistic, per key, and the images seen per class."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.values: dict[str, torch.Tensor] = {}
        self.counts = torch.zeros(num_classes, dtype=torch.float64, device=device)

    def add(self, key: str, value: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Add ``value`` (summed over the batch by the caller), or per image into its class's row."""
        value = value.double()
        if key not in self.values:
            shape = value.shape if labels is None else (len(self.counts), *value.shape[1:])
            self.values[key] = torch.zeros(shape, dtype=torch.float64, device=value.device)
        if labels is None:
            self.values[key] += value
        else:
            self.values[key].index_add_(0, labels, value)

    def state(self) -> dict[str, Any]:
        return {"values": {k: v.cpu() for k, v in self.values.items()}, "counts": self.counts.cpu()}

    def load(self, state: dict[str, Any]) -> None:
        device = self.counts.device
        self.values = {k: v.to(device) for k, v in state["values"].items()}
        self.counts = state["counts"].to(device)


def _hooks(teacher: Teacher, cell: int, sums: _Sums, labels: list[torch.Tensor]) -> list[Any]:
    """Forward hooks recording every hooked layer's statistics of a batch (``labels[0]``: its classes)."""

    def hook_for(name: str, convolution: bool):
        def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].float()
            if convolution:
                var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
                patch_mean, patch_var = patch_moments(x, cell, 1)
                for stat, value in (
                    ("channel_mean", mean),
                    ("channel_var", var),
                    ("patch_mean", patch_mean[0]),
                    ("patch_var", patch_var[0]),
                ):
                    sums.add(f"{name}:{stat}", value * len(x))
                per_image = [("channel", image_moments(x)), ("patch", image_patch_moments(x, cell))]
            else:
                per_image = [("channel", image_moments(x))]
            for stat, (mean, var) in per_image:
                sums.add(f"{name}:class_{stat}_mean", mean, labels[0])
                sums.add(f"{name}:class_{stat}_var", var, labels[0])

        return hook

    return [
        layer.register_forward_hook(hook_for(name, isinstance(layer, torch.nn.Conv2d)))
        for name, layer in matched_layers(teacher.model, convolutions=True)
    ]


def _eager(model: torch.nn.Module) -> torch.nn.Module:
    """The module a compiled model wraps: the pass's hooks keep Python state, which compiling would break up."""
    return getattr(model, "_orig_mod", model)


def _targets_of(sums: _Sums, images: int) -> dict[str, torch.Tensor]:
    """The file's tensors: global sums over the image count, per-class sums over each class's count."""
    if (sums.counts == 0).any():
        missing = int((sums.counts == 0).nonzero()[0, 0])
        raise FadrmError(f"class {missing} has no training image; statistics need every class")
    out = {}
    for key, value in sums.values.items():
        divisor = sums.counts.view(-1, *([1] * (value.dim() - 1))) if ":class_" in key else images
        out[key] = (value / divisor).float().cpu()
    return out


def compute_teacher_statistics(
    teacher: Teacher,
    dataset: ImageDataset,
    spec: DatasetSpec,
    config: StatsConfig,
    runtime: Runtime,
    path: Path,
    log: Callable[[str], None] = print,
    data_sha256: str | None = None,
) -> dict[str, Any]:
    """One teacher's statistics pass into ``path`` (resuming an unfinished one); returns the file's description.
    ``data_sha256``: the dataset's content, computed here when not given."""
    identity = _identity(teacher, spec, config, data_sha256 or _data_sha256(config, spec, log))
    partial = path.with_name(path.name + ".partial")
    sums = _Sums(len(dataset.classes), runtime.device)
    done = 0
    state = None
    if partial.exists() and not config.overwrite:
        state = load_unfinished(partial, "identity", "sums", "starting the pass again", log)
    if state is not None:
        require_same_settings(
            state.get("identity", {}),
            identity,
            f"the unfinished statistics pass {partial}",
            "pass --overwrite to start again",
        )
        sums.load(state["sums"])
        done = int(state["batches_done"])
        log(f"resuming the statistics of {teacher.source} after {done} batches")
    order = torch.randperm(len(dataset), generator=make_generator(config.seed, "stats-order"))
    remaining = Subset(_SeededViews(dataset, spec, config.seed), order[done * config.batch_size :].tolist())
    loader = make_loader(remaining, config.batch_size, shuffle=False, workers=config.workers)
    labels: list[torch.Tensor] = []
    handles = _hooks(teacher, identity["cell"], sums, labels)
    saved = time.monotonic()
    try:
        batches = progress(loader, f"statistics of {Path(teacher.source).name}")
        for done, (images, targets) in enumerate(batches, start=done + 1):
            labels[:] = [targets.to(runtime.device)]
            sums.counts.index_add_(0, labels[0], torch.ones(len(targets), dtype=torch.float64, device=runtime.device))
            with torch.no_grad():
                _eager(teacher.model)(normalize(runtime.batch(images), spec.mean, spec.std))
            if time.monotonic() - saved >= SAVE_EVERY_SECONDS:
                save_torch(partial, seal({"identity": identity, "batches_done": done, "sums": sums.state()}))
                saved = time.monotonic()
    finally:
        for handle in handles:
            handle.remove()
    description = {
        **identity,
        "teacher": teacher.source,
        "arch": teacher.arch,
        "num_classes": len(dataset.classes),
        "image_size": spec.image_size,
        "images": len(dataset),
        "layers": [name for name, _ in matched_layers(teacher.model, convolutions=True)],
    }
    description = write_statistics(path, _targets_of(sums, len(dataset)), description)
    partial.unlink(missing_ok=True)
    log(f"wrote the statistics of {teacher.source} to {path}")
    return description


def _fix(path: Path) -> str:
    return f"give --stats-dir another folder for this run's statistics, or remove {path.name} there to compute it again"


def teacher_statistics(
    config: StatsConfig,
    teachers: Sequence[Teacher],
    dataset: ImageDataset,
    runtime: Runtime,
    compute: bool = True,
    log: Callable[[str], None] = print,
    data_sha256: str | None = None,
) -> list[tuple[TeacherTargets, dict[str, Any]]]:
    """Each teacher's statistics targets and file description, computed first where missing.

    A file made for another teacher, dataset, holdout or data is refused (one line); one made with
    another batch size or seed is used as it is (its description says how it was made).

    Args:
        compute: False to refuse a missing file instead of computing it (several processes).
        data_sha256: the dataset's content when the caller has it (computed here otherwise).
    """
    spec = get_dataset_spec(config.dataset)
    data_sha256 = data_sha256 or _data_sha256(config, spec, log)
    out = []
    for teacher in teachers:
        path = statistics_file(teacher, config.stats_dir)
        defining = ("teacher_sha256", "dataset", "holdout", "data_sha256")
        expected = {k: v for k, v in _identity(teacher, spec, config, data_sha256).items() if k in defining}
        description = read_statistics_description(path, expected, _fix(path), log)
        if description is None:
            if not compute:
                raise FadrmError(
                    f"the statistics of {teacher.source} are missing ({path}); compute them first in one "
                    "process with fadrm stats"
                )
            log(f"computing the statistics of {teacher.source} (one pass over {len(dataset)} training images)")
            with exclusive_file(path, "--stats-dir"):  # one pass per file: a second process is refused
                description = compute_teacher_statistics(
                    teacher, dataset, spec, config, runtime, path, log, data_sha256
                )
        out.append((load_targets(path, teacher, description["cell"]), description))
    return out


def load_targets(path: Path, teacher: Teacher, cell: int) -> TeacherTargets:
    """A statistics file as the matcher's targets for ``teacher``."""
    tensors = read_statistics(path)

    def pair(name: str, stat: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        keys = (f"{name}:{stat}_mean", f"{name}:{stat}_var")
        return (tensors[keys[0]], tensors[keys[1]]) if keys[0] in tensors else None

    return TeacherTargets(
        cell,
        {
            name: LayerTargets(
                pair(name, "channel"), pair(name, "patch"), pair(name, "class_channel"), pair(name, "class_patch")
            )
            for name, _ in matched_layers(teacher.model, convolutions=True)
        },
    )


def distill_statistics_config(distill: DistillConfig) -> StatsConfig:
    """The statistics settings a distillation uses: its dataset, teachers, data and holdout, the
    preset's batch size."""
    options = {
        k: getattr(distill, k)
        for k in ("dataset", "teachers", "data_root", "holdout", "teacher_arch", "stats_dir", "device")
    }
    return resolve(StatsConfig, options)


def compute_statistics(config: StatsConfig, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """``fadrm stats``: write each teacher's statistics file (finished ones with the same settings
    are kept; an unfinished pass resumes). Returns the files' descriptions."""
    validate(config)
    spec = get_dataset_spec(config.dataset)
    runtime = make_runtime(config.device, "off")
    dataset = load_split(spec, "train", config.data_root, config.holdout)
    teachers = load_teachers(config.teachers, spec, dataset.classes, runtime, config.teacher_arch, config.holdout)
    data_sha256 = _data_sha256(config, spec, log)
    descriptions = []
    for teacher in teachers:
        path = statistics_file(teacher, config.stats_dir)
        fix = "pass --overwrite to compute it again"
        identity = _identity(teacher, spec, config, data_sha256)
        description = None if config.overwrite else read_statistics_description(path, identity, fix, log)
        if description is None:
            with exclusive_file(path, "--stats-dir"):  # one pass per file: a second process is refused
                description = compute_teacher_statistics(
                    teacher, dataset, spec, config, runtime, path, log, data_sha256
                )
        else:
            log(f"the statistics of {teacher.source} are already in {path}")
        descriptions.append(description)
    return descriptions
