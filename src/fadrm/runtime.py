"""The one device and precision decision, made once at the top of each command."""

from __future__ import annotations

import contextlib
import os
import queue
import resource
import shutil
import threading
from dataclasses import dataclass
from typing import Any, ContextManager, Iterator, TypeVar

import torch
from torch import nn

from .errors import FadrmError

AMP_MODES = ("auto", "off", "fp16", "bf16")
# What ``--amp auto`` means on CUDA for each stage (on the CPU it is always off). Synthesis runs
# fp16 autocast with a gradient scaler, relabelling and student training full precision, both as
# the published runs do; the reference publishes no teacher training, so teachers take the
# fastest safe choice: bf16 where the GPU supports it.
CUDA_AUTO_AMP = {"synthesis": "fp16", "evaluate": "off", "teacher": "bf16"}


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` on ``device``, without making the host wait for the device's queued work.

    A copy from ordinary (pageable) host memory to a GPU first waits for every kernel queued
    before it, which would hold the host back from drawing the next batch's views while the
    GPU trains on this one. A CPU tensor bound for CUDA therefore goes through pinned memory
    (PyTorch's caching host allocator keeps it until the copy is done) and is copied
    asynchronously. The values are those of a plain ``.to(device)``.
    """
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


T = TypeVar("T")


def prefetched(items: Iterator[T]) -> Iterator[T]:
    """``items``, each produced one ahead in a background thread: the host prepares the next (a batch's
    views) while the device works on this one. The same items in the same order; an error in the producer
    is raised here; leaving early (an error, Ctrl-C) stops the producer after the item it is making."""
    handoff: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def hand(message: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                handoff.put(message, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not hand(("item", item)):
                    return
            hand(("done", None))
        except BaseException as exc:  # handed to the consumer, which raises it
            hand(("error", exc))

    thread = threading.Thread(target=produce, name="fadrm-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = handoff.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join()


@dataclass(frozen=True)
class Runtime:
    """Where tensors live and how the forward pass is computed.

    Attributes:
        device: the torch device.
        amp: "off", "fp16" or "bf16" (already resolved from "auto").
        channels_last: run convolutions on channels-last tensors.
        compile: wrap models in ``torch.compile`` where :meth:`place` is asked to.
        fused_statistics: synthesis computes the BatchNorm-statistics loss of all of a model's
            layers in one autograd node (fewer host operations, other rounding).
        fused_optimizer: students step with torch's fused optimiser kernels (one operator and no scalar read
            per step, other rounding) instead of its per-parameter (CPU) or multi-tensor (CUDA) loop.
        host_views: student and relabelling views are rendered on the host, then copied to the device (the
            same pixels as rendering them on the device: :func:`fadrm.augment.render`).
        prefetch_views: the next batch's views are drawn and rendered in a background thread while the
            device trains on this one.
    """

    device: torch.device
    amp: str
    channels_last: bool = False
    compile: bool = False
    fused_statistics: bool = False
    fused_optimizer: bool = False
    host_views: bool = True
    prefetch_views: bool = False

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.amp)

    def autocast(self) -> ContextManager:
        """Autocast for the forward pass and loss, or a no-op when precision is full."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    @contextlib.contextmanager
    def frozen_in_autocast(self, models: list[nn.Module]) -> Iterator[None]:
        """Within it, the frozen convolution and linear weights of ``models`` are held in the autocast dtype.

        Autocast casts every such weight to its dtype at every forward: one copy per layer and
        pass, which for a frozen teacher is the same copy each time. Cast once here instead, the
        forward is bitwise the same (autocast casts nothing already in its dtype). The fp32
        tensors are put back on leaving, whatever happens. A no-op in full precision and for
        compiled models (a dtype change would make them recompile).
        """
        saved: list[tuple[nn.Parameter, torch.Tensor]] = []
        try:
            if self.amp_dtype is not None:
                for model in models:
                    if hasattr(model, "_orig_mod"):
                        continue
                    for module in model.modules():
                        if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                            continue
                        for parameter in module.parameters(recurse=False):
                            if not parameter.requires_grad and parameter.dtype == torch.float32:
                                saved.append((parameter, parameter.data))
                                parameter.data = parameter.data.to(self.amp_dtype)
            yield
        finally:
            for parameter, data in saved:
                parameter.data = data

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A gradient scaler, needed only for fp16 (bf16 has fp32's range)."""
        return torch.amp.GradScaler(self.device.type) if self.amp == "fp16" else None

    def place(self, model: nn.Module, compile: bool = False) -> nn.Module:
        """``model`` on the device in the chosen memory format, compiled when ``compile`` and this runtime agree.

        The module is moved in place and returned; with compilation the return
        value is a wrapper that shares its parameters (save the original's
        state dict, not the wrapper's).
        """
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return torch.compile(model) if compile and self.compile else model

    def batch(self, tensor: torch.Tensor) -> torch.Tensor:
        """An input batch on the device in the chosen memory format."""
        tensor = tensor.to(self.device, non_blocking=True)
        return tensor.contiguous(memory_format=torch.channels_last) if self.channels_last else tensor

    def peak_memory(self) -> int:
        """This process's peak memory in bytes: the CUDA allocator's peak on a GPU (since the last
        ``torch.cuda.reset_peak_memory_stats``), else the process's peak resident memory."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

    def describe(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return (
            f"{name} ({self.device}), amp={self.amp}"
            + (", compiled" if self.compile else "")
            + (", fused statistics" if self.fused_statistics else "")
        )


def make_runtime(
    device: str | None = "auto",
    amp: str | None = "auto",
    channels_last: bool | None = None,
    compile: bool = False,
    stage: str = "synthesis",
    fused_statistics: bool = False,
    fused_optimizer: str = "auto",
    views: str = "auto",
    prefetch_views: str = "auto",
) -> Runtime:
    """Resolve ``device`` ("auto", "cpu", "cuda", "cuda:N") and ``amp`` ("auto", "off", "fp16", "bf16").

    "auto" picks CUDA when present; ``amp`` "auto" means, on CUDA, the ``stage``'s
    published precision (:data:`CUDA_AUTO_AMP`: fp16 for "synthesis", off for
    "evaluate", bf16 where supported for "teacher"), and on CPU full precision
    (mixed precision there only when asked for, bf16 only).
    ``channels_last`` defaults to on for the CPU, where it measured 1.4x
    faster for ConvNet training (41.5 vs 28.7 s per Fashion-MNIST epoch).
    ``compile`` enables ``torch.compile`` for the models placed with
    ``compile=True`` (the synthesis teachers): off by default, because on the
    CPU it measured only 3% faster for ResNet-18 (none for small ConvNets)
    after minutes of compilation per input size.
    ``fused_statistics``: see :class:`Runtime`; off by default until a GPU run has
    timed it (the CPU default must keep 0.3.0's bytes).
    ``fused_optimizer`` ("auto", "on", "off"): auto is on for the CPU, where AdamW's fused step measured
    4.8x faster than the per-parameter loop for a CIFAR ResNet-18 (5.3 against 25 ms, one thread:
    ``benchmarks/optimizer_step.py``), and off on CUDA until a GPU run has timed it (torch's multi-tensor
    step there).
    ``views`` ("auto", "device", "host"): where student views are rendered; auto is the device itself (on
    CUDA the batch at once, as run on an H200 in 0.3). ``prefetch_views`` ("auto", "on", "off"): auto is on
    where views are rendered on the host for a GPU. Neither host rendering nor prefetching has run on a GPU:
    ``benchmarks/gpu_check.sh`` times them.
    """
    device = device or "auto"
    amp = amp or "auto"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise FadrmError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FadrmError("--device cuda asked for, but no CUDA device is available; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise FadrmError(f"device {device!r} is not supported; use cpu or cuda")
    if amp not in AMP_MODES:
        raise FadrmError(f"unknown --amp {amp!r}; choose one of {', '.join(AMP_MODES)}")
    if amp == "auto":
        amp = CUDA_AUTO_AMP[stage] if dev.type == "cuda" else "off"
        if amp == "bf16" and not torch.cuda.is_bf16_supported():
            amp = "fp16"
    if amp == "fp16" and dev.type == "cpu":
        raise FadrmError("--amp fp16 needs CUDA; on CPU use --amp bf16 or off")
    if channels_last is None:
        channels_last = dev.type == "cpu"
    # Inductor builds C++ kernels for the CPU; without a compiler it fails deep inside the first forward.
    if (
        compile
        and dev.type == "cpu"
        and not any(shutil.which(c) for c in (os.environ.get("CXX"), "g++", "clang++") if c)
    ):
        raise FadrmError(
            "--compile on the CPU needs a C++ compiler (g++ or clang++) on PATH; install one or drop --compile"
        )
    if fused_optimizer not in ("auto", "on", "off"):
        raise FadrmError(f"unknown --fused-optimizer {fused_optimizer!r}; choose auto, on or off")
    fused = dev.type == "cpu" if fused_optimizer == "auto" else fused_optimizer == "on"
    if views not in ("auto", "device", "host") or prefetch_views not in ("auto", "on", "off"):
        raise FadrmError(f"unknown --views {views!r} or --prefetch-views {prefetch_views!r}")
    host_views = dev.type == "cpu" or views == "host"
    prefetch = host_views and dev.type == "cuda" if prefetch_views == "auto" else prefetch_views == "on"
    return Runtime(dev, amp, channels_last, compile, fused_statistics, fused, host_views, prefetch)
