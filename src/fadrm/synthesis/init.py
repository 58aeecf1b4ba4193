"""Initialisers: where a method's images start, registered by name.

An initialiser prepares what it needs once per run (patch selection writes the
chosen patches under ``init/``, resumably and sharded over processes), then
gives the initial images of each batch of work units in normalised space. One
whose images are files says where they are, so that a method whose stage plan
does not optimise (RDED) writes them out byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch

from ..artifacts import Layout
from ..config import DistillConfig
from ..data import DatasetSpec, ImageDataset, normalize
from ..data.datasets import read_image
from ..distributed import Ranks
from ..io import save_png, write_json
from ..registry import Registry
from ..runtime import Runtime
from ..seeding import make_generator
from ..teachers import Teacher
from ..training import progress
from .patches import select_class_patches
from .units import Unit


@dataclass(frozen=True)
class SynthesisRun:
    """What every part of one distillation run shares: settings, data, teachers, files, device, ranks."""

    config: DistillConfig
    spec: DatasetSpec
    dataset: ImageDataset
    teachers: list[Teacher]
    layout: Layout
    runtime: Runtime
    ranks: Ranks
    log: Callable[[str], None]


class Initialiser(Protocol):
    """How a method's images start."""

    def prepare(self, run: SynthesisRun) -> None:
        """Work done once per run before synthesis (this rank's share; finished parts are skipped)."""

    def initial_images(self, run: SynthesisRun, batch: Sequence[Unit], generators: Sequence[torch.Generator]) -> torch.Tensor:
        """The batch's initial images, normalised, (groups x classes, C, H, W), unit by unit."""

    def source_file(self, run: SynthesisRun, label: int, ipc_index: int) -> Path | None:
        """The file an initial image was read from, if any."""


class NoiseInitialiser:
    """Gaussian noise in normalised space (SRe2L), drawn from each unit's own stream."""

    def prepare(self, run: SynthesisRun) -> None:
        return None

    def initial_images(self, run: SynthesisRun, batch: Sequence[Unit], generators: Sequence[torch.Generator]) -> torch.Tensor:
        shape = (len(batch[0].classes), run.spec.channels, run.spec.image_size, run.spec.image_size)
        return torch.cat([torch.randn(shape, generator=g) for g in generators])

    def source_file(self, run: SynthesisRun, label: int, ipc_index: int) -> Path | None:
        return None


class PatchInitialiser:
    """Realistic patches of real training images chosen by the first teacher (RDED's selection)."""

    def prepare(self, run: SynthesisRun) -> None:
        layout = run.layout
        todo = [c for c in run.ranks.shard(range(len(layout.class_names))) if not layout.init_record(c).exists()]
        if not todo:
            return
        run.log(f"selecting realistic patches for {len(todo)} classes")
        teacher = run.teachers[0]
        for label in progress(todo, "patches"):
            images, record = select_class_patches(
                run.dataset, label, run.config.ipc, teacher.model, run.spec.mean, run.spec.std, run.spec.image_size,
                run.config.patches, make_generator(run.config.seed, "patches", label), run.runtime,
            )  # fmt: skip
            for ipc_index, image in enumerate(images):
                save_png(layout.image("init", label, ipc_index), image)
            write_json(layout.init_record(label), record)

    def initial_images(self, run: SynthesisRun, batch: Sequence[Unit], generators: Sequence[torch.Generator]) -> torch.Tensor:
        files = [self.source_file(run, c, u.ipc_index) for u in batch for c in u.classes]
        images = torch.stack([read_image(path, run.spec.channels) for path in files])
        return normalize(images.float().div_(255), run.spec.mean, run.spec.std)

    def source_file(self, run: SynthesisRun, label: int, ipc_index: int) -> Path:
        return run.layout.image("init", label, ipc_index)


INITIALISERS: Registry[Initialiser] = Registry("initialiser")
INITIALISERS.add("noise", NoiseInitialiser())
INITIALISERS.add("patches", PatchInitialiser())
