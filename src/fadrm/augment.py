"""Augmentation, every random draw from an explicit generator.

Three users, one module:

* synthesis (:class:`ViewParams`): each work unit's crop, flip and shift come
  from its own ``torch.Generator``, so several groups batched together each
  keep their own stream;
* student training and relabelling (:class:`ViewSampler`, :func:`render`): a
  batch's images, crops, flips, RandAugment (:mod:`fadrm.rand_augment`) and CutMix
  or MixUp (:data:`MIXES`) are a function of (seed, epoch, batch index) alone;
* teacher training (:func:`train_transform`, :class:`PadCropFlip`): the
  exception, drawing from torch's global RNG, which teacher training seeds
  once per epoch.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from .data.specs import DatasetSpec
from .rand_augment import apply_rand_augment, draw_rand_augment
from .registry import Registry
from .runtime import Runtime, prefetched, to_device
from .seeding import derive_seed, make_generator


# --------------------------------------------------------- crop and resize
# The draws below come from CPU generators into CPU tensors, read with ``tolist``: a plain read of
# host memory (``float(t)`` would dispatch a scalar read, the operation that stalls a GPU when the
# tensor lives there, and the host-cost count would mistake these for one).
def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=gen).tolist()


def _randint(gen: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high] inclusive."""
    return torch.randint(low, high + 1, (), generator=gen).tolist()


def coin_flip(gen: torch.Generator) -> bool:
    """True with probability one half (torchvision's flip rule: a uniform draw below 0.5)."""
    return torch.rand((), generator=gen).tolist() < 0.5


