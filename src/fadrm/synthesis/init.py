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
from typing import Any, Callable, Protocol, Sequence

import functools
import itertools

import torch

from ..distilled import DistilledSet, Layout
from ..config import DistillConfig
from ..artifacts import changed_settings
from ..augment import coin_flip, resize
from ..data import DatasetSpec, ImageDataset, normalize
from ..data.datasets import read_image
from ..distributed import Ranks
from ..errors import FadrmError
from ..io import save_png, write_json
from ..registry import Registry
from ..runtime import Runtime
from ..teachers import Teacher
from ..training import progress
from .targets import TeacherTargets
from .patches import (
    class_pools,
    class_size_problem,
    crops_of_classes,
    decode_workers,
    indices_by_class,
    select_from_crops,
    selection_inputs,
)
from .units import Unit


@dataclass(frozen=True)
class SynthesisRun:
    """What every part of one distillation run shares: settings, data, teachers, files, device, ranks,
    and the teachers' statistics where the method matches them."""

    config: DistillConfig
    spec: DatasetSpec
    dataset: ImageDataset
    teachers: list[Teacher]
    layout: Layout
    runtime: Runtime
    ranks: Ranks
    log: Callable[[str], None]
    # Per teacher, its statistics targets and file description, for methods that match them.
    statistics: list[tuple[TeacherTargets, dict[str, Any]]] | None = None
    # The dataset's content (fadrm.data.digest.data_digest), what the run's results are computed from.
    data_sha256: str | None = None


class Initialiser(Protocol):
    """How a method's images start."""

    def problem(self, config: DistillConfig) -> str | None:
        """Why the settings cannot start this method's images (one line, checked before any work), or None."""

    def check(self, run: SynthesisRun) -> None:
        """Refuse, in one line and before anything is written, a run its data cannot start."""

    def prepare(self, run: SynthesisRun) -> None:
        """Work done once per run before synthesis (this rank's share; finished parts are skipped)."""

    def initial_images(
        self, run: SynthesisRun, batch: Sequence[Unit], generators: Sequence[torch.Generator]
    ) -> torch.Tensor:
        """The batch's initial images, normalised, (G*B, C, H, W), unit by unit in each unit's image order."""

    def source_file(self, run: SynthesisRun, label: int, ipc_index: int) -> Path | None:
        """The file an initial image was read from, if any."""


class NoiseInitialiser:
    """Gaussian noise in normalised space (SRe2L, G-VBSM), drawn from each unit's own stream."""

    def problem(self, config: DistillConfig) -> str | None:
        return None

    def check(self, run: SynthesisRun) -> None:
        return None

    def prepare(self, run: SynthesisRun) -> None:
        return None

    def initial_images(
        self, run: SynthesisRun, batch: Sequence[Unit], generators: Sequence[torch.Generator]
    ) -> torch.Tensor:
        shape = (batch[0].size, run.spec.channels, run.spec.image_size, run.spec.image_size)
        return torch.cat([torch.randn(shape, generator=g) for g in generators])

    def source_file(self, run: SynthesisRun, label: int, ipc_index: int) -> Path | None:
        return None


