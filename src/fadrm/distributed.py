"""Processes started by torchrun: sharding independent work, and training one model together.

Independent work (synthesis units) is shared out with :meth:`Ranks.shard` and coordinated
through files. One model trained by K processes (students, teachers) splits every batch
(:meth:`Ranks.share`), keeps the BatchNorm batch of one process (:class:`SyncedBatchNorm`) and
averages gradients (DistributedDataParallel, :meth:`Ranks.parallel`), so that it follows the
single-process model within float rounding.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass, replace
from typing import Any, Callable, ContextManager, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from .errors import GroupRefusal
from .runtime import Runtime

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place among ``world`` processes; ``owns_group`` when this call joined the
    process group, so that a stage run inside another (the full-data arm's teacher inside an
    evaluation) leaves the group to the stage that joined it."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share: every ``world``-th item starting at ``rank``."""
        return list(items[self.rank :: self.world])

    def main_only(self, log: Callable[[str], None]) -> Callable[[str], None]:
        """``log`` on rank 0, silence on the others: one process speaks for all."""
        return log if self.is_main else lambda line: None

    def share(self, items: range) -> slice:
        """This rank's contiguous part of ``items`` (positions in a batch): ``world`` near-equal parts in
        rank order, the first ones one larger when they do not divide evenly."""
        size, extra = divmod(len(items), self.world)
        first = items.start + self.rank * size + min(self.rank, extra)
        return slice(first, first + size + (self.rank < extra))

    def weighted(self, loss: torch.Tensor, mine: int, whole: int) -> torch.Tensor:
        """This rank's mean ``loss`` over ``mine`` of a batch's ``whole`` images, weighted so that the average
        of the ranks' gradients (what DistributedDataParallel computes) is the gradient of the whole
        batch's mean loss; itself in one process."""
        return loss if self.world == 1 else loss * (self.world * mine / whole)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over every rank, in place (unchanged in one process)."""
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor

    def own_device(self, runtime: Runtime) -> Runtime:
        """``runtime`` on this rank's GPU: each process of a multi-process run drives the GPU of its local rank."""
        if self.world > 1 and runtime.device.type == "cuda":
            return replace(runtime, device=torch.device("cuda", self.local_rank))
        return runtime

    def parallel(self, model: nn.Module) -> nn.Module:
        """What to call to train ``model`` with every rank: ``model`` itself in one process; otherwise a
        DistributedDataParallel wrapper of it, its BatchNorm layers synchronised first (in place).

        Save and validate ``model``, not the wrapper. Parameters and BatchNorm buffers stay
        identical on every rank (averaged gradients, statistics of the whole batch), so no
        buffers are broadcast.
        """
        if self.world == 1:
            return model
        synchronise_batchnorm(model)
        device = next(model.parameters()).device
        return DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )

    def close(self) -> None:
        """Leave the process group this call joined (no-op in a single process or inside another stage)."""
        if self.world > 1 and self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if self.world > 1:
            dist.barrier()


def init_ranks(device_type: str) -> Ranks:
    """Join the process group torchrun describes in the environment, if any.

    The group's timeout is generous because a rank may spend hours between
    collectives (rank 0 storing every epoch's labels while the others wait).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if dist.is_initialized():
        return Ranks(rank, world, local_rank)
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=48))
    return Ranks(rank, world, local_rank, owns_group=True)


def gradient_sync(network: nn.Module, sync: bool) -> ContextManager:
    """Around one forward and backward: with ``sync`` False, DistributedDataParallel only accumulates
    this rank's gradients (every micro-batch of a step but the last); a no-op for a plain module."""
    if isinstance(network, DistributedDataParallel) and not sync:
        return network.no_sync()
    return contextlib.nullcontext()


# ------------------------------------------------------- synchronised BatchNorm
class _SumOverRanks(torch.autograd.Function):
    """A tensor summed over every rank; the gradient of each rank's copy is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total


class SyncedBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are those of the batch spread over every process.

    Each process holds a part of the batch; the sums that make the mean and the variance
    are summed over the ranks (and so are their gradients, which reach every part), the running
    statistics take the same update as one process's BatchNorm on the whole batch, and are
    the same on every rank. torch's SyncBatchNorm does this on GPUs only; this one runs on
    any device (gloo on the CPU, nccl on CUDA). In eval mode, or in one process, it is plain
    BatchNorm. Same parameters and buffers as the layer it replaces, so state dicts match.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    @classmethod
    def like(cls, layer: _BatchNorm) -> "SyncedBatchNorm":
        """A synchronised layer sharing ``layer``'s parameters and buffers (same tensors)."""
        synced = cls(layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats)
        for name, tensor in [*layer.named_parameters(recurse=False), *layer.named_buffers(recurse=False)]:
            setattr(synced, name, tensor)
        return synced.train(layer.training)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        values = input.float()
        local_count = values.new_tensor([values.numel() / values.shape[1]])
        totals = _SumOverRanks.apply(torch.cat([values.sum(dims), local_count]))
        count = totals[-1].detach()  # values per channel over every rank
        mean = totals[:-1] / count
        centered = values - mean.view(shape)
        # Two passes, as BatchNorm: no cancellation in the variance.
        variance = _SumOverRanks.apply(centered.square().sum(dims)) / count
        output = centered * torch.rsqrt(variance + self.eps).view(shape)
        if self.affine:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self._track(mean.detach(), variance.detach() * count / (count - 1).clamp_min(1))
        return output.to(input.dtype)

    @torch.no_grad()
    def _track(self, mean: torch.Tensor, unbiased_variance: torch.Tensor) -> None:
        """BatchNorm's running-statistics update (exponential, or cumulative when momentum is None)."""
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased_variance, alpha=factor)


def synchronise_batchnorm(model: nn.Module) -> None:
    """Replace, in place, every BatchNorm1d/2d/3d of ``model`` by a :class:`SyncedBatchNorm` sharing its tensors.

    Raises:
        FadrmError: a BatchNorm variant with its own forward (timm's BatchNormAct2d, ...),
            which cannot be synchronised this way.
    """
    plain = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) in plain:
                setattr(parent, name, SyncedBatchNorm.like(child))
            elif isinstance(child, _BatchNorm) and not isinstance(child, SyncedBatchNorm):
                raise GroupRefusal(
                    f"{type(child).__name__} layers cannot be synchronised over processes; train "
                    "this model in one process"
                )
