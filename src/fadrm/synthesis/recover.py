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
from ..training import backward, check_finite_values, optimizer_step
from .matching import MATCHERS, MatchSetup, StatMatcher
from .targets import TeacherTargets
from .methods import TeacherPlan

# G-VBSM's data densification: each class's views average-pooled to 32 x 32 (smaller images
# are kept as they are: pooling up would add nothing), and the temperature that flattens the
# target spectrum; both are the published constants.
DD_SIDE = 32
DD_TEMPERATURE = 4.0
# The published optimiser of the pixels.
ADAM_BETAS = (0.5, 0.9)
ADAM_EPS = 1e-8


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


class ImageAdam:
    """Adam on the one tensor of images, computed as ``torch.optim.Adam``'s single-tensor path does
    (the same operations in the same order: bitwise the same images on the CPU).

    The step count is a Python int (torch's optimiser keeps it in a tensor and reads it back
    every step), and there is no optimiser machinery around the seven operations of an update.
    """

    def __init__(self, param: torch.Tensor, betas: tuple[float, float], eps: float) -> None:
        self.param = param
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.exp_avg = torch.zeros_like(param, memory_format=torch.preserve_format)
        self.exp_avg_sq = torch.zeros_like(param, memory_format=torch.preserve_format)
        self.steps = 0

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """One update of ``param`` from its ``.grad`` at learning rate ``lr``."""
        grad = self.param.grad
        self.steps += 1
        self.exp_avg.lerp_(grad, 1 - self.beta1)
        self.exp_avg_sq.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        step_size = lr / (1 - self.beta1**self.steps)
        bias_correction2_sqrt = (1 - self.beta2**self.steps) ** 0.5
        denom = (self.exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
        self.param.addcdiv_(self.exp_avg, denom, value=-step_size)


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


def draw_views(
    x: torch.Tensor, generators: Sequence[torch.Generator], size: int, settings: SynthesisConfig
) -> torch.Tensor:
    """One iteration's views of the images: each group's crop, flip and shift drawn from its own stream."""
    if len(generators) == 1:
        return ViewParams.sample(generators[0], size, settings.jitter, settings.crop_scale).apply(x, size)
    return torch.cat(
        [
            ViewParams.sample(gen, size, settings.jitter, settings.crop_scale).apply(chunk, size)
            for gen, chunk in zip(generators, x.chunk(len(generators)))
        ]
    )


def recover(
    init: torch.Tensor,
    labels: torch.Tensor,
    teachers: Sequence[nn.Module],
    generators: Sequence[torch.Generator],
    settings: SynthesisConfig,
    runtime: Runtime,
    bounds: tuple[torch.Tensor, torch.Tensor],
    on_step: Callable[[int, float | None], None] | None = None,
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
        on_step: called with (iteration, None) after each step, e.g. to drive a progress bar, and
            with (iteration, that iteration's mean group loss) after a stage's last step (the
            losses are read from the device once per stage).
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
    setup = MatchSetup(teachers, num_groups, settings, labels, generators, targets, runtime.fused_statistics)
    with runtime.frozen_in_autocast(list(teachers)), matcher(setup) as statistics:
        for stage, (size, budget) in enumerate(zip(settings.sizes, settings.budgets)):
            x = x.detach().requires_grad_(True)
            scaler = runtime.grad_scaler()
            if scaler is None:
                adam = ImageAdam(x, ADAM_BETAS, ADAM_EPS)
            else:  # fp16: torch's optimiser, whose steps the scaler skips on overflow
                optimizer = torch.optim.Adam([x], lr=settings.lr, betas=ADAM_BETAS, eps=ADAM_EPS)
            # This stage's per-iteration mean group loss, kept on the device and read once at
            # its end: a read inside the loop would stall the device every iteration.
            stage_losses: list[torch.Tensor] = []
            for _ in range(budget):
                lr = cosine_lr(settings.lr, step, total)
                views = runtime.batch(draw_views(x, generators, size, settings))
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
                x.grad = None
                backward(loss, scaler)
                if scaler is None:
                    adam.step(lr)
                else:
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    optimizer_step(optimizer, scaler)
                with torch.no_grad():
                    x.clamp_(low, high)
                if step + 1 == total:  # the terms the result reports
                    result_ce, result_bn, result_loss = ce.detach(), bn.detach(), group_loss.detach()
                stage_losses.append(loss.detach())
                step += 1
                if on_step is not None and len(stage_losses) < budget:
                    on_step(step, None)
            if stage_losses:
                # A non-finite loss poisons the images for good; the stage's remaining steps cost
                # only time, and finding it here keeps the device free of reads.
                losses = torch.stack(stage_losses).div_(num_groups).cpu().tolist()  # the mean group loss
                check_finite_values(losses, f"synthesis (stage {stage + 1} of {len(settings.sizes)}, size {size})")
                history.extend(losses)
                if on_step is not None:
                    on_step(step, history[-1])
            if stage + 1 < len(settings.sizes):
                with torch.no_grad():
                    # A convex mix of in-range images stays in range: no clamp needed.
                    x = arc_merge(x.detach(), init, settings.sizes[stage + 1], settings.alpha)
    final = resize(x.detach(), init.shape[-1])
    return RecoverResult(final, result_ce, result_bn, result_loss, step, history)
