"""What an evaluation keeps on disk besides its report: label stores and finished student runs.

* **Label store** (version 1): ``labels.json`` (what the labels were made for:
  :func:`label_store_identity`) and one ``epochNNNNN.safetensors`` of teacher outputs per epoch
  (:class:`LabelStore`), computed once (:func:`fill_label_store`) and read by every student that
  trains on the same views.
* **Finished run**: ``<eval>/runs/<key>.json`` holding ``identity`` and ``result``; the trained
  student beside it as ``<key>.pt`` (a teacher checkpoint: any command takes it as a teacher).
  An unfinished student's state is :class:`fadrm.artifacts.StudentCheckpoint`.

A store or run is reused only for the identity it was made for
(:func:`fadrm.artifacts.changed_settings`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import load_file, save_file

from ..artifacts import changed_settings, require_same_settings
from ..augment import ViewSampler
from ..config import EvalConfig
from ..data import DatasetSpec
from ..distributed import Ranks
from ..io import atomic_path, read_json, write_json
from ..labels import TeacherLabeller, label_epoch, soft_targets
from ..runtime import Runtime
from ..training import progress

STORED_FORMAT_VERSION = 1


def stored_label_bytes(num_classes: int, topk: int | None) -> int:
    """Bytes stored per image per epoch: fp16 logits, or fp16 probabilities plus int16 indices for top-k."""
    return 2 * num_classes if topk is None else topk * (2 + 2)


class LabelStore:
    """Per-epoch files of teacher outputs for a fixed (distilled set, seed, batching, views) plan.

    Args:
        folder: where the files live.
        identity: what the labels were made for; an existing store must match it.
        num_classes: classes of the dataset.
        topk: keep only the k largest probabilities per view (None: full logits).
        temperature: softmax temperature of the soft targets.
    """

    def __init__(self, folder: Path, identity: dict[str, Any], num_classes: int, topk: int | None, temperature: float):
        self.folder = Path(folder)
        self.identity = identity
        self.num_classes = num_classes
        self.topk = topk
        self.temperature = temperature

    def open(self) -> None:
        """Create the store, or check that an existing one was made for the same plan."""
        meta = self.folder / "labels.json"
        expected = {"format_version": STORED_FORMAT_VERSION, **self.identity, "topk": self.topk}
        if meta.exists():
            require_same_settings(
                read_json(meta), expected, f"the label store in {self.folder}", "use another --labels-dir"
            )
        else:
            write_json(meta, expected)

    def path(self, epoch: int) -> Path:
        return self.folder / f"epoch{epoch:05d}.safetensors"

    def has(self, epoch: int) -> bool:
        return self.path(epoch).exists()

    def write(self, epoch: int, logits: torch.Tensor) -> None:
        """Store one epoch of teacher logits, (images, classes), in epoch order."""
        if self.topk is None:
            tensors = {"logits": logits.to(torch.float16).contiguous()}
        else:
            probs = soft_targets(logits, self.temperature)
            values, indices = probs.topk(self.topk, dim=1)
            tensors = {"probs": values.to(torch.float16).contiguous(), "indices": indices.to(torch.int16).contiguous()}
        with atomic_path(self.path(epoch)) as tmp:
            save_file(tensors, str(tmp))

    def read(self, epoch: int) -> torch.Tensor:
        """One epoch's soft targets: probabilities at the store's temperature, (images, classes).

        Full logits give the exact softmax; top-k keeps the k largest
        probabilities and spreads the remaining mass evenly over the other classes.
        """
        return self.read_with_logits(epoch)[0]

    def read_with_logits(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One epoch's soft targets (as :meth:`read`) and the stored logits as float32 (None for top-k)."""
        tensors = load_file(str(self.path(epoch)))
        if "logits" in tensors:
            return soft_targets(tensors["logits"], self.temperature), tensors["logits"].float()
        probs, indices = tensors["probs"].float(), tensors["indices"].long()
        rest = (1.0 - probs.sum(1, keepdim=True)).clamp_min(0) / max(self.num_classes - self.topk, 1)
        full = rest.expand(len(probs), self.num_classes).clone()
        return full.scatter_(1, indices, probs), None

    def bytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("epoch*.safetensors"))


def read_finished_run(path: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The result stored in an evaluation run file, when it was made with ``identity``; else None."""
    if not path.exists():
        return None
    stored = read_json(path)
    return stored["result"] if not changed_settings(stored.get("identity", {}), identity) else None


def write_finished_run(path: Path, identity: dict[str, Any], result: dict[str, Any]) -> None:
    """Store one finished student run with the identity it was made for."""
    write_json(path, {"identity": identity, "result": result})


def label_store_identity(
    config: EvalConfig, images: int, ipc: int, set_teachers: Sequence[str], set_identity: dict[str, Any]
) -> dict[str, Any]:
    """What a label store is made for: the set's size and teachers, and the settings of the views
    and the relabelling (``set_teachers``: the set's own teachers' hashes, used when ``config``
    names none; ``set_identity``: what the set adds, its content for a set made by another tool).

    The keys are those of stores made since fadrm 0.1; an option added since appears only when it
    is not at its former behaviour, so older stores keep their identity.
    """
    return {
        "images": images,
        "ipc": ipc,
        "seed": config.seed,
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "mix": config.mix,
        "mix_alpha": config.mix_alpha,
        "crop_scale": list(config.crop_scale),
        "temperature": config.temperature,
        "bssl": config.bssl,
        "teachers": list(set_teachers) if not config.teachers else list(config.teachers),
        "teacher_weights": config.teacher_weights,
        **set_identity,
        **({} if config.augment else {"augment": False}),
        **(
            {"teacher_priors": config.teacher_priors, "prior_temperature": config.prior_temperature}
            if config.teacher_priors
            else {}
        ),
        **({"balance_teachers": True} if config.balance_teachers else {}),
        **({"rand_augment": True} if config.rand_augment else {}),
    }


def fill_label_store(
    store: LabelStore,
    config: EvalConfig,
    images: torch.Tensor,
    spec: DatasetSpec,
    labeller: TeacherLabeller,
    runtime: Runtime,
    log: Callable[[str], None],
    ranks: Ranks = Ranks(),
) -> None:
    """Open (or create) ``store`` and compute the epochs it lacks, on exactly the views the set's
    soft-label student draws (rank 0; the others wait)."""
    if ranks.is_main:
        store.open()
        sampler = ViewSampler.from_config(config, spec.image_size)
        missing = [e for e in range(config.epochs) if not store.has(e)]
        if missing:
            log(f"storing soft labels for {len(missing)} epochs in {store.folder}")
        for epoch in progress(missing, "labels"):
            logits = label_epoch(images, sampler, epoch, config.batch_size, labeller, spec.mean, spec.std, runtime)
            store.write(epoch, logits)
    ranks.barrier()
