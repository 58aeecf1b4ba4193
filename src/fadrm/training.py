"""Shared training-loop pieces: loaders, one supervised epoch, accuracy."""

from __future__ import annotations

import math
import threading
import os
from typing import Any, Iterable, Sequence, TypeVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .data.transforms import normalize
from .distributed import Ranks
from .errors import FadrmError
from .runtime import Runtime

T = TypeVar("T")


def available_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers() -> int:
    """Loader processes: none on a 2-core machine (they compete with the maths), up to 8 otherwise."""
    cores = available_cores()
    return 0 if cores <= 2 else min(8, cores - 1)


def make_loader(
    dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0, workers: int | None = None, drop_last: bool = False
) -> DataLoader:
    """A DataLoader whose shuffle order depends only on ``seed``."""
    workers = default_workers() if workers is None else workers
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        generator=generator,
        drop_last=drop_last,
        persistent_workers=workers > 0,
        pin_memory=False,
    )


# Whether this process draws progress bars at all (a --jobs worker does not: several on one terminal garble it).
PROGRESS_BARS = {"enabled": True}


def set_progress_bars(enabled: bool) -> None:
    """Draw progress bars on a terminal (the default), or never in this process. Without bars, tqdm's lock
    is a thread lock: its default one is an interprocess semaphore, which a process killed outright leaves
    behind (multiprocessing then warns about it at exit)."""
    PROGRESS_BARS["enabled"] = enabled
    if not enabled:
        tqdm.set_lock(threading.RLock())


def progress(iterable: Iterable[T], desc: str, **kwargs: Any) -> Iterable[T]:
    """A progress bar on a terminal, silence in logs and CI (tqdm's disable=None) and where turned off."""
    disable = None if PROGRESS_BARS["enabled"] else True
    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, disable=disable, **kwargs)


def check_finite(loss: torch.Tensor, where: str) -> None:
    """Stop with a clear message on a NaN or infinite loss instead of training on garbage.

    Reads ``loss`` to the host: training loops pass an epoch's running sum, which is
    non-finite when any of its losses was, once per epoch.
    """
    check_finite_values([float(loss.detach())], where)


def check_finite_values(values: Sequence[float], where: str) -> None:
    """:func:`check_finite` for losses already read to the host; names the first non-finite one's position.

    ``where`` is completed with ", step K" (1-based within ``values``) when there are several.
    """
    for position, value in enumerate(values):
        if not math.isfinite(value):
            at = f"{where}, step {position + 1}" if len(values) > 1 else where
            raise FadrmError(f"non-finite loss ({value}) during {at}; lower the learning rate or disable --amp")


def backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    """Backpropagate ``loss``, scaled first when a gradient scaler is in use (fp16)."""
    (scaler.scale(loss) if scaler is not None else loss).backward()


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """One optimiser step; through the scaler when there is one (it skips steps whose gradients overflowed)."""
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    runtime: Runtime,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    desc: str = "train",
    ranks: Ranks = Ranks(),
) -> float:
    """One epoch of cross-entropy training on hard labels; returns the mean loss.

    Under several ``ranks`` every rank iterates the same loader and forwards its share of each
    batch through ``model``, the data-parallel wrapper (:meth:`fadrm.distributed.Ranks.parallel`).
    Stops on a non-finite loss at the end of the epoch, before the caller saves anything.
    """
    model.train()
    scaler = runtime.grad_scaler()
    # Summed on the device and read once per epoch: no host sync per step.
    total = torch.zeros((), dtype=torch.float64, device=runtime.device)
    count = 0
    bar = progress(loader, desc)
    for images, labels in bar:
        mine = ranks.share(range(len(labels)))
        images = normalize(runtime.batch(images[mine]), mean, std)
        labels_mine = labels[mine].to(runtime.device, non_blocking=True)
        with runtime.autocast():
            loss = nn.functional.cross_entropy(model(images), labels_mine)
        optimizer.zero_grad(set_to_none=True)
        backward(ranks.weighted(loss, len(labels_mine), len(labels)), scaler)
        optimizer_step(optimizer, scaler)
        scheduler.step()
        total += loss.detach().double() * len(labels_mine)
        count += len(labels)
        if not bar.disable:  # a terminal: this rank's running loss
            bar.set_postfix(loss=f"{float(total) / count * ranks.world:.4f}", refresh=False)
    check_finite(ranks.sum(total), desc)
    return float(total) / max(count, 1)


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module,
    loader: DataLoader,
    runtime: Runtime,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    desc: str = "val",
    ranks: Ranks = Ranks(),
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) and mean cross-entropy of ``model`` on ``loader``.

    Under several ``ranks`` each forwards every ``world``-th batch (all still load every batch)
    and the per-batch figures are summed in batch order, so the result is one process's.
    """
    model.eval()
    # Per batch: summed cross-entropy, top-1 hits, top-5 hits, images (float64 holds the counts exactly).
    per_batch = torch.zeros(len(loader), 4, dtype=torch.float64)
    for index, (images, labels) in enumerate(progress(loader, desc)):
        if index % ranks.world != ranks.rank:
            continue
        images = normalize(runtime.batch(images), mean, std)
        labels = labels.to(runtime.device)
        with runtime.autocast():
            logits = model(images)
        loss_sum = float(nn.functional.cross_entropy(logits.float(), labels, reduction="sum"))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(labels[:, None])
        per_batch[index] = torch.tensor(
            [loss_sum, int(hits[:, 0].sum()), int(hits.any(dim=1).sum()), len(labels)], dtype=torch.float64
        )
    loss_sum = correct1 = correct5 = count = 0.0
    for row in ranks.sum(per_batch).tolist():  # added in batch order, as one process adds them
        loss_sum += row[0]
        correct1 += row[1]
        correct5 += row[2]
        count += row[3]
    count = max(count, 1)
    return {"top1": 100.0 * correct1 / count, "top5": 100.0 * correct5 / count, "loss": loss_sum / count}
