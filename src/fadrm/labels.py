"""Soft labels on the exact view the student sees: live from the teacher(s), or stored and reused.

A training batch is fully determined by (seed, epoch, batch index): which
images, each image's random-resized crop and flip, and the batch's CutMix or
MixUp. Stored labels therefore keep only the teachers' outputs, never the
images or the view parameters (their seeds suffice), so stored and live
training see the same batches and the same labels.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .data import normalize
from .errors import FadrmError
from .io import atomic_path, read_json, write_json
from .runtime import Runtime
from .synthesis.augment import random_resized_crop_box, resize
from .synthesis.units import derive_seed, make_generator

MIX_MODES = ("cutmix", "mixup", "none")
STORED_FORMAT_VERSION = 1


@dataclass(frozen=True)
class BatchView:
    """Everything random about one training batch."""

    indices: torch.Tensor  # which images, in batch order
    boxes: list[tuple[int, int, int, int]]  # random-resized crop per image
    flips: list[bool]
    lam: float  # weight of the image itself after mixing (1.0: no mixing)
    partner: torch.Tensor  # batch position mixed into each position
    cut_box: tuple[int, int, int, int] | None  # CutMix rectangle (top, left, h, w)


@dataclass(frozen=True)
class ViewSampler:
    """Draws batches and views from (seed, epoch, batch index) alone.

    Attributes:
        seed: run seed.
        size: output side.
        scale: area range of the random-resized crop (0.08-1, as published).
        mix: "cutmix", "mixup" or "none".
        mix_alpha: Beta(alpha, alpha) parameter of the mixing weight.
    """

    seed: int
    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    mix: str = "cutmix"
    mix_alpha: float = 1.0

    def batches(self, epoch: int, num_images: int, batch_size: int) -> list[torch.Tensor]:
        """This epoch's shuffled batches of image indices."""
        order = torch.randperm(num_images, generator=make_generator(self.seed, "order", epoch))
        return list(order.split(batch_size))

    def view(self, epoch: int, batch_index: int, indices: torch.Tensor, height: int, width: int) -> BatchView:
        """The random views of one batch."""
        gen = make_generator(self.seed, "view", epoch, batch_index)
        boxes, flips = [], []
        for _ in range(len(indices)):
            boxes.append(random_resized_crop_box(gen, height, width, self.scale))
            flips.append(bool(torch.rand((), generator=gen) < 0.5))
        partner = torch.randperm(len(indices), generator=gen)
        lam, cut_box = 1.0, None
        if self.mix != "none" and len(indices) > 1:
            rng = np.random.default_rng(derive_seed(self.seed, "mix", epoch, batch_index))
            lam = float(rng.beta(self.mix_alpha, self.mix_alpha))
            if self.mix == "cutmix":
                cut = np.sqrt(1.0 - lam)
                h, w = int(self.size * cut), int(self.size * cut)
                cy, cx = int(rng.integers(self.size)), int(rng.integers(self.size))
                top, bottom = np.clip([cy - h // 2, cy + h // 2], 0, self.size)
                left, right = np.clip([cx - w // 2, cx + w // 2], 0, self.size)
                cut_box = (int(top), int(left), int(bottom - top), int(right - left))
                # The label weight is the share of pixels really kept.
                lam = 1.0 - (cut_box[2] * cut_box[3]) / (self.size * self.size)
        return BatchView(indices, boxes, flips, lam, partner, cut_box)


def render(images: torch.Tensor, view: BatchView, size: int) -> torch.Tensor:
    """The batch's pixels in [0, 1]: crops, flips, then CutMix or MixUp. ``images`` is uint8 (N, C, H, W)."""
    crops = []
    for index, (top, left, h, w), flip in zip(view.indices.tolist(), view.boxes, view.flips):
        crop = resize(images[index : index + 1, :, top : top + h, left : left + w].float().div(255), size)
        crops.append(crop.flip(-1) if flip else crop)
    batch = torch.cat(crops)
    if view.lam == 1.0:
        return batch
    other = batch[view.partner]
    if view.cut_box is None:
        return view.lam * batch + (1 - view.lam) * other
    top, left, h, w = view.cut_box
    mixed = batch.clone()
    mixed[:, :, top : top + h, left : left + w] = other[:, :, top : top + h, left : left + w]
    return mixed


# --------------------------------------------------------------- labellers
@contextlib.contextmanager
def batch_statistics(layers: Sequence[_BatchNorm]) -> Iterator[None]:
    """These BatchNorm layers normalise with batch statistics; their running statistics stay untouched.

    Only BatchNorm layers switch to train mode. The reference puts whole teachers in train
    mode, which also turns on the dropout of teachers that have it (MobileNetV2, AlexNet,
    EfficientNet) and makes their labels random; BSSL is about the statistics, so dropout stays off.
    """
    saved = [layer.momentum for layer in layers]
    try:
        for layer in layers:
            layer.train()
            layer.momentum = 0.0  # running = 1 * running + 0 * batch: unchanged
        yield
    finally:
        for layer, momentum in zip(layers, saved):
            layer.momentum = momentum
            layer.eval()


def halves(inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The two halves BSSL labels separately; an odd extra image goes to the second (as the reference)."""
    first = len(inputs) // 2
    return (inputs[:first], inputs[first:]) if first else (inputs,)


class TeacherLabeller:
    """Mean (optionally weighted) logits of several teachers on normalised inputs.

    With ``bssl`` the teachers' BatchNorm layers use the statistics of each half of
    the batch separately ("batch-specific soft labels"), their running statistics untouched.
    """

    def __init__(self, models: Sequence[nn.Module], weights: Sequence[float] | None = None, bssl: bool = False) -> None:
        if weights is not None and len(weights) != len(models):
            raise FadrmError(f"{len(weights)} teacher weights for {len(models)} teachers")
        self.models = list(models)
        total = sum(weights) if weights else len(models)
        self.weights = [w / total for w in weights] if weights else [1.0 / len(models)] * len(models)
        self.bssl = bssl
        # Found once: BSSL switches them for every batch.
        self.batchnorm_layers = [m for model in self.models for m in model.modules() if isinstance(m, _BatchNorm)]

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor, runtime: Runtime) -> torch.Tensor:
        context = batch_statistics(self.batchnorm_layers) if self.bssl else contextlib.nullcontext()
        chunks = halves(inputs) if self.bssl else (inputs,)
        with context, runtime.autocast():
            outputs = [
                torch.cat([model(chunk) for chunk in chunks]).float() * weight
                for model, weight in zip(self.models, self.weights)
            ]
        return torch.stack(outputs).sum(0)


# ----------------------------------------------------------- stored labels
def stored_label_bytes(num_classes: int, topk: int | None) -> int:
    """Bytes stored per image per epoch: fp16 logits, or fp16 probabilities plus int16 indices for top-k."""
    return 2 * num_classes if topk is None else topk * (2 + 2)


def soft_targets(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Teacher probabilities at ``temperature`` (the target of the KL loss)."""
    return F.softmax(logits.float() / temperature, dim=1)


class LabelStore:
    """Per-epoch files of teacher outputs for a fixed (distilled set, seed, batching, views) plan."""

    def __init__(self, folder: Path, identity: dict[str, Any], num_classes: int, topk: int | None, temperature: float):
        self.folder = Path(folder)
        self.identity = identity
        self.num_classes = num_classes
        self.topk = topk
        self.temperature = temperature

    def open(self) -> None:
        """Create the store, or check that an existing one was made for the same plan."""
        meta = self.folder / "labels.json"
        expected = {"format_version": STORED_FORMAT_VERSION, **self.identity, "topk": self.topk}
        if meta.exists():
            found = read_json(meta)
            if found != expected:
                changed = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
                raise FadrmError(
                    f"stored labels in {self.folder} were made for another setup (differs in: {', '.join(changed)}); "
                    "use another --labels-dir"
                )
        else:
            write_json(meta, expected)

    def path(self, epoch: int) -> Path:
        return self.folder / f"epoch{epoch:05d}.safetensors"

    def has(self, epoch: int) -> bool:
        return self.path(epoch).exists()

    def write(self, epoch: int, logits: torch.Tensor) -> None:
        """Store one epoch of teacher logits, (images, classes), in epoch order."""
        if self.topk is None:
            tensors = {"logits": logits.to(torch.float16).contiguous()}
        else:
            probs = soft_targets(logits, self.temperature)
            values, indices = probs.topk(self.topk, dim=1)
            tensors = {"probs": values.to(torch.float16).contiguous(), "indices": indices.to(torch.int16).contiguous()}
        with atomic_path(self.path(epoch)) as tmp:
            save_file(tensors, str(tmp))

    def read(self, epoch: int) -> torch.Tensor:
        """One epoch's soft targets: probabilities at the store's temperature, (images, classes).

        Full logits give the exact softmax; top-k keeps the k largest
        probabilities and spreads the remaining mass evenly over the other classes.
        """
        tensors = load_file(str(self.path(epoch)))
        if "logits" in tensors:
            return soft_targets(tensors["logits"], self.temperature)
        probs, indices = tensors["probs"].float(), tensors["indices"].long()
        rest = (1.0 - probs.sum(1, keepdim=True)).clamp_min(0) / max(self.num_classes - self.topk, 1)
        full = rest.expand(len(probs), self.num_classes).clone()
        return full.scatter_(1, indices, probs)

    def bytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("epoch*.safetensors"))


def label_epoch(
    images: torch.Tensor, sampler: ViewSampler, epoch: int, batch_size: int, labeller: TeacherLabeller,
    mean: tuple[float, ...], std: tuple[float, ...], runtime: Runtime,
) -> torch.Tensor:  # fmt: skip
    """Teacher logits for every view of one epoch, in batch order (what a store keeps)."""
    outputs = []
    for b, indices in enumerate(sampler.batches(epoch, len(images), batch_size)):
        view = sampler.view(epoch, b, indices, images.shape[-2], images.shape[-1])
        pixels = normalize(runtime.batch(render(images, view, sampler.size)), mean, std)
        outputs.append(labeller(pixels, runtime).cpu())
    return torch.cat(outputs)
