"""Student training: one fresh student trained on one training set, validated on real data.

Implements sections 4 and 5 of the method: soft labels from the teacher(s) on
the exact augmented view the student sees (:mod:`fadrm.augment`), a soft-label
loss at temperature T (:data:`STUDENT_LOSSES`), an optimiser
(:data:`OPTIMIZERS`) over weight-decay groups and a per-epoch learning-rate
schedule (:data:`SCHEDULES`). Hard-label arms use :func:`mixed_cross_entropy`.
Orchestration (which students, sets and repeats; resuming) is in
:mod:`fadrm.evaluate`.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .artifacts import LabelStore, StudentCheckpoint
from .augment import render
from .baselines import TrainingSet
from .config import EvalConfig
from .data import DatasetSpec, normalize
from .distributed import Ranks, gradient_sync
from .errors import FadrmError
from .labels import TeacherLabeller, soft_targets
from .registry import Registry
from .runtime import Runtime
from .seeding import global_random_state, restore_global_random_state
from .training import backward, check_finite, evaluate_accuracy, optimizer_step, progress

# (parameter groups, learning rate) -> optimiser.
OptimizerFn = Callable[[list[dict[str, Any]], float], torch.optim.Optimizer]
# (epoch, epochs, eta) -> learning-rate factor, applied once per epoch.
ScheduleFn = Callable[[int, int, float], float]
# (student logits, teacher probabilities at the temperature, temperature) -> loss.
LossFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]

OPTIMIZERS: Registry[OptimizerFn] = Registry("optimizer")
SCHEDULES: Registry[ScheduleFn] = Registry("schedule")
STUDENT_LOSSES: Registry[LossFn] = Registry("loss")


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


def adamw(groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    """AdamW (the published student optimiser); weight decay per group."""
    return torch.optim.AdamW(groups, lr=lr)


def sgd(groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    """SGD with momentum 0.9; weight decay per group."""
    return torch.optim.SGD(groups, lr=lr, momentum=0.9)


OPTIMIZERS.add("adamw", adamw)
OPTIMIZERS.add("sgd", sgd)


# --------------------------------------------------------------- schedules
def stretched_cosine(epoch: int, epochs: int, eta: float) -> float:
    """Learning-rate factor 0.5 * (1 + cos(pi * epoch / (eta * epochs))): eta > 1 stops before zero."""
    return 0.5 * (1 + math.cos(math.pi * epoch / (eta * epochs)))


SCHEDULES.add("stretched-cosine", stretched_cosine)


# ------------------------------------------------------------------ losses
def kl_loss(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(targets || softmax(logits / T)), averaged over the batch (no T^2 factor, as published)."""
    return F.kl_div(F.log_softmax(logits / temperature, dim=1), targets, reduction="batchmean")


STUDENT_LOSSES.add("kl", kl_loss)


def mixed_cross_entropy(
    logits: torch.Tensor, hard: torch.Tensor, partner_hard: torch.Tensor, lam: float
) -> torch.Tensor:
    """The hard-label loss of a mixed batch: lam * CE(own class) + (1 - lam) * CE(partner's class)."""
    return lam * F.cross_entropy(logits, hard) + (1 - lam) * F.cross_entropy(logits, partner_hard)


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
    store: LabelStore | None = None,
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
        raise FadrmError(f"{ranks.world} processes need at least {ranks.world} images in every micro-batch, and "
                         f"{desc} has one of {smallest} (--batch-size {config.batch_size} in --accumulation "
                         f"{config.accumulation}, {len(train.images)} images); use fewer processes")  # fmt: skip
    sampler = config.view_sampler(spec.image_size)
    runtime.place(model)
    network = ranks.parallel(model)
    optimizer = optimizer_factory(weight_decay_groups(model, config.weight_decay), config.lr)
    eta = config.eta
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: schedule(e, config.epochs, eta))
    scaler = runtime.grad_scaler()
    evaluate_after = set(config.evaluation_epochs())
    history: list[dict[str, Any]] = []
    start_epoch, seconds_before = 0, 0.0
    state = checkpoint.load(log) if checkpoint is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None:
            scaler.load_state_dict(state["scaler"])
        restore_global_random_state(state["random"], runtime.device)
        start_epoch, history, seconds_before = int(state["epoch"]), list(state["history"]), float(state["seconds"])
        log(f"{desc}: resuming after epoch {start_epoch}")
    started = time.perf_counter() - seconds_before
    for epoch in progress(range(start_epoch, config.epochs), desc):
        model.train()
        targets_epoch = store.read(epoch) if store is not None else None
        offset, count = 0, 0
        # Summed on the device and read once per epoch: no host sync per micro-batch.
        total = torch.zeros((), dtype=torch.float64, device=runtime.device)
        for b, indices in enumerate(sampler.batches(epoch, len(train.images), config.batch_size)):
            # Views, mixing and soft labels belong to the loader batch (BSSL halves included); every
            # rank renders the whole batch (cheap next to the model) and forwards its share.
            view = sampler.view(epoch, b, indices, train.images.shape[-2], train.images.shape[-1])
            pixels = normalize(runtime.batch(render(train.images, view, spec.image_size)), spec.mean, spec.std)
            if targets_epoch is not None:
                targets = targets_epoch[offset : offset + len(indices)].to(runtime.device)
            elif labeller is not None:
                targets = soft_targets(labeller(pixels, runtime, ranks), config.temperature)
            else:
                targets = None
                hard = train.labels[indices].to(runtime.device)
                partner_hard = hard[view.partner.to(runtime.device)]
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
                    if targets is not None:
                        loss = soft_loss(logits, targets[mine], config.temperature)
                    else:
                        loss = mixed_cross_entropy(logits, hard[mine], partner_hard[mine], view.lam)
                    backward(ranks.weighted(loss, len(logits), len(whole)) / config.accumulation, scaler)
                total += loss.detach().double() * len(logits)
                count += len(whole)
            optimizer_step(optimizer, scaler)
        scheduler.step()
        check_finite(ranks.sum(total), f"training {desc}")  # before anything is saved
        record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": float(total) / count}
        if epoch + 1 in evaluate_after:
            record.update(evaluate_accuracy(model, val_loader, runtime, spec.mean, spec.std, ranks=ranks))
            if epoch + 1 != config.epochs:
                log(f"{desc}: epoch {epoch + 1}: top-1 {record['top1']:.2f}%")
        history.append(record)
        if checkpoint is not None and ranks.is_main and (epoch + 1) % config.checkpoint_every == 0:
            states = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                      "scheduler": scheduler.state_dict(), "random": global_random_state(runtime.device)}  # fmt: skip
            if scaler is not None:
                states["scaler"] = scaler.state_dict()
            checkpoint.save(epoch + 1, history, time.perf_counter() - started, states)
    result = {"top1": history[-1]["top1"], "top5": history[-1]["top5"], "epochs": config.epochs,
              "seconds": round(time.perf_counter() - started, 2), "history": history}  # fmt: skip
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
