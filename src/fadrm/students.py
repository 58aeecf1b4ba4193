"""Student training: one fresh student trained on one training set, validated on real data.

Implements sections 4 and 5 of the method: soft labels from the teacher(s) on
the exact augmented view the student sees (:mod:`fadrm.augment`), a soft-label
loss (:data:`STUDENT_LOSSES`: KL at temperature T, or G-VBSM's and EDC's MSE + CE), an optimiser
(:data:`OPTIMIZERS`) over weight-decay groups and a per-epoch learning-rate
schedule (:data:`SCHEDULES`). Hard-label arms use :func:`mixed_cross_entropy`.
Orchestration (which students, sets and repeats; resuming) is in
:mod:`fadrm.evaluate`.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .artifacts import StudentCheckpoint
from .augment import ViewSampler, epoch_views
from .config import EvalConfig
from .data import DatasetSpec, normalize
from .data.datasets import TrainingSet
from .distributed import Ranks, gradient_sync
from .errors import FadrmError, GroupRefusal
from .io import DAMAGE_ERRORS, set_aside
from .labels import TeacherLabeller, soft_targets
from .registry import Registry
from .runtime import Runtime, to_device
from .seeding import global_random_state, restore_global_random_state
from .training import backward, check_finite, evaluate_accuracy, optimizer_step, progress

# (parameter groups, learning rate, momentum, fused) -> optimiser; an optimiser without momentum ignores it;
# fused: torch's fused kernels (Runtime.fused_optimizer), else torch's default loop for the device.
OptimizerFn = Callable[[list[dict[str, Any]], float, float, bool], torch.optim.Optimizer]
# (epoch, epochs, eta) -> learning-rate factor, applied once per epoch.
ScheduleFn = Callable[[int, int, float], float]


class StoredLabels(Protocol):
    """Teacher outputs stored once per epoch for the views a student draws
    (:class:`fadrm.evaluation.store.LabelStore`)."""

    def read_with_logits(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One epoch's soft targets (images, classes) and the raw logits where they were kept."""
        ...


@dataclass(frozen=True)
class SoftLabels:
    """What a student's soft-label loss compares its logits with on one (micro-)batch.

    Attributes:
        probabilities: the teachers' probabilities at the temperature (a store's top-k: the k kept,
            the rest spread evenly).
        logits: the teachers' raw logits; None where a store kept top-k probabilities only.
        hard: each image's own class (a mixed-in partner's class is not here).
    """

    probabilities: torch.Tensor
    logits: torch.Tensor | None
    hard: torch.Tensor

    def __getitem__(self, part: slice) -> "SoftLabels":
        return SoftLabels(self.probabilities[part], None if self.logits is None else self.logits[part], self.hard[part])


@dataclass(frozen=True)
class StudentLoss:
    """A soft-label loss: ``compute(student logits, labels, config)``; ``needs_logits`` when it reads the
    teachers' raw logits (so stored top-k probabilities cannot serve it)."""

    compute: Callable[[torch.Tensor, SoftLabels, EvalConfig], torch.Tensor]
    needs_logits: bool = False

    def __call__(self, logits: torch.Tensor, labels: SoftLabels, config: EvalConfig) -> torch.Tensor:
        return self.compute(logits, labels, config)


OPTIMIZERS: Registry[OptimizerFn] = Registry("optimizer")
SCHEDULES: Registry[ScheduleFn] = Registry("schedule")
STUDENT_LOSSES: Registry[StudentLoss] = Registry("loss")


# -------------------------------------------------------------- optimisers
def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Parameter groups as the reference builds them: decay only on weights with more than one dimension.

    BatchNorm weights, every bias and other one-dimensional parameters get none
    (the reference's ``get_parameters``: named "weight" and more than one dimension).
    """
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        (decay if "weight" in name and parameter.ndim > 1 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(groups: list[dict[str, Any]], lr: float, momentum: float, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW (the published student optimiser); weight decay per group; ``momentum`` is SGD's, unused here."""
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None)


def sgd(groups: list[dict[str, Any]], lr: float, momentum: float, fused: bool = False) -> torch.optim.Optimizer:
    """SGD with (heavy-ball) momentum; weight decay per group."""
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, fused=fused or None)


OPTIMIZERS.add("adamw", adamw)
OPTIMIZERS.add("sgd", sgd)