def random_resized_crop_box(
    gen: torch.Generator,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random-resized crop, torchvision's sampling rule with our generator."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(gen, *scale)
        aspect = math.exp(_uniform(gen, *log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return _randint(gen, 0, height - h), _randint(gen, 0, width - w), h, w
    return central_crop_box(height, width, ratio)


def central_crop_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """The random-resized crop's fallback when no try fits: the largest central crop within the ratio bounds."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# Attempts at a crop inside the image per draw, torchvision's RandomResizedCrop rule.
CROP_ATTEMPTS = 10


def random_resized_crop_boxes(
    gen: torch.Generator,
    count: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> list[tuple[int, int, int, int]]:
    """``count`` random-resized crop boxes (top, left, h, w) drawn together in a fixed number of tensor
    operations: :func:`random_resized_crop_box`'s rule for each (the first of ten area and aspect draws
    that fits, else the largest central crop within the ratio bounds), from one block of draws.

    The draws are (count x 10) areas, (count x 10) aspects, then count tops and count lefts, in that
    order, in float64; their order is part of every student result (:data:`VIEWS_VERSION`).
    """
    if count == 0:
        return []
    area = height * width
    areas = area * (
        scale[0] + (scale[1] - scale[0]) * torch.rand(count, CROP_ATTEMPTS, generator=gen, dtype=torch.float64)
    )
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspects = torch.exp(
        log_low + (log_high - log_low) * torch.rand(count, CROP_ATTEMPTS, generator=gen, dtype=torch.float64)
    )
    widths = torch.round(torch.sqrt(areas * aspects))
    heights = torch.round(torch.sqrt(areas / aspects))
    fits = (widths > 0) & (widths <= width) & (heights > 0) & (heights <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first attempt that fits (0 if none)
    h = heights.gather(1, first)[:, 0]
    w = widths.gather(1, first)[:, 0]
    tops = torch.floor(torch.rand(count, generator=gen, dtype=torch.float64) * (height - h + 1))
    lefts = torch.floor(torch.rand(count, generator=gen, dtype=torch.float64) * (width - w + 1))
    boxes = [
        (int(t), int(left), int(hh), int(ww))
        for t, left, hh, ww in zip(tops.tolist(), lefts.tolist(), h.tolist(), w.tolist())
    ]
    for position, fitted in enumerate(fits.any(dim=1).tolist()):
        if not fitted:
            boxes[position] = central_crop_box(height, width, ratio)
    return boxes


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of a batch to size x size (antialiased when shrinking)."""
    if images.shape[-2:] == (size, size):
        return images
    shrinking = images.shape[-1] > size or images.shape[-2] > size
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking)


@dataclass(frozen=True)
class ViewParams:
    """One group's augmentation for one iteration: crop box, flip, and circular shift."""

    box: tuple[int, int, int, int]
    flip: bool
    shift: tuple[int, int]

    @staticmethod
    def sample(gen: torch.Generator, size: int, jitter: int, scale: tuple[float, float]) -> "ViewParams":
        box = random_resized_crop_box(gen, size, size, scale)
        flip = coin_flip(gen)
        shift = (_randint(gen, 0, jitter), _randint(gen, 0, jitter))
        return ViewParams(box, flip, shift)

    def apply(self, images: torch.Tensor, size: int) -> torch.Tensor:
        """Crop, resize back to ``size``, flip, then roll by ``shift`` (the published order)."""
        top, left, h, w = self.box
        view = resize(images[..., top : top + h, left : left + w], size)
        if self.flip:
            view = view.flip(-1)
        if self.shift != (0, 0):
            view = torch.roll(view, shifts=self.shift, dims=(-2, -1))
        return view


# ----------------------------------------------------------- student views
# How a student batch's views are drawn from its generator. 1 (fadrm 0.1 to 0.3): a crop box and a flip
# image by image; 2: the batch's boxes, then its flips, each in one block of draws. Part of every student's
# and label store's identity: results of another version are made again.
VIEWS_VERSION = 2


@dataclass(frozen=True)
class BatchView:
    """Everything random about one training batch."""

    indices: torch.Tensor  # which images, in batch order
    boxes: list[tuple[int, int, int, int]]  # random-resized crop per image
    flips: list[bool]
    lam: float  # weight of the image itself after mixing (1.0: no mixing)
    partner: torch.Tensor  # batch position mixed into each position
    cut_box: tuple[int, int, int, int] | None  # CutMix rectangle (top, left, h, w)
    # RandAugment's operations per image, applied to the whole image before its crop (empty: none).
    augment_ops: tuple[tuple[tuple[str, float], ...], ...] = ()


# ------------------------------------------------------------------ mixing
Box = tuple[int, int, int, int]
# (generator, output side, alpha) -> (weight of the image itself, CutMix rectangle or None).
# The generator is the batch's own (see ViewSampler.view); each entry's draws are part of
# every stored result, so an entry's draws and their order must never change.
MixFn = Callable[[np.random.Generator, int, float], tuple[float, Box | None]]
MIXES: Registry[MixFn] = Registry("mix")


def cutmix(rng: np.random.Generator, size: int, alpha: float) -> tuple[float, Box | None]:
    """A rectangle of the partner pasted in: its side from lam ~ Beta(alpha, alpha), its centre uniform.

    The label weight is recomputed from the rectangle once clipped to the image.
    """
    lam = float(rng.beta(alpha, alpha))
    cut = np.sqrt(1.0 - lam)
    h, w = int(size * cut), int(size * cut)
    cy, cx = int(rng.integers(size)), int(rng.integers(size))
    top, bottom = np.clip([cy - h // 2, cy + h // 2], 0, size)
    left, right = np.clip([cx - w // 2, cx + w // 2], 0, size)
    cut_box = (int(top), int(left), int(bottom - top), int(right - left))
    # The label weight is the share of pixels really kept.
    lam = 1.0 - (cut_box[2] * cut_box[3]) / (size * size)
    return lam, cut_box


def mixup(rng: np.random.Generator, size: int, alpha: float) -> tuple[float, Box | None]:
    """A pixel-wise blend with the partner, lam ~ Beta(alpha, alpha)."""
    return float(rng.beta(alpha, alpha)), None


def no_mix(rng: np.random.Generator, size: int, alpha: float) -> tuple[float, Box | None]:
    """No mixing: every image is itself (draws nothing)."""
    return 1.0, None


MIXES.add("cutmix", cutmix)
MIXES.add("mixup", mixup)
MIXES.add("none", no_mix)


class ViewSettings(Protocol):
    """What a student run's views are drawn from (an :class:`~fadrm.config.EvalConfig` has these)."""

    seed: int
    crop_scale: Sequence[float]
    mix: str
    mix_alpha: float
    augment: bool
    rand_augment: bool


@dataclass(frozen=True)
class ViewSampler:
    """Draws batches and views from (seed, epoch, batch index) alone.

    Attributes:
        seed: run seed.
        size: output side.
        scale: area range of the random-resized crop (0.08-1, as published).
        mix: an entry of :data:`MIXES` ("cutmix", "mixup" or "none").
        mix_alpha: Beta(alpha, alpha) parameter of the mixing weight.
        augment: False: every view is the whole image, unflipped and unmixed (only the order is random).
        rand_augment: RandAugment each image before its crop (EDC), from a generator of its own so
            the other draws stay those of a view without it.
    """

    seed: int
    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    mix: str = "cutmix"
    mix_alpha: float = 1.0
    augment: bool = True
    rand_augment: bool = False

    @classmethod
    def from_config(cls, config: ViewSettings, size: int) -> ViewSampler:
        """The views of a student run with ``config``'s settings at ``size`` px (live and stored labels alike)."""
        scale = (config.crop_scale[0], config.crop_scale[1])
        return cls(config.seed, size, scale, config.mix, config.mix_alpha, config.augment, config.rand_augment)

    def batches(self, epoch: int, num_images: int, batch_size: int) -> list[torch.Tensor]:
        """This epoch's shuffled batches of image indices."""
        order = torch.randperm(num_images, generator=make_generator(self.seed, "order", epoch))
        return list(order.split(batch_size))

    def view(self, epoch: int, batch_index: int, indices: torch.Tensor, height: int, width: int) -> BatchView:
        """The random views of one batch."""
        if not self.augment:
            return BatchView(
                indices,
                [(0, 0, height, width)] * len(indices),
                [False] * len(indices),
                1.0,
                torch.arange(len(indices)),
                None,
            )
        gen = make_generator(self.seed, "view", epoch, batch_index)
        # The whole batch's crops and flips in a few tensor operations (VIEWS_VERSION 2), not image by image.
        boxes = random_resized_crop_boxes(gen, len(indices), height, width, self.scale)
        flips = (torch.rand(len(indices), generator=gen) < 0.5).tolist()
        partner = torch.randperm(len(indices), generator=gen)
        mix = MIXES.get(self.mix)
        lam, cut_box = 1.0, None
        if len(indices) > 1:  # a batch of one has no partner to mix with
            rng = np.random.default_rng(derive_seed(self.seed, "mix", epoch, batch_index))
            lam, cut_box = mix(rng, self.size, self.mix_alpha)
        augment_ops: tuple[tuple[tuple[str, float], ...], ...] = ()
        if self.rand_augment:
            augment_gen = make_generator(self.seed, "rand-augment", epoch, batch_index)
            augment_ops = tuple(draw_rand_augment(augment_gen, max(height, width)) for _ in range(len(indices)))
        return BatchView(indices, boxes, flips, lam, partner, cut_box, augment_ops)


# ------------------------------------------------- batched crop and resize
# The [0, 1] value of each uint8 level as the CPU divides (CUDA divides by a scalar as a
# multiplication by its reciprocal, which can differ in the last bit), in float64 for
# fused_multiply_add.
_UNIT_VALUES = torch.arange(256, dtype=torch.float32).div(255).double()


@functools.lru_cache(maxsize=None)
def _unit_values_on(device: torch.device) -> torch.Tensor:
    """``_UNIT_VALUES`` on ``device``, copied there once rather than for every batch."""
    return to_device(_UNIT_VALUES, device)


def _float32(values: torch.Tensor) -> torch.Tensor:
    """float64 ``values`` rounded once to float32, kept as float64."""
    return values.float().double()


def fused_multiply_add(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``a * b + c`` rounded once to float32, as a fused multiply-add instruction computes it, on any device.

    ``a``, ``b`` and ``c`` are broadcastable float64 tensors holding float32 values, and so is
    the result. The product is exact in float64. The float64 sum is made round-to-odd (where
    Knuth's two-sum finds it inexact and its last bit is even, it moves one step towards the
    exact value); rounding that to float32, 29 bits shorter, rounds the exact value correctly.
    """
    product = a * b
    total = product + c
    addend_part = total - product
    error = (product - (total - addend_part)) + (c - addend_part)
    make_odd = (error != 0) & ((total.view(torch.int64) & 1) == 0)
    towards_error = torch.where(error > 0, math.inf, -math.inf).to(total)
    return _float32(torch.where(make_odd, torch.nextafter(total, towards_error), total))


def _bilinear_taps(lengths: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices and weights of ``size`` outputs per crop side, as PyTorch's CPU bilinear upsample computes them.

    ``lengths`` is int64 (B,) on the CPU, each at most ``size``. Returns (first index, second
    index, first weight, second weight), each (B, size), the weights float64 holding float32
    values. The source coordinate max(in / out * (d + 0.5) - 0.5, 0) is one fused
    multiply-add, as in PyTorch's x86 build; a side equal to ``size`` is copied.
    """
    outputs = torch.arange(size)
    scale = (lengths.float() / torch.tensor(float(size))).double()[:, None]
    source = fused_multiply_add(scale, outputs.double() + 0.5, torch.tensor(-0.5, dtype=torch.float64)).float()
    source = source.clamp_min(0)
    last = lengths[:, None] - 1
    first = source.floor().long().minimum(last)
    second_weight = (source - first.float()).clamp(0, 1)
    second = first + (first < last).long()
    copied = lengths[:, None] == size
    first = torch.where(copied, outputs, first)
    second = torch.where(copied, outputs, second)
    second_weight = torch.where(copied, 0.0, second_weight)
    return first, second, (1 - second_weight).double(), second_weight.double()


def _sums_corners_at_once(channels: int, size: int) -> bool:
    """Whether PyTorch's CPU bilinear upsample of a float32 (1, C, h, w) crop to ``size`` sums its four corners at once.

    Its vectorised channels-last kernel does, for outputs up to 64 x 64 px and for 3-channel
    images whenever torch uses one thread; its generic kernel sums along each row first, then
    between the rows. The two round differently.
    """
    return 2 * size <= 128 or (channels == 3 and torch.get_num_threads() == 1)


def upsampled_crops(images: torch.Tensor, boxes: list[Box], flips: list[bool], size: int) -> torch.Tensor:
    """Each image's crop bilinearly resized to ``size`` and flipped where asked, in a fixed number of tensor ops.

    ``images`` is uint8 (B, C, H, W) on any device, with one crop box (top, left, h, w) and
    flip per image; returns float32 [0, 1] (B, C, size, size) on that device. For boxes no
    larger than ``size`` and images of up to 3 channels these are bitwise the numbers of
    :func:`resize` on each [0, 1] crop on an x86 CPU: the kernel's indices and weights
    (:func:`_bilinear_taps`), its order of sums (:func:`_sums_corners_at_once`) and its fused
    multiply-adds, in float64 arithmetic that every device rounds alike.
    """
    device, count, (channels, height, width) = images.device, len(images), images.shape[1:]
    tops, lefts, heights, widths = torch.tensor(boxes).unbind(1)
    rows = _bilinear_taps(heights, size)
    # A flipped crop reads its columns right to left: each output pixel is computed on its own,
    # so this is exactly the resized crop flipped.
    flipped = torch.tensor(flips)[:, None]
    cols = [torch.where(flipped, taps.flip(-1), taps) for taps in _bilinear_taps(widths, size)]
    # Rows broadcast as (B, size, 1), columns as (B, 1, size): outputs are (B, size, size, C),
    # channels innermost as in the kernel. Indices address the batch's pixels as (B * H * W, C).
    row_starts = (tops + torch.arange(count) * height)[:, None]
    row_index = [to_device(((taps + row_starts) * width)[:, :, None], device) for taps in rows[:2]]
    col_index = [to_device((taps + lefts[:, None])[:, None, :], device) for taps in cols[:2]]
    row_weight = [to_device(weights[:, :, None, None], device) for weights in rows[2:]]
    col_weight = [to_device(weights[:, None, :, None], device) for weights in cols[2:]]
    pixels = _unit_values_on(device)[images.long()].permute(0, 2, 3, 1).reshape(-1, channels)
    (c00, c01), (c10, c11) = [[pixels[r + c] for c in col_index] for r in row_index]
    if _sums_corners_at_once(channels, size):
        # i00 * w00 + i01 * w01 + i10 * w10 + i11 * w11 with float32 weights w = row * column,
        # contracted by the compiler into three fused multiply-adds.
        (w00, w01), (w10, w11) = [[_float32(r * c) for c in col_weight] for r in row_weight]
        out = fused_multiply_add(c00, w00, _float32(c01 * w01))
        out = fused_multiply_add(c10, w10, out)
        out = fused_multiply_add(c11, w11, out)
    else:
        # Along each row, then between the two rows.
        top, bottom = (
            fused_multiply_add(first, col_weight[0], _float32(second * col_weight[1]))
            for first, second in ((c00, c01), (c10, c11))
        )
        out = fused_multiply_add(top, row_weight[0], _float32(bottom * row_weight[1]))
    return out.float().permute(0, 3, 1, 2).contiguous()


def _resized_crop(images: torch.Tensor, index: int, box: Box, flip: bool, size: int) -> torch.Tensor:
    """One image's crop in [0, 1], resized to ``size`` on the CPU by :func:`resize` and flipped where asked."""
    top, left, h, w = box
    crop = resize(images[index : index + 1, :, top : top + h, left : left + w].cpu().float().div(255), size)
    return crop.flip(-1) if flip else crop


def render(images: torch.Tensor, view: BatchView, size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The batch's pixels in [0, 1] on ``device`` (default: the images'): RandAugment (if drawn), crops, flips,
    then CutMix or MixUp.

    ``images`` is uint8 (N, C, H, W). On the CPU each crop is resized by its own kernel call,
    faster there than the batched arithmetic of :func:`upsampled_crops`; on another device
    (CUDA) the batch's images are moved there and all its crops resized at once, to the same
    numbers as on an x86 CPU. A crop larger than ``size`` (in a set whose images are larger
    than the output) is shrunk, antialiased, on the CPU in either case.
    """
    device = images.device if device is None else torch.device(device)
    source, positions = images, view.indices.tolist()
    if view.augment_ops:
        # RandAugment changes each whole image before its crop (EDC's order), one image at a time.
        source = torch.stack([apply_rand_augment(images[i], ops) for i, ops in zip(positions, view.augment_ops)])
        positions = list(range(len(positions)))
    crops = list(zip(positions, view.boxes, view.flips))
    if device.type == "cpu":
        batch = torch.cat([_resized_crop(source, *crop, size) for crop in crops])
    else:
        chosen = source[torch.tensor(positions, device=source.device)]
        batch = upsampled_crops(to_device(chosen, device), view.boxes, view.flips, size)
        for position, (index, box, flip) in enumerate(crops):
            if box[2] > size or box[3] > size:
                batch[position] = to_device(_resized_crop(source, index, box, flip, size)[0], device)
    return mixed_batch(batch, view)


def epoch_views(
    sampler: ViewSampler, epoch: int, images: torch.Tensor, batch_size: int, runtime: Runtime
) -> Iterator[tuple[int, torch.Tensor, BatchView, torch.Tensor]]:
    """Each batch of an epoch: (its position, its image indices, its view, its pixels in [0, 1] on the
    runtime's device), rendered where the runtime says (``host_views``) and, with ``prefetch_views``, one
    batch ahead in a background thread. The pixels are the same either way."""
    height, width = images.shape[-2], images.shape[-1]
    where = torch.device("cpu") if runtime.host_views else runtime.device

    def draw() -> Iterator[tuple[int, torch.Tensor, BatchView, torch.Tensor]]:
        for b, indices in enumerate(sampler.batches(epoch, len(images), batch_size)):
            view = sampler.view(epoch, b, indices, height, width)
            yield b, indices, view, to_device(render(images, view, sampler.size, where), runtime.device)

    return prefetched(draw()) if runtime.prefetch_views else draw()


def mixed_batch(batch: torch.Tensor, view: BatchView) -> torch.Tensor:
    """The rendered ``batch`` with each image's partner mixed in as ``view`` says (CutMix's rectangle or
    MixUp's weighted sum); the batch itself when the view mixes nothing."""
    if view.lam == 1.0:
        return batch
    other = batch[to_device(view.partner, batch.device)]
    if view.cut_box is None:
        return view.lam * batch + (1 - view.lam) * other
    top, left, h, w = view.cut_box
    mixed = batch.clone()
    mixed[:, :, top : top + h, left : left + w] = other[:, :, top : top + h, left : left + w]
    return mixed


# -------------------------------------------------------- teacher training
def train_transform(spec: DatasetSpec, image_size: int | None = None) -> v2.Compose:
    """Teacher-training augmentation: uint8 (C, H, W) in, float [0, 1] out.

    The one augmentation without an explicit generator: it draws from torch's global RNG,
    which teacher training seeds once per epoch (:func:`fadrm.seeding.epoch_seed`), so a
    resumed teacher run sees the same augmentations.
    """
    size = image_size or spec.image_size
    if spec.augment == "resized-crop":
        steps = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
        return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True)])
    return PadCropFlip(size, padding=size // 8)


class PadCropFlip:
    """Zero-pad, random crop back to ``size``, random horizontal flip; uint8 in, [0, 1] float out.

    The standard small-image augmentation written with plain tensor ops: the
    same maths as torchvision's v2 pipeline at a fraction of its per-sample
    overhead, which dominated teacher training on a 2-core CPU. Draws from torch's global RNG
    (seeded per epoch by teacher training), as :func:`train_transform` does.
    """

    def __init__(self, size: int, padding: int) -> None:
        self.size = size
        self.padding = padding

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.batch(image[None])[0]

    def batch(self, images: torch.Tensor) -> torch.Tensor:
        """The same augmentation drawn independently for each image of a (B, C, H, W) batch."""
        if images.shape[-1] != self.size or images.shape[-2] != self.size:
            images = v2.functional.resize(images, [self.size, self.size], antialias=True)
        p, n = self.padding, len(images)
        padded = torch.nn.functional.pad(images, (p, p, p, p))
        offsets = torch.randint(0, 2 * p + 1, (2, n, 1))
        steps = torch.arange(self.size)
        rows, cols = offsets[0] + steps, offsets[1] + steps  # (B, size) each
        flip = torch.rand(n, 1) < 0.5
        cols = torch.where(flip, cols.flip(-1), cols)
        crops = padded[torch.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (B, size, size, C)
        return crops.permute(0, 3, 1, 2).float().div_(255)
