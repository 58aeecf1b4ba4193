"""Soft labels on the exact view the student sees: live from the teacher(s), or stored and reused.

A training batch is fully determined by (seed, epoch, batch index): which
images, each image's random-resized crop and flip, and the batch's CutMix or
MixUp. Stored labels therefore keep only the teachers' outputs, never the
images or the view parameters (their seeds suffice), so stored and live
training see the same batches and the same labels. The views themselves are
drawn by :class:`fadrm.augment.ViewSampler`.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .augment import ViewSampler, render
from .data import normalize
from .distributed import Ranks
from .errors import FadrmError
from .runtime import Runtime


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


Batch = TypeVar("Batch", torch.Tensor, range)


def halves(inputs: Batch) -> tuple[Batch, ...]:
    """The two halves BSSL labels separately (of a batch, or of its positions); an odd extra image goes to
    the second (as the reference)."""
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
    def __call__(self, inputs: torch.Tensor, runtime: Runtime, ranks: Ranks = Ranks()) -> torch.Tensor:
        """The labels of every image of ``inputs``.

        Under several ranks (each holding the same ``inputs``), each labels a part and all
        receive the whole: with BSSL a whole half each, labelled on its own statistics exactly
        as in one process (ranks beyond the two halves repeat one and discard it: they would only
        wait); without BSSL, images are independent and each rank takes an equal share.
        """
        context = batch_statistics(self.batchnorm_layers) if self.bssl else contextlib.nullcontext()
        positions = range(len(inputs))
        if self.bssl:
            chunks = halves(positions)
            owned = ranks.rank < len(chunks)
            if ranks.world > 1:
                chunks = (chunks[ranks.rank % len(chunks)],)
        else:
            chunks, owned = (positions[ranks.share(positions)],), True
        with context, runtime.autocast():
            outputs = [
                torch.cat([model(inputs[chunk.start : chunk.stop]) for chunk in chunks]).float() * weight
                for model, weight in zip(self.models, self.weights)
            ]
        logits = torch.stack(outputs).sum(0)
        if ranks.world == 1:
            return logits
        whole = logits.new_zeros(len(inputs), logits.shape[1])
        if owned:
            whole[chunks[0].start : chunks[0].stop] = logits
        return ranks.sum(whole)  # one rank's logits and zeros elsewhere: the sum is exact


# ------------------------------------------------------------- soft targets
def soft_targets(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Teacher probabilities at ``temperature`` (the target of the KL loss)."""
    return F.softmax(logits.float() / temperature, dim=1)


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
