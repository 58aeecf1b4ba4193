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

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..augment import random_resized_crop_box, resize
from ..config import PatchConfig, difficulty_band
from ..data import ImageDataset, normalize
from ..errors import FadrmError
from ..registry import Registry
from ..runtime import Runtime


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
    """Choose and stitch ``ipc`` initial images of class ``label``, in [0, 1], shape (ipc, C, S, S).

    Returns the images and a record of the selection (source indices, scores).
    """
    needed = ipc * settings.factor**2
    pool = dataset.indices_of_class(label)
    if len(pool) < needed:
        raise FadrmError(
            f"class {label} ({dataset.classes[label]}) has {len(pool)} training images; IPC {ipc} with "
            f"factor {settings.factor} needs {needed}; lower --ipc"
        )
    order = torch.randperm(len(pool), generator=generator)[: max(settings.mipc, needed)]
    candidates = [pool[i] for i in order.tolist()]
    crop_size = image_size // settings.factor
    to_full_size = SCORING_INPUTS.get(settings.scoring)
    crops = []
    for index in candidates:
        image = dataset.load(index).float().div_(255)
        for _ in range(settings.num_crop):
            top, left, h, w = random_resized_crop_box(
                generator, image.shape[-2], image.shape[-1], settings.crop_scale, (1.0, 1.0)
            )
            crops.append(resize(image[None, :, top : top + h, left : left + w], crop_size)[0])
    crops_t = torch.stack(crops)
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
