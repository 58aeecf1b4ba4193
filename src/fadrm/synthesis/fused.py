"""The fused statistics loss (``--fused-statistics``): every matched statistic of a model in one row
per group and one autograd node, whatever the depth.

The per-layer path (:class:`fadrm.synthesis.matching.StatMatcher`) builds a few small operations
per layer and statistic; on a GPU each is a launch issued by the host. Here a layer contributes
one reduction per statistic forward and one multiply-add backward; the distances, the EMA
surrogate, the class targets, the dropped convolution terms and the weights are a handful of
operations on the row of all statistics side by side.

Terms, in the matched layers' order:

* a BatchNorm layer: its input's per-channel mean and biased variance, computed by the
  :class:`BatchNormTap` standing in for the layer (which also gives the layer's output and its
  gradient, so the input's two gradients are summed in the tap's own backward);
* a convolution (G-VBSM, EDC): its input's channel statistics and patch statistics (the input
  resized up to multiples of the cell side P, per P x P cell the mean and biased variance over
  (B, C, P, P)), computed here from the input kept by a hook.

The row holds every mean (layer by layer: channels, then cells), then every variance in the same
order; each (layer, statistic) is one segment, whose distance ``||s - target||_2`` is a product
with a fixed one-hot matrix away.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from .bn_stats import mean_invstd, to_cells


# ------------------------------------------------------------------ layout
@dataclass(frozen=True)
class FusedTerm:
    """One matched layer: ``channels`` of its input; a convolution's input also has ``cells`` patch
    statistics of side ``cell`` (0 for a BatchNorm layer)."""

    channels: int
    cells: int = 0
    cell: int = 0


@dataclass(frozen=True)
class FusedLayout:
    """What the fused loss of one model needs besides the statistics, built once per batch.

    Attributes:
        num_groups: groups in the batch.
        terms: the matched layers, BatchNorm layers and convolutions in the model's order.
        sizes: columns of each row piece, means half then variances half (a term gives one
            piece per statistic: channels, then cells for a convolution).
        targets: (1, S) the global targets in the row's order (a BatchNorm layer's running
            buffers, a convolution's training-set statistics).
        class_targets: (G, S) each group's class targets (EDC), or None.
        segments: (S, Q) one-hot, column -> its segment; ``segments_t`` its transpose.
        weights: (Q,) each segment's weight (the first matched layer's multiplier on its own).
        exponents: (S,) 1, but -2 on the variance columns of BatchNorm taps of a single group
            (their kernel gives 1/sqrt(var + eps)); None where no column needs it.
        segment_term: (Q,) the convolution each segment belongs to, ``len(convolutions)`` for
            a BatchNorm segment: the column of an always-kept term in the keep matrix.
        column_term: (S,) the same per column.
    """

    num_groups: int
    terms: tuple[FusedTerm, ...]
    sizes: tuple[int, ...]
    targets: torch.Tensor
    class_targets: torch.Tensor | None
    segments: torch.Tensor
    segments_t: torch.Tensor
    weights: torch.Tensor
    exponents: torch.Tensor | None
    segment_term: torch.Tensor
    column_term: torch.Tensor
    _scales: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def means(self) -> int:
        """Columns of the means half."""
        return sum(self.sizes) // 2

    @staticmethod
    def build(
        terms: Sequence[FusedTerm],
        weights: Sequence[float],
        num_groups: int,
        targets: Sequence[tuple[torch.Tensor, ...]],
        class_targets: Sequence[tuple[torch.Tensor, ...]] | None,
        device: torch.device,
    ) -> "FusedLayout":
        """The layout of ``terms`` weighted ``weights``; per term its global targets and, for EDC, its
        per-group class targets: (mean, var) for a BatchNorm layer, (mean, var, patch mean, patch
        var) for a convolution, (C,) / (cells,) each, (G, ...) for class targets."""

        def halves(per_term: Sequence[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
            means = [t for term in per_term for t in term[0:1] + term[2:3]]
            variances = [t for term in per_term for t in term[1:2] + term[3:4]]
            return means + variances

        term_pieces = [[t.channels] + ([t.cells] if t.cells else []) for t in terms]
        half = [n for pieces in term_pieces for n in pieces]
        sizes = tuple(half * 2)
        # Per term: its index among the convolutions, or (BatchNorm) the always-kept column after them.
        convolutions = sum(1 for t in terms if t.cells)
        convolution_of, seen = [], 0
        for term in terms:
            convolution_of.append(seen if term.cells else convolutions)
            seen += bool(term.cells)
        piece_term = [convolution_of[i] for i, pieces in enumerate(term_pieces) for _ in pieces] * 2
        piece_weight = [weights[i] for i, pieces in enumerate(term_pieces) for _ in pieces] * 2
        owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        segments = torch.nn.functional.one_hot(owner, len(sizes)).float()
        global_row = torch.cat([t.float().flatten() for t in halves(targets)])[None]
        class_row = None
        if class_targets is not None:
            class_row = torch.cat([t.float().reshape(num_groups, -1) for t in halves(class_targets)], 1)
        exponents = None
        if num_groups == 1 and any(not t.cells for t in terms):
            marks = [[1.0] * n for n in half] + [
                [-2.0 if not terms[i].cells else 1.0] * n for i, pieces in enumerate(term_pieces) for n in pieces
            ]
            exponents = torch.tensor([e for piece in marks for e in piece], device=device)
        return FusedLayout(
            num_groups,
            tuple(terms),
            sizes,
            global_row.to(device),
            None if class_row is None else class_row.to(device),
            segments.to(device),
            segments.T.contiguous().to(device),
            torch.tensor(piece_weight, dtype=torch.float32, device=device),
            exponents,
            torch.tensor(piece_term, device=device),
            owner.new_tensor(piece_term)[owner].to(device),
        )

    def scales(self, shapes: Sequence[torch.Size]) -> torch.Tensor:
        """(S,) d mean / d x and d var / d x factors for inputs of ``shapes`` (one per term): 1/n per
        mean, 2/n per variance, n the values per (group, channel) or (group, cell); made once per shapes."""
        key = tuple(tuple(shape) for shape in shapes)
        if key not in self._scales:
            counts = []
            for shape, term in zip(key, self.terms):
                per_group = shape[0] // self.num_groups
                counts.append(per_group * math.prod(shape[2:]))  # per channel
                if term.cells:
                    counts.append(per_group * shape[1] * term.cell * term.cell)  # per cell
            per_piece = [1.0 / n for n in counts] + [2.0 / n for n in counts]
            values = torch.repeat_interleave(torch.tensor(per_piece, dtype=torch.float32), torch.tensor(self.sizes))
            self._scales[key] = values.to(self.targets.device)
        return self._scales[key]


# ------------------------------------------------------------ BatchNorm tap
class BatchNormTap(nn.Module):
    """Stands in for an eval-mode BatchNorm layer while the fused statistics loss is computed.

    It gives the layer's own output and keeps the statistics of its input for
    :class:`FusedStatisticsLoss`, in one autograd node whose backward is the layer's (eval mode:
    ``grad * weight / sqrt(running_var + eps)``) plus the statistics' share, ``x * a + b``,
    in two operations. Hooks would cost one more per layer: autograd adding the statistics'
    gradient of ``x`` to the layer's.

    :attr:`statistics`: ``(first, second, shape)`` of the last forward, until the loss takes
    it: for one group the kernel's per-channel mean and 1/sqrt(var + eps), (C,) each; for G
    groups the mean and biased variance, (G, 1, C, 1, ...) each; ``shape`` the input's.
    """

    def __init__(self, layer: nn.Module, num_groups: int) -> None:
        super().__init__()
        if layer.training or layer.running_mean is None or layer.running_var is None:
            raise ValueError(f"fused statistics need BatchNorm layers in eval mode with running statistics: {layer}")
        self.layer = layer
        self.num_groups = num_groups
        with torch.no_grad():
            scale = layer.running_var.float().add(layer.eps).rsqrt()
            if layer.weight is not None:
                scale = scale * layer.weight.float()
        # d output / d input of the eval-mode layer, per channel; then the constants through which
        # one eval-mode batch-norm call computes x * a + b from per-channel a and b.
        self._scale = scale
        self._scale_by_dims: dict[int, torch.Tensor] = {}
        self._zeros = torch.zeros_like(scale)
        self._ones = torch.ones_like(scale)
        self.statistics: tuple[torch.Tensor, torch.Tensor, torch.Size] | None = None

    def scale_for(self, dims: int) -> torch.Tensor:
        """The per-channel input gradient factor, shaped to broadcast over a ``dims``-dimensional input."""
        if dims not in self._scale_by_dims:
            self._scale_by_dims[dims] = self._scale.view(-1, *([1] * (dims - 2)))
        return self._scale_by_dims[dims]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.statistics is not None:
            raise RuntimeError(
                f"BatchNorm layer {self.layer} ran twice in one forward pass; the fused "
                "statistics loss needs each layer once"
            )
        output, first, second = _TappedBatchNorm.apply(x, self)
        self.statistics = (first, second, x.shape)
        return output


class _TappedBatchNorm(torch.autograd.Function):
    """:class:`BatchNormTap`'s node. Its statistics outputs feed :class:`FusedStatisticsLoss` only,
    whose backward hands them, in place of gradients, the coefficients ``b`` (for the first) and
    ``a`` (for the second) of the statistics' gradient of the input, ``x * a + b``: the two nodes
    are one mechanism, split where the forward pass splits them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, tap: BatchNormTap):  # type: ignore[override]
        layer = tap.layer
        output = torch.nn.functional.batch_norm(
            x, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.0, layer.eps
        )
        if tap.num_groups == 1:
            first, second = mean_invstd(x)
            saved = x
        else:
            saved = x.unflatten(0, (tap.num_groups, -1))
            second, first = torch.var_mean(saved, dim=(1, *range(3, saved.dim())), keepdim=True, correction=0)
        ctx.save_for_backward(saved)
        ctx.tap = tap
        ctx.shape = x.shape
        return output, first.float(), second.float()

    @staticmethod
    def backward(
        ctx,
        grad_output: torch.Tensor | None,
        shift: torch.Tensor | None,  # type: ignore[override]
        slope: torch.Tensor | None,
    ):
        (saved,) = ctx.saved_tensors
        tap: BatchNormTap = ctx.tap
        dims = len(ctx.shape)
        if shift is None:  # the statistics were not used: the layer's own gradient
            return (None if grad_output is None else grad_output * tap.scale_for(dims)), None
        if tap.num_groups == 1:
            # x * a + b as an eval-mode batch norm with mean 0, variance 1, weight a, bias b: one
            # operation, taking a and b as the (C,) vectors they are.
            grad = torch.ops.aten.native_batch_norm(saved, slope, shift, tap._zeros, tap._ones, False, 0.0, 0.0)[0]
        else:
            grad = torch.addcmul(shift, saved, slope).view(ctx.shape)
        if grad_output is not None:
            grad = grad.addcmul_(grad_output, tap.scale_for(dims))
        return grad.to(saved.dtype), None