# --------------------------------------------------------------- schedules
def stretched_cosine(epoch: int, epochs: int, eta: float) -> float:
    """Learning-rate factor 0.5 * (1 + cos(pi * epoch / (eta * epochs))): eta > 1 stops before zero."""
    return 0.5 * (1 + math.cos(math.pi * epoch / (eta * epochs)))


def ssrs(epoch: int, epochs: int, eta: float) -> float:
    """EDC's "smoothing schedule with a smooth ending": the stretched cosine up to 5/6 of the epochs, then
    its value at 5/6 times a line falling to zero, ``(1 - epoch / epochs)`` (a drop to a sixth at 5/6)."""
    if 6 * epoch <= 5 * epochs:
        return stretched_cosine(epoch, epochs, eta)
    return 0.5 * (1 + math.cos(5 * math.pi / (6 * eta))) * (1 - epoch / epochs)


def multistep(epoch: int, epochs: int, eta: float) -> float:
    """Halve the rate at 80%, 90% and 95% of the epochs (EDC's CIFAR-10 steps at 800, 900, 950 of 1000);
    ``eta`` is unused. Compared in integers (twentieths of the epochs), so no boundary moves by rounding."""
    return 0.5 ** sum(20 * epoch >= share * epochs for share in (16, 18, 19))


SCHEDULES.add("stretched-cosine", stretched_cosine)
SCHEDULES.add("ssrs", ssrs)
SCHEDULES.add("multistep", multistep)


# ------------------------------------------------------------------ losses
def kl_loss(logits: torch.Tensor, labels: SoftLabels, config: EvalConfig) -> torch.Tensor:
    """KL(teacher probabilities || softmax(logits / T)), averaged over the batch (no T^2 factor, as published)."""
    return F.kl_div(F.log_softmax(logits / config.temperature, dim=1), labels.probabilities, reduction="batchmean")


def mse_ce_loss(logits: torch.Tensor, labels: SoftLabels, config: EvalConfig) -> torch.Tensor:
    """G-VBSM's and EDC's loss: MSE between raw student and teacher logits (mean over every entry) plus
    ``ce_weight`` times the cross-entropy with each image's own class; no temperature. As in their code,
    a CutMix partner's class is ignored."""
    assert labels.logits is not None  # EvalConfig.check refuses stored top-k with this loss
    return F.mse_loss(logits, labels.logits) + config.ce_weight * F.cross_entropy(logits, labels.hard)


STUDENT_LOSSES.add("kl", StudentLoss(kl_loss))
STUDENT_LOSSES.add("mse-ce", StudentLoss(mse_ce_loss, needs_logits=True))


def mixed_cross_entropy(
    logits: torch.Tensor, hard: torch.Tensor, partner_hard: torch.Tensor, lam: float
) -> torch.Tensor:
    """The hard-label loss of a mixed batch: lam * CE(own class) + (1 - lam) * CE(partner's class)."""
    return lam * F.cross_entropy(logits, hard) + (1 - lam) * F.cross_entropy(logits, partner_hard)


