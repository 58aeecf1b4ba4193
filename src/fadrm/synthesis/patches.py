"""Realistic patch selection (RDED-style): the initial images P0 and ARC's residual source.

Per class: take ``mipc`` real images, ``num_crop`` square random-resized crops
of each, score every crop by the teacher's cross-entropy on the true class,
keep each image's best crop, sort the kept crops by score and take a band of
``ipc * factor**2`` of them; stitch ``factor x factor`` crops into each image.

With ``factor`` > 1 a crop is smaller than the teacher's input, so it has to be
brought to full size before scoring (``PatchConfig.scoring``):

* ``"pad"`` (default, RDED's published behaviour): the normalised crop sits at
  the centre of an otherwise zero canvas.  Zero in normalised space is the
  dataset mean colour, not black, because RDED pads after normalising.
* ``"resize"``: the crop is bilinearly upsampled to fill the whole canvas.

With ``factor`` 1 the crop is already full size and both give the same input.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..augment import random_resized_crop_box, resize
from ..config import DistillConfig, PatchConfig, difficulty_band
from ..config.options import key_of, option_fields
from ..data import ImageDataset, normalize
from ..errors import FadrmError
from ..registry import Registry
from ..seeding import make_generator
from ..runtime import Runtime
from ..training import available_cores


def indices_by_class(targets: Sequence[int]) -> dict[int, list[int]]:
    """Each class's indices, in order."""
    pools: dict[int, list[int]] = {}
    for index, label in enumerate(targets):
        pools.setdefault(label, []).append(index)
    return pools


# Built once per run and reused by every batch (a set is keyed by its content's id).
@functools.lru_cache(maxsize=2)
def class_pools(dataset: ImageDataset) -> dict[int, list[int]]:
    """:func:`indices_by_class` of a dataset's targets, made once per dataset."""
    return indices_by_class(dataset.targets)


def pad_to_canvas(batch: torch.Tensor, size: int) -> torch.Tensor:
    """Centre a normalised batch (N, C, h, w) on a zero ``size x size`` canvas.

    Placement as RDED's ``pad``: ``(size - h) // 2`` rows above, the rest below
    (likewise for columns), so an odd remainder goes to the bottom and right.
    The zeros are in normalised space, i.e. the dataset mean colour.
    """
    vertical = size - batch.shape[-2]
    horizontal = size - batch.shape[-1]
    if vertical < 0 or horizontal < 0:
        raise ValueError(f"cannot pad a {tuple(batch.shape[-2:])} batch to {size} x {size}")
    top, left = vertical // 2, horizontal // 2
    # RDED (LINs-lab/RDED synthesize/utils.py, pad() and selector()) F.pads with its default 0
    # crops its transform has already normalised, so the fill is the mean colour, not black.
    return F.pad(batch, (left, horizontal - left, top, vertical - top))


# How a normalised batch of crops becomes the teacher's full-size input (``patches.scoring``).
SCORING_INPUTS: Registry[Callable[[torch.Tensor, int], torch.Tensor]] = Registry("patch scoring")
SCORING_INPUTS.add("pad", pad_to_canvas)
SCORING_INPUTS.add("resize", resize)


def band_start(num_scored: int, needed: int, difficulty: str | float) -> int:
    """Index of the first kept crop in the ascending-loss order for a difficulty band."""
    spare = num_scored - needed
    if difficulty == "easy":
        return 0
    if difficulty == "hard":
        return spare
    if difficulty == "medium":
        return spare // 2
    problem = difficulty_band(difficulty)
    if problem:
        raise FadrmError(f"--difficulty {problem}, got {difficulty!r}")
    quantile = float(difficulty)
    return round(quantile * spare)


def stitch(patches: torch.Tensor, factor: int) -> torch.Tensor:
    """Tile ``factor**2 * n`` patches into n images: image i uses patches i, n+i, 2n+i, ... row-major."""
    if factor == 1:
        return patches
    n = len(patches) // factor**2
    tiles = patches.view(factor, factor, n, *patches.shape[1:])  # (row, col, image, C, h, w)
    rows = torch.cat(list(tiles.permute(0, 2, 3, 4, 1, 5).flatten(-2).unbind(0)), dim=-2)
    return rows


# The settings of a distillation that a class's patch selection depends on, besides the patch options.
SELECTION_SETTINGS = ("dataset", "ipc", "seed", "holdout", "teacher_arch")


