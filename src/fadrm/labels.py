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

from .augment import ViewSampler, epoch_views
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


def prior_weights(priors: Sequence[float], temperature: float, teachers: int) -> list[float]:
    """CV-DD's committee weights of the relabelling teachers: softmax(prior / temperature).

    A prior is a score per teacher (CV-DD: the top-1 of a student trained on that model's own
    set); the weights sum to one, so the weighted mean of the logits is CV-DD's weighted sum.
    """
    if len(priors) != teachers:
        raise FadrmError(f"{len(priors)} teacher priors for {teachers} teachers: give one --teacher-prior per teacher")
    return torch.softmax(torch.tensor(priors, dtype=torch.float64) / temperature, dim=0).tolist()


def balanced_norms(logits: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """G-VBSM's balancing: each teacher's logit matrix for the batch rescaled to the teachers' mean
    Frobenius norm, ``z_k * mean_j ||Z_j||_F / ||Z_k||_F``, so no teacher dominates the mean by scale."""
    norms = [z.norm() for z in logits]
    mean = torch.stack(norms).mean()
    return [z * (mean / norm) for z, norm in zip(logits, norms)]


class TeacherLabeller:
    """Mean (optionally weighted) logits of several teachers on normalised inputs.

    With ``bssl`` the teachers' BatchNorm layers use the statistics of each half of
    the batch separately ("batch-specific soft labels"), their running statistics untouched.
    With ``balance`` each teacher's logits are first rescaled by :func:`balanced_norms`.
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        weights: Sequence[float] | None = None,
        bssl: bool = False,
        balance: bool = False,
    ) -> None:
        if weights is not None and len(weights) != len(models):
            raise FadrmError(f"{len(weights)} teacher weights for {len(models)} teachers")
        self.models = list(models)
        total = sum(weights) if weights else len(models)
        self.weights = [w / total for w in weights] if weights else [1.0 / len(models)] * len(models)
        self.bssl = bssl
        self.balance = balance
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
            logits = torch.stack(
                [
                    torch.cat([model(inputs[chunk.start : chunk.stop]) for chunk in chunks]).float()
                    for model in self.models
                ]
            )
        if ranks.world > 1:
            # Every rank gets every teacher's logits for the whole batch before they are balanced
            # (a norm over the batch) and weighted: one rank's rows and zeros elsewhere, summed, exact.
            whole = logits.new_zeros(len(self.models), len(inputs), logits.shape[-1])
            if owned:
                whole[:, chunks[0].start : chunks[0].stop] = logits
            logits = ranks.sum(whole)
        teachers = list(logits.unbind(0))
        if self.balance:
            teachers = balanced_norms(teachers)
        return torch.stack([z * weight for z, weight in zip(teachers, self.weights)]).sum(0)


# ------------------------------------------------------------- soft targets
def soft_targets(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Teacher probabilities at ``temperature`` (the target of the KL loss)."""
    return F.softmax(logits.float() / temperature, dim=1)


def label_epoch(
    images: torch.Tensor,
    sampler: ViewSampler,
    epoch: int,
    batch_size: int,
    labeller: TeacherLabeller,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    runtime: Runtime,
) -> torch.Tensor:
    """Teacher logits for every view of one epoch, in batch order (what a store keeps)."""
    outputs = []
    for _, _, _, pixels in epoch_views(sampler, epoch, images, batch_size, runtime):
        outputs.append(labeller(normalize(runtime.batch(pixels), mean, std), runtime).cpu())
    return torch.cat(outputs)
