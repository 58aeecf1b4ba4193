"""The recover loop: stages of (size, budget), statistics matching, ARC between stages.

Implements section 3 of the method. ``x`` holds ``G`` groups of ``B`` images (the work
units: one image per class at one IPC index, or whole classes with several IPC slots);
each group has its own random stream, its own statistics and its own loss, so optimising
G groups together gives the same images as G separate runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..augment import ViewParams, resize
from ..config import SynthesisConfig
from ..runtime import Runtime
from ..training import backward, check_finite, optimizer_step
from .matching import MATCHERS, MatchSetup, StatMatcher, TeacherTargets
from .methods import TeacherPlan

# G-VBSM's data densification: each class's views average-pooled to 32 x 32 (smaller images
# are kept as they are: pooling up would add nothing), and the temperature that flattens the
# target spectrum; both are the published constants.
DD_SIDE = 32
DD_TEMPERATURE = 4.0


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


def data_densification(views: torch.Tensor, slots: int, num_groups: int) -> torch.Tensor:
    """G-VBSM's data-densification term per group, (G,).

    ``views`` (G*B, C, H, W) hold, in each group, whole classes of ``slots`` consecutive
    images. Per class c: ``X_c`` its views pooled to at most 32 x 32 and flattened (one row
    per image), ``lam`` the eigenvalues of ``X_c X_c^T``, and the term
    ``KL(softmax(lam / 4) || softmax(lam))`` with the target detached: it flattens the
    spectrum, spreading the class's images apart. Summed over a group's classes; 0 for a
    class of one image.
    """
    with torch.autocast(views.device.type, enabled=False):
        x = views.float()
        side = min(DD_SIDE, x.shape[-1])
        if x.shape[-1] != side:
            x = F.adaptive_avg_pool2d(x, side)
        per_class = x.flatten(1).unflatten(0, (-1, slots))  # (classes, slots, C*side*side)
        spectrum = torch.linalg.eigvalsh(per_class @ per_class.transpose(1, 2))
        target = torch.softmax(spectrum / DD_TEMPERATURE, dim=1).detach()
        kl = F.kl_div(torch.log_softmax(spectrum, dim=1), target, reduction="none").sum(1)
    return kl.view(num_groups, -1).sum(1)


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
    matcher: Callable[[MatchSetup], StatMatcher] = MATCHERS.get("batchnorm").build,
    plan: TeacherPlan | None = None,
    targets: Sequence[TeacherTargets] | None = None,
    slots: int = 1,
) -> RecoverResult:
    """Optimise ``init`` so the teachers' statistics and predictions match.

    Args:
        init: P0, the initial images in normalised space, shape (G*B, C, H, W);
            also the residual source for ARC.
        labels: class of each image, shape (G*B,).
        teachers: frozen eval-mode teachers. The iterations of a teacher without hooked
            layers use the cross-entropy term only.
        generators: one random stream per group (len G).
        settings: stages and hyperparameters (the method's stage plan already applied).
        runtime: device and mixed precision.
        bounds: per-channel (low, high) of valid pixels in normalised space, shape (1, C, 1, 1).
        on_step: called with (iteration, loss) after each step, e.g. to drive a progress bar.
        matcher: builds the statistics matcher of this batch (BatchNorm layers by default).
        plan: which teachers each iteration runs and their weights (default: every teacher,
            round robin, iteration t using teacher t mod K).
        targets: per teacher, its statistics targets, for matchers that need them.
        slots: consecutive images of one class in each group (the data-densification term
            needs more than one).
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
    plan = plan or TeacherPlan(tuple(range(len(teachers))))
    step = 0
    with matcher(MatchSetup(teachers, num_groups, settings, labels, generators, targets)) as statistics:
        for stage, (size, budget) in enumerate(zip(settings.sizes, settings.budgets)):
            x = x.detach().requires_grad_(True)
            optimizer = torch.optim.Adam([x], lr=settings.lr, betas=(0.5, 0.9), eps=1e-8)
            scaler = runtime.grad_scaler()
            for _ in range(budget):
                for group in optimizer.param_groups:
                    group["lr"] = cosine_lr(settings.lr, step, total)
                views = torch.cat([
                    ViewParams.sample(gen, size, settings.jitter, settings.crop_scale).apply(chunk, size)
                    for gen, chunk in zip(generators, x.chunk(num_groups))
                ])  # fmt: skip
                views = runtime.batch(views)
                with runtime.autocast():
                    terms = []
                    for position, weight in plan.members(step):
                        teacher = teachers[position]
                        logits = teacher(views)
                        ce = F.cross_entropy(logits.float(), labels, reduction="none")
                        bn = statistics.pop(teacher)
                        # Per-group losses: each group's gradient is exactly its own run's.
                        group_loss = ce.view(num_groups, -1).mean(1) + settings.r_bn * bn
                        if weight is not None:  # a committee member: its share of every term
                            ce, bn, group_loss = weight * ce, weight * bn, weight * group_loss
                        terms.append((ce, bn, group_loss))
                    if len(terms) > 1:
                        ce, bn, group_loss = (torch.stack(t).sum(0) for t in zip(*terms))
                    if settings.dd_weight > 0 and slots > 1:
                        group_loss = group_loss + settings.dd_weight * data_densification(views, slots, num_groups)
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
