"""The recover loop: stages of (size, budget), BN-statistics matching, ARC between stages.

Implements section 3 of the method. ``x`` holds ``G`` groups of ``B`` images
(one image per class, consecutive classes, same IPC index); each group has its
own random stream and its own BN statistics, so optimising G groups together
gives the same images as G separate runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..augment import ViewParams, resize
from ..config import SynthesisConfig
from ..runtime import Runtime
from ..training import backward, check_finite, optimizer_step
from .bn_stats import BNStatMatcher
from .methods import round_robin


@dataclass
class RecoverResult:
    """Final images (normalised space, full size) and the last iteration's loss terms."""

    images: torch.Tensor
    ce: torch.Tensor  # per image
    bn: torch.Tensor  # per group
    loss: torch.Tensor  # per group
    iterations: int = 0
    history: list[float] = field(default_factory=list)


def cosine_lr(base_lr: float, step: int, total: int) -> float:
    """One cosine decay over the whole budget, no warm-up."""
    return 0.5 * base_lr * (1 + math.cos(math.pi * step / total))


def arc_merge(x: torch.Tensor, residual_source: torch.Tensor, size: int, alpha: float) -> torch.Tensor:
    """Adjustable residual connection: alpha * resize(x) + (1 - alpha) * resize(P0)."""
    return alpha * resize(x, size) + (1 - alpha) * resize(residual_source, size)


def recover(
    init: torch.Tensor,
    labels: torch.Tensor,
    teachers: Sequence[nn.Module],
    generators: Sequence[torch.Generator],
    settings: SynthesisConfig,
    runtime: Runtime,
    bounds: tuple[torch.Tensor, torch.Tensor],
    on_step: Callable[[int, float], None] | None = None,
    matcher: Callable[..., Any] = BNStatMatcher,
    policy: Callable[[int, Sequence[nn.Module]], nn.Module] = round_robin,
) -> RecoverResult:
    """Optimise ``init`` so the teachers' BN statistics and predictions match.

    Args:
        init: P0, the initial images in normalised space, shape (G*B, C, H, W);
            also the residual source for ARC.
        labels: class of each image, shape (G*B,).
        teachers: frozen eval-mode teachers; iteration t uses ``policy(t, teachers)``. The
            iterations of a teacher without BatchNorm use the cross-entropy term only.
        generators: one random stream per group (len G).
        settings: stages and hyperparameters (the method's stage plan already applied).
        runtime: device and mixed precision.
        bounds: per-channel (low, high) of valid pixels in normalised space, shape (1, C, 1, 1).
        on_step: called with (iteration, loss) after each step, e.g. to drive a progress bar.
        matcher: the statistics matcher, built as ``matcher(teachers, groups, first_bn_multiplier)``.
        policy: which teacher each iteration uses (round-robin: teacher t mod K).
    """
    num_groups = len(generators)
    device = runtime.device
    init = init.to(device)
    labels = labels.to(device)
    low, high = (b.to(device) for b in bounds)
    total = settings.total_budget
    x = resize(init, settings.sizes[0]).clone()
    result_ce = torch.zeros(len(init), device=device)
    result_bn = torch.zeros(num_groups, device=device)
    result_loss = torch.zeros(num_groups, device=device)
    history: list[float] = []
    step = 0
    with matcher(teachers, num_groups, settings.first_bn_multiplier) as statistics:
        for stage, (size, budget) in enumerate(zip(settings.sizes, settings.budgets)):
            x = x.detach().requires_grad_(True)
            optimizer = torch.optim.Adam([x], lr=settings.lr, betas=(0.5, 0.9), eps=1e-8)
            scaler = runtime.grad_scaler()
            for _ in range(budget):
                for group in optimizer.param_groups:
                    group["lr"] = cosine_lr(settings.lr, step, total)
                teacher = policy(step, teachers)
                views = torch.cat([
                    ViewParams.sample(gen, size, settings.jitter, settings.crop_scale).apply(chunk, size)
                    for gen, chunk in zip(generators, x.chunk(num_groups))
                ])  # fmt: skip
                views = runtime.batch(views)
                with runtime.autocast():
                    logits = teacher(views)
                    ce = F.cross_entropy(logits.float(), labels, reduction="none")
                    bn = statistics.pop(teacher)
                    # Sum of per-group losses: each group's gradient is exactly its own run's.
                    group_loss = ce.view(num_groups, -1).mean(1) + settings.r_bn * bn
                    loss = group_loss.sum()
                check_finite(loss, "synthesis")
                optimizer.zero_grad(set_to_none=True)
                backward(loss, scaler)
                optimizer_step(optimizer, scaler)
                with torch.no_grad():
                    x.clamp_(low, high)
                result_ce, result_bn, result_loss = ce.detach(), bn.detach(), group_loss.detach()
                history.append(float(result_loss.mean()))
                step += 1
                if on_step is not None:
                    on_step(step, history[-1])
            if stage + 1 < len(settings.sizes):
                with torch.no_grad():
                    # A convex mix of in-range images stays in range: no clamp needed.
                    x = arc_merge(x.detach(), init, settings.sizes[stage + 1], settings.alpha)
    final = resize(x.detach(), init.shape[-1])
    return RecoverResult(final, result_ce, result_bn, result_loss, step, history)