def selection_inputs(config: DistillConfig, teacher_sha256: str | None, data_sha256: str | None) -> dict[str, Any]:
    """What a class's selected patches depend on, and nothing else: the dataset's content and split, the
    IPC and seed, the patch options and the scoring teacher's file hash. A run whose inputs are these
    reuses a selection recorded with them (after ``--overwrite`` with other synthesis settings, or
    another method that selects patches the same way)."""
    patch_keys = {key_of(f) for _, f in option_fields(PatchConfig)}
    settings = {k: v for k, v in config.identity().items() if k in patch_keys or k in SELECTION_SETTINGS}
    return {**settings, "teacher_sha256": teacher_sha256, "data_sha256": data_sha256}


def class_size_problem(images: int, label: int, class_name: str, ipc: int, settings: PatchConfig) -> str | None:
    """Why a class of ``images`` training images cannot give ``ipc`` images of patches, or None."""
    needed = ipc * settings.factor**2
    if images >= needed:
        return None
    return (
        f"class {label} ({class_name}) has {images} training images; IPC {ipc} with factor {settings.factor} "
        f"needs {needed}; lower --ipc"
    )


def patch_candidates(
    pool: Sequence[int], label: int, class_name: str, ipc: int, settings: PatchConfig, generator: torch.Generator
) -> list[int]:
    """The ``mipc`` real images of one class whose crops are scored: a seeded draw from ``pool``, the
    class's dataset indices (the first draw from ``generator``; the crops' boxes follow)."""
    problem = class_size_problem(len(pool), label, class_name, ipc, settings)
    if problem:
        raise FadrmError(problem)
    needed = ipc * settings.factor**2
    order = torch.randperm(len(pool), generator=generator)[: max(settings.mipc, needed)]
    return [pool[i] for i in order.tolist()]


Box = tuple[int, int, int, int]


def draw_crop_boxes(size: tuple[int, int], settings: PatchConfig, generator: torch.Generator) -> list[Box]:
    """The ``num_crop`` square random-resized crop boxes of one candidate image of ``size`` (H, W)."""
    return [
        random_resized_crop_box(generator, size[0], size[1], settings.crop_scale, (1.0, 1.0))
        for _ in range(settings.num_crop)
    ]


def crop_candidate(image: torch.Tensor, boxes: Sequence[Box], crop_size: int) -> torch.Tensor:
    """A uint8 (C, H, W) image's crops at ``boxes``, each resized to ``crop_size``: (crops, C, s, s) in [0, 1]."""
    image = image.float().div_(255)
    return torch.stack(
        [resize(image[None, :, top : top + h, left : left + w], crop_size)[0] for top, left, h, w in boxes]
    )