class PatchInitialiser:
    """Realistic patches of real training images chosen by the first teacher (RDED's selection)."""

    def problem(self, config: DistillConfig) -> str | None:
        return None

    def check(self, run: SynthesisRun) -> None:
        pools = class_pools(run.dataset)
        for label, name in enumerate(run.dataset.classes):
            problem = class_size_problem(len(pools.get(label, [])), label, name, run.config.ipc, run.config.patches)
            if problem:
                raise FadrmError(problem)

    def prepare(self, run: SynthesisRun) -> None:
        layout = run.layout
        changed: set[str] = set()
        todo = [c for c in run.ranks.shard(range(len(layout.class_names))) if not self.class_selected(run, c, changed)]
        if changed:
            run.log(f"patches selected with other {', '.join(sorted(changed))} are selected again")
        if not todo:
            return
        teacher, dataset, config = run.teachers[0], run.dataset, run.config
        workers = decode_workers(dataset, config.workers)
        run.log(
            f"selecting realistic patches for {len(todo)} classes"
            + (f" ({workers} decoding processes)" if workers else "")
        )
        candidates, crops = crops_of_classes(
            dataset,
            todo,
            config.ipc,
            config.patches,
            config.seed,
            run.spec.image_size // config.patches.factor,
            workers,
        )
        for label in progress(todo, "patches"):
            images, record = select_from_crops(
                candidates[label],
                itertools.islice(crops, len(candidates[label])),
                label,
                config.ipc,
                teacher.model,
                run.spec.mean,
                run.spec.std,
                run.spec.image_size,
                config.patches,
                run.runtime,
            )
            files = [layout.image("init", label, ipc_index) for ipc_index in range(len(images))]
            for path, image in zip(files, images):
                save_png(path, image)
            inputs = self.inputs(run)
            images = [layout.image_record(p) for p in files]
            write_json(layout.init_record(label), {**record, "inputs": inputs, "images": images})

    @staticmethod
    def inputs(run: SynthesisRun) -> dict[str, Any]:
        """What this run's selection depends on (:func:`~fadrm.synthesis.patches.selection_inputs`)."""
        return selection_inputs(run.config, run.teachers[0].sha256, run.data_sha256)

    def class_selected(self, run: SynthesisRun, label: int, changed: set[str]) -> bool:
        """Whether ``label``'s patches are selected for this run: its record intact and made from this run's
        inputs, its patch files the ones it recorded. The names of the inputs that differ are added to
        ``changed``."""
        layout = run.layout
        files = [layout.image("init", label, ipc_index) for ipc_index in range(run.config.ipc)]
        what = f"selecting the patches of class {label}"
        record = layout.intact_record(layout.init_record(label), files, what, run.log)
        if record is None:
            return False
        differ = changed_settings(record.get("inputs", {}), self.inputs(run))
        changed.update(differ)
        return not differ

    def initial_images(
        self, run: SynthesisRun, batch: Sequence[Unit], generators: Sequence[torch.Generator]
    ) -> torch.Tensor:
        files = [self.source_file(run, c, i) for u in batch for c, i in u.images]
        images = torch.stack([read_image(path, run.spec.channels) for path in files])
        return normalize(images.float().div_(255), run.spec.mean, run.spec.std)

    def source_file(self, run: SynthesisRun, label: int, ipc_index: int) -> Path:
        return run.layout.image("init", label, ipc_index)


@functools.lru_cache(maxsize=2)
def _set_images(folder: str, set_id: str) -> tuple[torch.Tensor, dict[int, list[int]]]:
    images, labels = DistilledSet.open(folder).images()
    return images, indices_by_class(labels.tolist())


class RealImageInitialiser:
    """Real images of each image's own class (EDC's real-image initialisation).

    Every image starts from an image of its class drawn at random, with replacement (so a
    unit may start twice from the same one), resized to the image size and flipped with
    probability 1/2; the draws come from the unit's own stream. The images are those of the
    training split (the run's holdout excluded), or, with ``--init-from``, those of a finished
    distilled set of the same dataset, classes and IPC (EDC on ImageNet-1k starts from RDED's).
    """

    def problem(self, config: DistillConfig) -> str | None:
        if config.init_from is None:
            return None
        source = DistilledSet.open(config.init_from)
        if (source.dataset, source.ipc) != (config.dataset, config.ipc):
            return (
                f"--init-from {config.init_from} holds a {source.dataset} set at IPC {source.ipc}; it must be "
                f"{config.dataset} at IPC {config.ipc}"
            )
        return None

    def check(self, run: SynthesisRun) -> None:
        return None

    def prepare(self, run: SynthesisRun) -> None:
        folder = run.config.init_from
        if folder is not None and tuple(DistilledSet.open(folder).class_names) != run.layout.class_names:
            raise FadrmError(f"--init-from {folder} was made for other classes than this run's")

    def initial_images(
        self, run: SynthesisRun, batch: Sequence[Unit], generators: Sequence[torch.Generator]
    ) -> torch.Tensor:
        folder = run.config.init_from
        if folder is None:
            images, pools = None, class_pools(run.dataset)
        else:
            images, pools = _set_images(folder, DistilledSet.open(folder).set_id())
        size = run.spec.image_size
        out = []
        for unit, gen in zip(batch, generators):
            for label, _ in unit.images:
                pool = pools[label]
                index = pool[int(torch.randint(len(pool), (), generator=gen))]
                image = images[index] if images is not None else run.dataset.load(index)
                image = resize(image[None].float().div(255), size)
                out.append(image.flip(-1) if coin_flip(gen) else image)
        return normalize(torch.cat(out), run.spec.mean, run.spec.std)

    def source_file(self, run: SynthesisRun, label: int, ipc_index: int) -> Path | None:
        return None


INITIALISERS: Registry[Initialiser] = Registry("initialiser")
INITIALISERS.add("noise", NoiseInitialiser())
INITIALISERS.add("patches", PatchInitialiser())
INITIALISERS.add("real-images", RealImageInitialiser())