# ------------------------------------------------------------------- loss
def _convolution_statistics(x: torch.Tensor, term: FusedTerm, groups: int):
    """A convolution input's channel mean and variance, (G, C), and patch mean and variance, (G, cells),
    with the two fp32 views of the input they were taken over (kept for the backward)."""
    x = x.float()
    grouped = x.view(groups, -1, *x.shape[1:])  # (G, B, C, H, W)
    channel_var, channel_mean = torch.var_mean(grouped, dim=(1, 3, 4), correction=0)
    cells = to_cells(x, term.cell, groups)  # (G, B, C, u, P, v, P)
    patch_var, patch_mean = torch.var_mean(cells, dim=(1, 2, 4, 6), correction=0)
    return (channel_mean, patch_mean.flatten(1), channel_var, patch_var.flatten(1)), (grouped, cells)


def _convolution_gradient(
    x: torch.Tensor,
    views: tuple[torch.Tensor, torch.Tensor],
    term: FusedTerm,
    channel: tuple[torch.Tensor, torch.Tensor],
    patch: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """The statistics' gradient of a convolution input ``x``: ``x * a + b`` per (group, channel), plus
    the same per (group, cell) on the resized input, taken back through the resize. ``channel``
    and ``patch``: their (b, a) coefficients, (G, C) and (G, cells)."""
    grouped, cells = views
    groups = grouped.shape[0]
    per_channel = (groups, 1, -1) + (1,) * (grouped.dim() - 3)
    grad = torch.addcmul(channel[0].view(per_channel), grouped, channel[1].view(per_channel)).reshape(x.shape)
    per_cell = (groups, 1, 1, cells.shape[3], 1, cells.shape[5], 1)
    resized = (x.shape[0], x.shape[1], cells.shape[3] * term.cell, cells.shape[5] * term.cell)
    patch_grad = torch.addcmul(patch[0].view(per_cell), cells, patch[1].view(per_cell)).reshape(resized)
    if resized[2:] != tuple(x.shape[2:]):
        patch_grad = torch.ops.aten.upsample_bilinear2d_backward(patch_grad, resized[2:], tuple(x.shape), False)
    return grad.add_(patch_grad).to(x.dtype)


class FusedStatisticsLoss(torch.autograd.Function):
    """The statistics loss of all of a model's matched layers as one autograd node, (G,).

    Per group: ``sum_t w_t keep_t D_t`` over the terms, ``D`` the sum over the term's statistics
    of ``||s - target||_2`` (EDC: ``(1 - share)`` times that to the global targets plus ``share``
    times that to the group's class targets), at the statistic itself or at its EMA surrogate
    ``s_hat <- a s_hat + (1 - a) s`` (starting at 0, kept where the term is dropped; the
    gradient is the statistic's); ``keep`` the convolution terms each group keeps this forward.
    The same loss as the per-layer path; other float rounding.

    Inputs after the non-tensor ones: the BatchNorm taps' first statistics, their second ones,
    then each convolution's input. The backward returns, for each tap's statistics, the
    coefficients the tap turns into its input's gradient (see :class:`_TappedBatchNorm`), not
    their gradient; for each convolution input its gradient.
    """

    @staticmethod
    def forward(
        ctx,
        layout: FusedLayout,
        ema: dict | None,
        coefficient: float,  # type: ignore[override]
        class_share: float,
        keep: torch.Tensor | None,
        shapes: tuple[torch.Size, ...],
        *inputs: torch.Tensor,
    ) -> torch.Tensor:
        groups = layout.num_groups
        taps = sum(1 for t in layout.terms if not t.cells)
        firsts, seconds, convolution_inputs = inputs[:taps], inputs[taps : 2 * taps], inputs[2 * taps :]
        convolution_views: list[tuple[torch.Tensor, torch.Tensor]] = []
        with torch.autocast(inputs[0].device.type, enabled=False):
            if not convolution_inputs and groups == 1:
                # BatchNorm's own statistics kernel gives 1/sqrt(var + eps), eps far below any fp32
                # variance's rounding, so the power -2 is the variance.
                stats = torch.cat(firsts + seconds).view(1, -1).pow(layout.exponents)
            elif not convolution_inputs and len({s.dim() for s in firsts}) == 1:
                stats = torch.cat(firsts + seconds, 2).view(groups, -1)
            else:
                means, variances, tap = [], [], 0
                convolutions = iter(convolution_inputs)
                for term in layout.terms:
                    if term.cells:
                        (mean, patch_mean, var, patch_var), views = _convolution_statistics(
                            next(convolutions), term, groups
                        )
                        convolution_views.append(views)
                        means += [mean, patch_mean]
                        variances += [var, patch_var]
                    else:
                        means.append(firsts[tap].reshape(groups, -1))
                        variances.append(seconds[tap].reshape(groups, -1))
                        tap += 1
                stats = torch.cat(means + variances, 1)
                if layout.exponents is not None:
                    stats = stats.pow(layout.exponents)
            mean = stats[:, : layout.means]
            if ema is not None:
                state = ema.get("state")
                surrogate = stats * (1 - coefficient)
                if state is not None:
                    surrogate = state * coefficient + surrogate
                if keep is not None:  # a dropped term keeps its state (0 before its first use)
                    surrogate = torch.where(keep[:, layout.column_term], surrogate, 0.0 if state is None else state)
                ema["state"] = surrogate
                stats = surrogate
            diff = stats - layout.targets
            norms = (diff.square() @ layout.segments).sqrt_()  # (G, Q)
            distance = norms
            class_diff = class_norms = None
            if class_share > 0:
                class_diff = stats - layout.class_targets
                class_norms = (class_diff.square() @ layout.segments).sqrt_()
                distance = torch.lerp(norms, class_norms, class_share)
            kept_segments = None if keep is None else keep[:, layout.segment_term].float()
            if kept_segments is not None:
                distance = distance * kept_segments
            loss = distance @ layout.weights
        ctx.save_for_backward(mean, diff, norms, class_diff, class_norms, kept_segments, *convolution_inputs)
        ctx.layout, ctx.class_share, ctx.shapes = layout, class_share, shapes
        ctx.tap_shapes = [s.shape for s in firsts]
        ctx.convolution_views = convolution_views  # fp32 views of the inputs, read by the backward only
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # type: ignore[override]
        mean, diff, norms, class_diff, class_norms, kept_segments, *convolution_inputs = ctx.saved_tensors
        layout: FusedLayout = ctx.layout
        share = ctx.class_share
        groups, half = layout.num_groups, layout.means
        with torch.autocast(grad_loss.device.type, enabled=False):
            # d ||d||_2 / d d = d / ||d||_2, and 0 where the distance is 0 (as autograd's norm).
            per_segment = torch.outer(grad_loss.float(), layout.weights)
            if kept_segments is not None:
                per_segment = per_segment * kept_segments
            if class_diff is None:
                grad = (per_segment.div(norms.clamp_min(1e-30)) @ layout.segments_t).mul_(diff)
            else:
                grad = ((per_segment * (1 - share)).div_(norms.clamp_min(1e-30)) @ layout.segments_t).mul_(diff)
                grad.addcmul_((per_segment * share).div_(class_norms.clamp_min(1e-30)) @ layout.segments_t, class_diff)
            # Per (group, column): [d mean / n | 2 d var / n]; the input's gradient is x * a + b
            # with a = 2 d var / n and b = d mean / n - a * mean.
            grad.mul_(layout.scales(ctx.shapes))
            grad[:, :half].sub_(grad[:, half:] * mean)
        tap_shapes = ctx.tap_shapes
        if not convolution_inputs:
            if groups == 1:
                return (None,) * 6 + grad.view(-1).split(layout.sizes)
            if len({len(s) for s in tap_shapes}) == 1:
                shape = tap_shapes[0]
                return (None,) * 6 + grad.view(shape[:2] + (-1,) + shape[3:]).split(layout.sizes, 2)
        pieces = iter(grad.split(layout.sizes, 1))
        means = [next(pieces) for _ in range(len(layout.sizes) // 2)]
        coefficients = iter(zip(means, pieces))  # (b, a) per statistic, in the layout's order
        shifts, slopes, convolution_grads = [], [], []
        convolutions = iter(zip(convolution_inputs, ctx.convolution_views))
        for term in layout.terms:
            b, a = next(coefficients)
            if term.cells:
                x, views = next(convolutions)
                convolution_grads.append(_convolution_gradient(x, views, term, (b, a), next(coefficients)))
            else:
                shape = tap_shapes[len(shifts)]
                shifts.append(b.reshape(shape))
                slopes.append(a.reshape(shape))
        return (None,) * 6 + tuple(shifts) + tuple(slopes) + tuple(convolution_grads)