@torch.no_grad()
def select_class_patches(
    dataset: ImageDataset,
    label: int,
    ipc: int,
    teacher: nn.Module,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    image_size: int,
    settings: PatchConfig,
    generator: torch.Generator,
    runtime: Runtime,
    batch_size: int = 256,
) -> tuple[torch.Tensor, dict]:
    """Choose and stitch ``ipc`` initial images of class ``label``, in [0, 1], shape (ipc, C, S, S),
    loading the candidates one by one in this process (``fadrm distill`` crops all classes'
    candidates ahead with loader workers: :func:`cropped_in_order`).

    Returns the images and a record of the selection (source indices, scores).
    """
    candidates = patch_candidates(
        dataset.indices_of_class(label), label, dataset.classes[label], ipc, settings, generator
    )
    boxes = [draw_crop_boxes(dataset.size_of(index), settings, generator) for index in candidates]
    crops = cropped_in_order(dataset, candidates, boxes, image_size // settings.factor, workers=0)
    return select_from_crops(
        candidates, crops, label, ipc, teacher, mean, std, image_size, settings, runtime, batch_size
    )


@torch.no_grad()
def select_from_crops(
    candidates: Sequence[int],
    crops: Iterable[torch.Tensor],
    label: int,
    ipc: int,
    teacher: nn.Module,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    image_size: int,
    settings: PatchConfig,
    runtime: Runtime,
    batch_size: int = 256,
) -> tuple[torch.Tensor, dict]:
    """:func:`select_class_patches` from the candidates' crops (:func:`crop_candidate`), in candidate order:
    score every crop, keep each image's best, take the difficulty band, stitch."""
    needed = ipc * settings.factor**2
    crop_size = image_size // settings.factor
    to_full_size = SCORING_INPUTS.get(settings.scoring)
    crops_t = torch.cat(list(crops))
    scores = []
    target = torch.full((batch_size,), label, dtype=torch.long, device=runtime.device)
    for chunk in crops_t.split(batch_size):
        batch = normalize(runtime.batch(chunk), mean, std)
        if image_size != crop_size:
            # Score each patch at the size the teacher was trained on (padded or upsampled).
            batch = to_full_size(batch, image_size)
        with runtime.autocast():
            logits = teacher(batch)
        scores.append(F.cross_entropy(logits.float(), target[: len(chunk)], reduction="none").cpu())
    per_crop = torch.cat(scores).view(len(candidates), settings.num_crop)
    best_score, best_crop = per_crop.min(dim=1)
    best = crops_t.view(len(candidates), settings.num_crop, *crops_t.shape[1:])[
        torch.arange(len(candidates)), best_crop
    ]
    ranked = best_score.argsort(stable=True)
    start = band_start(len(candidates), needed, settings.difficulty)
    chosen = ranked[start : start + needed]
    images = stitch(best[chosen], settings.factor)
    record = {
        "class": label,
        "source_indices": [candidates[i] for i in chosen.tolist()],
        "scores": [round(float(best_score[i]), 6) for i in chosen.tolist()],
        "candidates": len(candidates),
    }
    return images.clamp_(0, 1), record


class _Sizes(Dataset):
    """(H, W) of the images at ``indices`` (header reads, by loader workers when there are any)."""

    def __init__(self, dataset: ImageDataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, int]:
        return self.dataset.size_of(self.indices[position])


class _Crops(Dataset):
    """The crops of the images at ``indices`` at their boxes: decoded, cropped and resized where loaded."""

    def __init__(
        self, dataset: ImageDataset, indices: Sequence[int], boxes: Sequence[Sequence[Box]], crop_size: int
    ) -> None:
        self.dataset, self.indices, self.boxes, self.crop_size = dataset, list(indices), list(boxes), crop_size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> torch.Tensor:
        return crop_candidate(self.dataset.load(self.indices[position]), self.boxes[position], self.crop_size)


def _in_order(items: Dataset, workers: int) -> Iterator:
    """``items`` in order, made by ``workers`` loader processes (0: here, one by one)."""
    if workers == 0:
        return (items[k] for k in range(len(items)))
    # batch_size=None: one item at a time, as made (sizes differ between images); order is kept.
    loader = DataLoader(items, batch_size=None, shuffle=False, num_workers=workers, prefetch_factor=8)
    return iter(loader)


def image_sizes(dataset: ImageDataset, indices: Sequence[int], workers: int) -> list[tuple[int, int]]:
    """(H, W) of the images at ``indices``, read by ``workers`` loader processes (file headers only)."""
    return [tuple(size) for size in _in_order(_Sizes(dataset, indices), workers if dataset.decodes_files else 0)]


def cropped_in_order(
    dataset: ImageDataset, indices: Sequence[int], boxes: Sequence[Sequence[Box]], crop_size: int, workers: int
) -> Iterator[torch.Tensor]:
    """Each image's crops (:func:`crop_candidate`), in ``indices`` order, made by ``workers`` loader
    processes: decoding, cropping and resizing run there, so the same pixels whatever the count."""
    return _in_order(_Crops(dataset, indices, boxes, crop_size), workers)


def crops_of_classes(
    dataset: ImageDataset,
    labels: Sequence[int],
    ipc: int,
    settings: PatchConfig,
    seed: int,
    crop_size: int,
    workers: int,
) -> tuple[dict[int, list[int]], Iterator[torch.Tensor]]:
    """Every class's candidates, and all their crops in class then candidate order (``workers`` loader
    processes decode, crop and resize them ahead of the scoring).

    Each class draws from its own generator in the order of one-by-one loading (its candidates,
    then each image's boxes, which need only the image's size), so the crops are those of
    :func:`select_class_patches` whatever the number of workers.
    """
    generators = {label: make_generator(seed, "patches", label) for label in labels}
    pools = class_pools(dataset)
    candidates = {
        label: patch_candidates(pools.get(label, []), label, dataset.classes[label], ipc, settings, generators[label])
        for label in labels
    }
    order = [i for label in labels for i in candidates[label]]
    sizes = iter(image_sizes(dataset, order, workers))
    boxes = [draw_crop_boxes(next(sizes), settings, generators[label]) for label in labels for _ in candidates[label]]
    return candidates, cropped_in_order(dataset, order, boxes, crop_size, workers)


def decode_workers(dataset: ImageDataset, workers: int | None) -> int:
    """Loader processes decoding the candidates: ``workers`` if given; by default, for images decoded
    from files, one per available core where there are more than two (on a 2-core machine two
    processes measured slower than decoding in this one: ``benchmarks/patch_speed.py``), and none
    for images already in memory."""
    if workers is not None:
        return workers
    cores = available_cores()
    return cores if dataset.decodes_files and cores > 2 else 0