# ------------------------------------------------------------ weight EMA
class EmaWeights:
    """An exponential moving average of a student's parameters, the weights EDC validates.

    Starts at the model's parameters and moves ``p_ema <- d * p_ema + (1 - d) * p`` after every
    optimiser step (:meth:`update`). Only parameters: BatchNorm's running statistics stay the
    live model's, as in EDC, when :meth:`swapped_in` lends the averages to the model.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.averages = [p.detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of the average towards the model's current parameters."""
        for average, parameter in zip(self.averages, model.parameters()):
            average.mul_(self.decay).add_(parameter.detach(), alpha=1 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[nn.Module]:
        """The model with the averaged parameters for the duration; its own are put back after, even on error."""
        live = [p.detach().clone() for p in model.parameters()]
        try:
            with torch.no_grad():
                for parameter, average in zip(model.parameters(), self.averages):
                    parameter.copy_(average)
            yield model
        finally:
            with torch.no_grad():
                for parameter, own in zip(model.parameters(), live):
                    parameter.copy_(own)

    def state_dict(self) -> dict[str, Any]:
        """The averages and the decay, for a checkpoint."""
        return {"decay": self.decay, "averages": [a.clone() for a in self.averages]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's :meth:`state_dict`."""
        if len(state["averages"]) != len(self.averages):
            raise ValueError("the checkpoint's weight averages belong to another model")
        self.decay = float(state["decay"])
        for average, saved in zip(self.averages, state["averages"]):
            average.copy_(saved)


# -------------------------------------------------------------------- loop
def micro_batches(batch_size: int, accumulation: int, num_images: int) -> list[slice]:
    """How one loader batch of ``num_images`` is forwarded: micro-batches of ``batch_size // accumulation``.

    A short last loader batch gets fewer micro-batches (the reference's ``ceil``); every
    micro-batch's loss is divided by ``accumulation`` all the same.
    """
    size = batch_size // accumulation
    return [slice(start, start + size) for start in range(0, num_images, size)]


def smallest_micro_batch(num_images: int, batch_size: int, accumulation: int) -> int:
    """The fewest images any micro-batch of an epoch holds (the last loader batch may be short)."""
    loader_batches = {min(batch_size, num_images), num_images % batch_size or batch_size}
    return min(len(range(n)[part]) for n in loader_batches for part in micro_batches(batch_size, accumulation, n))


def train_student(
    model: nn.Module,
    train: TrainingSet,
    config: EvalConfig,
    spec: DatasetSpec,
    runtime: Runtime,
    val_loader: torch.utils.data.DataLoader,
    labeller: TeacherLabeller | None,
    store: StoredLabels | None = None,
    desc: str = "student",
    log: Callable[[str], None] = print,
    checkpoint: StudentCheckpoint | None = None,
    ranks: Ranks = Ranks(),
) -> dict[str, Any]:
    """Train ``model`` on ``train`` only; soft labels from ``store`` or ``labeller``, hard labels when both are None.

    ``config.lr`` and ``config.eta`` must be resolved (see :func:`fadrm.config.student_recipe`).
    Returns the per-epoch loss, every validation, the final top-1/top-5 and the best top-1
    over the validations (which selects on the validation set: report it as such).

    With ``checkpoint`` the whole state is saved after every ``config.checkpoint_every``-th
    epoch and a run saved with the same identity continues after its last saved epoch, ending
    as an uninterrupted run would. Under several ``ranks`` they train ``model`` together: each
    loader batch is still forwarded as ``accumulation`` micro-batches of ``batch_size /
    accumulation`` images (the BatchNorm batch, synchronised over the ranks), each rank
    forwarding its share of every micro-batch; only rank 0 saves.
    """
    if config.lr is None or config.eta is None:
        raise ValueError("train_student needs a resolved lr and eta")
    optimizer_factory = OPTIMIZERS.get(config.optimizer)
    schedule = SCHEDULES.get(config.schedule)
    soft_loss = STUDENT_LOSSES.get(config.loss)
    smallest = smallest_micro_batch(len(train.images), config.batch_size, config.accumulation)
    if smallest < ranks.world:
        raise GroupRefusal(
            f"{ranks.world} processes need at least {ranks.world} images in every micro-batch, and "
            f"{desc} has one of {smallest} (--batch-size {config.batch_size} in --accumulation "
            f"{config.accumulation}, {len(train.images)} images); use fewer processes"
        )
    sampler = ViewSampler.from_config(config, spec.image_size)
    runtime.place(model)
    network = ranks.parallel(model)
    groups = weight_decay_groups(model, config.weight_decay)
    optimizer = optimizer_factory(groups, config.lr, config.momentum, runtime.fused_optimizer)
    eta = config.eta
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: schedule(e, config.epochs, eta))
    scaler = runtime.grad_scaler()
    ema = EmaWeights(model, config.ema_decay) if config.ema_decay > 0 else None
    evaluate_after = set(config.evaluation_epochs())
    history: list[dict[str, Any]] = []
    start_epoch, seconds_before = 0, 0.0
    state = checkpoint.load(log) if checkpoint is not None else None
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if scaler is not None:
                scaler.load_state_dict(state["scaler"])
            if ema is not None:
                ema.load_state_dict(state["ema"])
            restore_global_random_state(state["random"], runtime.device)
            start_epoch, history, seconds_before = int(state["epoch"]), list(state["history"]), float(state["seconds"])
        except DAMAGE_ERRORS as exc:
            # The model may be half restored: the student starts again in a fresh run of the command.
            aside = set_aside(checkpoint.path)
            raise FadrmError(
                f"{checkpoint.path} is damaged ({type(exc).__name__}); kept as {aside.name}: run the same command "
                "again to train this student from the start"
            ) from None
        log(f"{desc}: resuming after epoch {start_epoch}")
    started = time.perf_counter() - seconds_before
    for epoch in progress(range(start_epoch, config.epochs), desc):
        model.train()
        stored = store.read_with_logits(epoch) if store is not None else None
        offset, count = 0, 0
        # Summed on the device and read once per epoch: no host sync per micro-batch.
        total = torch.zeros((), dtype=torch.float64, device=runtime.device)
        # Views, mixing and soft labels belong to the loader batch (BSSL halves included); every rank renders
        # the whole batch (cheap next to the model) and forwards its share.
        for b, indices, view, pixels in epoch_views(sampler, epoch, train.images, config.batch_size, runtime):
            pixels = normalize(runtime.batch(pixels), spec.mean, spec.std)
            hard = to_device(train.labels[indices], runtime.device)
            labels: SoftLabels | None = None
            if stored is not None:
                probabilities, teacher_logits = (
                    None if t is None else to_device(t[offset : offset + len(indices)], runtime.device) for t in stored
                )
                labels = SoftLabels(probabilities, teacher_logits, hard)
            elif labeller is not None:
                teacher_logits = labeller(pixels, runtime, ranks)
                labels = SoftLabels(soft_targets(teacher_logits, config.temperature), teacher_logits, hard)
            else:
                partner_hard = hard[to_device(view.partner, runtime.device)]
            offset += len(indices)
            optimizer.zero_grad(set_to_none=True)
            parts = micro_batches(config.batch_size, config.accumulation, len(indices))
            for m, part in enumerate(parts):
                whole = range(len(indices))[part]
                mine = ranks.share(whole)
                # Gradients are averaged over the ranks once per step, after the last micro-batch.
                with gradient_sync(network, sync=m == len(parts) - 1):
                    with runtime.autocast():
                        logits = network(pixels[mine]).float()
                    if labels is not None:
                        loss = soft_loss(logits, labels[mine], config)
                    else:
                        loss = mixed_cross_entropy(logits, hard[mine], partner_hard[mine], view.lam)
                    backward(ranks.weighted(loss, len(logits), len(whole)) / config.accumulation, scaler)
                total += loss.detach().double() * len(logits)
                count += len(whole)
            optimizer_step(optimizer, scaler)
            if ema is not None:
                ema.update(model)
        scheduler.step()
        check_finite(ranks.sum(total), f"training {desc}")  # before anything is saved
        record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": float(total) / count}
        if epoch + 1 in evaluate_after:
            with ema.swapped_in(model) if ema is not None else contextlib.nullcontext(model) as validated:
                record.update(evaluate_accuracy(validated, val_loader, runtime, spec.mean, spec.std, ranks=ranks))
            if epoch + 1 != config.epochs:
                log(f"{desc}: epoch {epoch + 1}: top-1 {record['top1']:.2f}%")
        history.append(record)
        if checkpoint is not None and ranks.is_main and (epoch + 1) % config.checkpoint_every == 0:
            states = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "random": global_random_state(runtime.device),
            }
            if scaler is not None:
                states["scaler"] = scaler.state_dict()
            if ema is not None:
                states["ema"] = ema.state_dict()
            checkpoint.save(epoch + 1, history, time.perf_counter() - started, states)
    result = {
        "top1": history[-1]["top1"],
        "top5": history[-1]["top5"],
        "epochs": config.epochs,
        "seconds": round(time.perf_counter() - started, 2),
        "history": history,
    }
    # The validations made: a run resumed under another --eval-every claims only those it has.
    validated = [h["epoch"] for h in history if "top1" in h and h["epoch"] in evaluate_after]
    return with_best_of(result, validated)


def with_best_of(result: dict[str, Any], epochs: list[int]) -> dict[str, Any]:
    """``result`` with the best top-1 (and its epoch) over the validations after ``epochs``.

    The earliest epoch wins a tie. A finished run validated at more epochs than asked
    is reported over the asked ones only.
    """
    validations = [h for h in result["history"] if h["epoch"] in epochs and "top1" in h]
    best = max(validations, key=lambda h: h["top1"])
    return {**result, "best_top1": best["top1"], "best_epoch": best["epoch"], "evaluated_epochs": epochs}
