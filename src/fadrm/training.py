"""Shared training-loop pieces: loaders, one supervised epoch, accuracy."""

from __future__ import annotations

import math
import os
from typing import Any, Iterable, TypeVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .data.transforms import normalize
from .errors import FadrmError
from .runtime import Runtime

T = TypeVar("T")


def default_workers() -> int:
    """Loader processes: none on a 2-core machine (they compete with the maths), up to 8 otherwise."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if cores <= 2 else min(8, cores - 1)


def make_loader(
    dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0, workers: int | None = None, drop_last: bool = False
) -> DataLoader:
    """A DataLoader whose shuffle order depends only on ``seed``."""
    workers = default_workers() if workers is None else workers
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, generator=generator,
        drop_last=drop_last, persistent_workers=workers > 0, pin_memory=False,
    )  # fmt: skip


def progress(iterable: Iterable[T], desc: str, **kwargs: Any) -> Iterable[T]:
    """A progress bar on a terminal, silence in logs and CI (tqdm's disable=None)."""
    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, disable=None, **kwargs)


def check_finite(loss: torch.Tensor, where: str) -> None:
    """Stop with a clear message on a NaN or infinite loss instead of training on garbage."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FadrmError(f"non-finite loss ({value}) during {where}; lower the learning rate or disable --amp")


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
) -> float:
    """One epoch of cross-entropy training on hard labels; returns the mean loss."""
    model.train()
    scaler = runtime.grad_scaler()
    total, count = 0.0, 0
    bar = progress(loader, desc)
    for images, labels in bar:
        images = normalize(runtime.batch(images), mean, std)
        labels = labels.to(runtime.device, non_blocking=True)
        with runtime.autocast():
            loss = nn.functional.cross_entropy(model(images), labels)
        check_finite(loss, desc)
        optimizer.zero_grad(set_to_none=True)
        backward(loss, scaler)
        optimizer_step(optimizer, scaler)
        scheduler.step()
        total += float(loss.detach()) * len(labels)
        count += len(labels)
        if isinstance(bar, tqdm):
            bar.set_postfix(loss=f"{total / count:.4f}", refresh=False)
    return total / max(count, 1)


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module,
    loader: DataLoader,
    runtime: Runtime,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    desc: str = "val",
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) and mean cross-entropy of ``model`` on ``loader``."""
    model.eval()
    correct1 = correct5 = 0
    loss_sum, count = 0.0, 0
    for images, labels in progress(loader, desc):
        images = normalize(runtime.batch(images), mean, std)
        labels = labels.to(runtime.device)
        with runtime.autocast():
            logits = model(images)
        loss_sum += float(nn.functional.cross_entropy(logits.float(), labels, reduction="sum"))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(labels[:, None])
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
        count += len(labels)
    count = max(count, 1)
    return {"top1": 100.0 * correct1 / count, "top5": 100.0 * correct5 / count, "loss": loss_sum / count}
