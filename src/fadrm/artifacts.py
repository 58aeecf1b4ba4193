"""Every file format fadrm writes, in one place: layout, version, reading, writing, and the identity check.

* **Teacher checkpoint** (``fadrm-teacher``, version 1): a ``torch.save`` dict of plain
  data, the state dict plus self-describing metadata, loadable with ``weights_only=True``;
  an unfinished training run keeps its per-epoch state in ``<checkpoint>.partial``, and the
  resolved training config is written to ``<checkpoint>.config.yaml``.
* **Distilled set** (``fadrm-distilled`` manifest, version 2; version 1 is read too): an ImageFolder of PNGs under
  ``images/``, the selected patches under ``init/``, one record per finished work unit under
  ``state/``, ``run.json`` (what defines the run), ``config.yaml`` (the resolved config,
  replayable with ``--config``) and ``manifest.json`` when complete (see :class:`Layout`).
* **Label store** (version 1): ``labels.json`` (what the labels were made for) and one
  ``epochNNNNN.safetensors`` of teacher outputs per epoch.
* **Evaluation run** : ``<eval>/runs/<key>.json`` holding ``identity`` and ``result``; the trained
  student beside it as ``<key>.pt`` (a teacher checkpoint: any command takes it as a teacher); an
  unfinished student's state after its last finished epoch in ``<key>.partial.pt``
  (:class:`StudentCheckpoint`), removed once the run is finished.

Every resume asks the same question, "was this file made for the same settings?", through
:func:`changed_settings`; a difference either refuses to continue
(:func:`require_same_settings`, naming the settings that differ) or, for a finished or an
unfinished student, means training it again.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import platform
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors.torch import load_file, save_file

from ._version import __version__
from .config import DistillConfig, defining_settings, write_config
from .errors import FadrmError
from .io import atomic_path, read_json, safe_name, save_torch, write_json

# ---------------------------------------------------------------- identity


def changed_settings(found: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """The names of the settings that differ between two identities, sorted (nested mappings are
    compared key by key, so a changed ``config.ipc`` is named ``ipc``)."""
    changed = []
    for key in sorted(set(found) | set(expected)):
        old, new = found.get(key), expected.get(key)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            changed += changed_settings(old, new)
        elif old != new:
            changed.append(key)
    return sorted(changed)


def require_same_settings(
    found: Mapping[str, Any], expected: Mapping[str, Any], what: str, fix: str, hints: Mapping[str, str] | None = None
) -> None:
    """Refuse to continue ``what`` when it was made with other settings: one line naming them and ``fix``.

    ``hints`` map a setting's name to advice shown when that setting differs (how to
    resume a folder an earlier version made).
    """
    changed = changed_settings(found, expected)
    if changed:
        advice = "".join(f"{hints[k]}; " for k in changed if hints and k in hints)
        raise FadrmError(f"{what} was made with different settings ({', '.join(changed)}); {advice}{fix}")


# --------------------------------------------------------- teacher checkpoint
CHECKPOINT_FORMAT = "fadrm-teacher"
CHECKPOINT_VERSION = 1


def checkpoint_dict(model: torch.nn.Module, meta: dict[str, Any]) -> dict[str, Any]:
    """Our checkpoint: the state dict plus self-describing metadata (all weights_only-safe types)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "fadrm_version": __version__,
        **meta,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def is_checkpoint(obj: Any, path: Path) -> bool:
    """Whether a loaded object is our checkpoint; one written by a newer version fails naming the fix."""
    if not (isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT):
        return False
    if obj.get("format_version", 0) > CHECKPOINT_VERSION:
        raise FadrmError(f"{path} was written by a newer fadrm ({obj.get('fadrm_version')}); upgrade fadrm")
    return True


def safe_torch_load(path: Path) -> Any:
    """``torch.load`` without executing pickled code; any failure is one line naming the file.

    Raises:
        FadrmError: the file holds pickled code or objects other than plain data, or is not a
            complete PyTorch file (text, a truncated download, an unrelated zip, ...).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols before it refuses
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Torch's safe unpickler cannot tell a pickle of code from bytes that are no pickle at all.
        raise FadrmError(
            f"refusing to load {path}: it is not a PyTorch checkpoint of plain weights (it holds pickled code or "
            "objects, or is no checkpoint at all); save a state_dict or use safetensors"
        ) from None
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:  # torch raises many types for a file that is not a checkpoint
        raise _not_a_checkpoint(path, exc) from None


def _not_a_checkpoint(path: Path, exc: Exception) -> FadrmError:
    detail = f"{type(exc).__name__}: {' '.join(str(exc).split())[:80]}"
    return FadrmError(
        f"cannot read {path} as a PyTorch checkpoint ({detail}); expected a fadrm teacher checkpoint, a state "
        "dict (.pt/.pth) or a .safetensors file"
    )


def partial_path(out: str | Path) -> Path:
    """Where an unfinished teacher run keeps its per-epoch state."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def save_teacher_progress(path: Path, identity: dict[str, Any], epoch: int, history: list[dict[str, float]],
                          states: dict[str, dict[str, Any]]) -> None:  # fmt: skip
    """Atomically save an unfinished teacher run after ``epoch``: its identity, history and the
    state dicts in ``states`` (model, optimizer, scheduler)."""
    save_torch(path, {"train_config": identity, "epoch": epoch, "history": history, **states})


def load_teacher_progress(path: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """An unfinished teacher run's saved state; one made with other settings is refused."""
    state = safe_torch_load(path)
    found = state.get("train_config", {}) if isinstance(state, dict) else {}
    require_same_settings(found, identity, f"the unfinished run {path}", "pass --overwrite to start again")
    return state


def teacher_config_path(out: str | Path) -> Path:
    """Where a teacher's resolved training config is written (beside the checkpoint)."""
    out = Path(out)
    return out.with_name(out.name + ".config.yaml")


# ------------------------------------------------------------- distilled set
MANIFEST_FORMAT = "fadrm-distilled"
# 2 (fadrm 0.3): the config nested by part (synthesis, patches) and the method's "stage_plan";
# 1 (0.1-0.2): a flat config and "recover_settings". Both are read.
MANIFEST_VERSION = 2
# What to pass to resume a set made by fadrm 0.1 whose defaults have changed since.
RESUME_HINTS = {
    "patch_scoring": "fadrm 0.1 scored patches with --patch-scoring resize",
    "budgets": "fadrm 0.1 gave SRe2L / SRe2L++ FADRM's budget: --equal-budget",
}


@dataclass(frozen=True)
class Layout:
    """File names inside a distilled set's folder."""

    root: Path
    class_names: tuple[str, ...]
    ipc: int

    def class_dir(self, kind: str, label: int) -> Path:
        width = max(3, len(str(len(self.class_names) - 1)))
        return self.root / kind / f"{label:0{width}d}_{safe_name(self.class_names[label])}"

    def image(self, kind: str, label: int, ipc_index: int) -> Path:
        """``kind`` "images" (the distilled set) or "init" (the selected patches)."""
        width = max(3, len(str(self.ipc - 1)))
        return self.class_dir(kind, label) / f"{ipc_index:0{width}d}.png"

    def init_record(self, label: int) -> Path:
        return self.root / "state" / "init" / f"class{label:05d}.json"

    def unit_record(self, key: str) -> Path:
        return self.root / "state" / "units" / f"{key}.json"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def run_file(self) -> Path:
        return self.root / "run.json"

    @property
    def config_file(self) -> Path:
        return self.root / "config.yaml"

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


def run_identity(config: DistillConfig, teachers_sha256: list[str | None]) -> dict[str, Any]:
    """What defines a distilled set: its defining settings and its teachers' file hashes."""
    return {"config": config.identity(), "teachers_sha256": list(teachers_sha256)}


def open_distilled_folder(
    layout: Layout, config: DistillConfig, teachers_sha256: list[str | None], log: Callable[[str], None]
) -> None:
    """Create the folder, or check that an existing one holds the same run (resume).

    With ``config.overwrite`` a different run's outputs are removed first; a non-empty
    folder that is not a fadrm run is never touched.
    """
    identity = run_identity(config, teachers_sha256)
    if layout.run_file.exists():
        previous = read_json(layout.run_file)
        if not changed_settings(previous, identity):
            log(f"resuming in {layout.root}")
        elif config.overwrite:
            log(f"--overwrite: removing the previous run's outputs in {layout.root}")
            for name in ("images", "init", "state"):
                shutil.rmtree(layout.root / name, ignore_errors=True)
            for path in (layout.manifest, layout.config_file):
                path.unlink(missing_ok=True)
        else:
            previous = {**previous.get("config", {}), "teachers": previous.get("teachers_sha256")}
            require_same_settings(previous, {**identity["config"], "teachers": identity["teachers_sha256"]},
                                  f"{layout.root} holds a run that", "pass --overwrite to replace it or choose another "
                                  "--out", RESUME_HINTS)  # fmt: skip
    elif layout.root.exists() and any(layout.root.iterdir()) and not config.overwrite:
        raise FadrmError(f"{layout.root} is not empty and is not a fadrm run; choose another --out")
    layout.root.mkdir(parents=True, exist_ok=True)
    write_json(layout.run_file, identity)
    write_config(layout.config_file, config)


def write_manifest(layout: Layout, contents: dict[str, Any]) -> dict[str, Any]:
    """Write ``manifest.json``: the format header, the environment, then ``contents``."""
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "fadrm_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        **contents,
        "complete": True,
    }
    write_json(layout.manifest, manifest)
    return manifest


@dataclass(frozen=True)
class DistilledSet:
    """A finished distilled set on disk, read through its manifest (format 1 or 2).

    Attributes:
        folder: the set's folder.
        manifest: the manifest as written (for reports; prefer the properties).
    """

    folder: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, folder: str | Path) -> DistilledSet:
        """The set in ``folder``, checked for format and completeness."""
        path = Path(folder) / "manifest.json"
        if not path.exists():
            raise FadrmError(f"{folder} is not a distilled set (no manifest.json); make one with: fadrm distill")
        manifest = read_json(path)
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise FadrmError(f"{path} is not a fadrm manifest")
        if manifest.get("format_version", 0) > MANIFEST_VERSION:
            raise FadrmError(f"{path} was written by a newer fadrm ({manifest.get('fadrm_version')}); upgrade fadrm")
        return cls(Path(folder), manifest)

    @property
    def dataset(self) -> str:
        return self.manifest["dataset"]["name"]

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["dataset"]["class_names"])

    @property
    def method(self) -> str:
        return self.manifest["method"]

    @property
    def ipc(self) -> int:
        return int(self.manifest["ipc"])

    @property
    def holdout(self) -> int:
        """Training images per class the set's teachers and patches never saw (validated on)."""
        return int(self.manifest["config"].get("holdout", 0))

    @property
    def teachers(self) -> list[dict[str, Any]]:
        """The teachers that made the set, as described in the manifest (source, sha256, ...)."""
        return list(self.manifest["teachers"])

    def set_id(self) -> str:
        """A fingerprint of the set's content: the settings that define it and its per-image records.

        Execution choices (device, batching, compilation, ...) and timings are left
        out, so resuming a set with other execution flags, or with a version that
        added one, keeps its finished evaluations; format 1's flat config and format
        2's nested one give the same id.
        """
        defining = defining_settings(DistillConfig, self.manifest["config"])
        payload = json.dumps({"config": defining, "images": self.manifest["images"]}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every image the manifest lists (uint8, N x C x H x W) and its class, in the manifest's order."""
        from .data.datasets import read_image

        images, labels = [], []
        for record in self.manifest["images"]:
            path = self.folder / record["file"]
            if not path.exists():
                raise FadrmError(f"{path} listed in the manifest is missing; rerun fadrm distill")
            images.append(read_image(path, self.manifest["dataset"]["channels"]))
            labels.append(record["class"])
        return torch.stack(images), torch.tensor(labels)


# ---------------------------------------------------------------- label store
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
            require_same_settings(read_json(meta), expected, f"the label store in {self.folder}",
                                  "use another --labels-dir")  # fmt: skip
        else:
            write_json(meta, expected)

    def path(self, epoch: int) -> Path:
        return self.folder / f"epoch{epoch:05d}.safetensors"

    def has(self, epoch: int) -> bool:
        return self.path(epoch).exists()

    def write(self, epoch: int, logits: torch.Tensor) -> None:
        """Store one epoch of teacher logits, (images, classes), in epoch order."""
        from .labels import soft_targets

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
        from .labels import soft_targets

        tensors = load_file(str(self.path(epoch)))
        if "logits" in tensors:
            return soft_targets(tensors["logits"], self.temperature)
        probs, indices = tensors["probs"].float(), tensors["indices"].long()
        rest = (1.0 - probs.sum(1, keepdim=True)).clamp_min(0) / max(self.num_classes - self.topk, 1)
        full = rest.expand(len(probs), self.num_classes).clone()
        return full.scatter_(1, indices, probs)

    def bytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("epoch*.safetensors"))


# ----------------------------------------------------------- evaluation runs
def read_finished_run(path: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The result stored in an evaluation run file, when it was made with ``identity``; else None."""
    if not path.exists():
        return None
    stored = read_json(path)
    return stored["result"] if not changed_settings(stored.get("identity", {}), identity) else None


def write_finished_run(path: Path, identity: dict[str, Any], result: dict[str, Any]) -> None:
    """Store one finished student run with the identity it was made for."""
    write_json(path, {"identity": identity, "result": result})


class StudentCheckpoint:
    """An unfinished student run's state after its last finished epoch (format version 1).

    A ``torch.save`` dict of plain data, loadable with ``weights_only=True``: the run's
    identity, the epoch, the history so far, the seconds spent, and the state dicts the loop
    gives (model with its BatchNorm buffers, optimiser, scheduler, gradient scaler, global
    random generators). The run's key and identity define a student, so a checkpoint made with
    other settings is stale: it is replaced, with a line naming the settings, as a finished
    run of other settings is retrained.
    """

    VERSION = 1

    def __init__(self, path: Path, identity: dict[str, Any]) -> None:
        self.path = Path(path)
        self.identity = identity

    def load(self, log: Callable[[str], None]) -> dict[str, Any] | None:
        """The saved state when there is one for this identity, else None."""
        if not self.path.exists():
            return None
        state = safe_torch_load(self.path)
        changed = changed_settings(state.get("identity", {}), self.identity)
        if changed:
            log(f"{self.path} holds a student of other settings ({', '.join(changed)}); starting it again")
            return None
        return state

    def save(self, epoch: int, history: list[dict[str, Any]], seconds: float, states: dict[str, Any]) -> None:
        """Atomically replace the checkpoint with the state after ``epoch`` (1-based) finished epochs."""
        save_torch(self.path, {"format_version": self.VERSION, "identity": self.identity, "epoch": epoch,
                               "history": history, "seconds": seconds, **states})  # fmt: skip

    def remove(self) -> None:
        """Delete the checkpoint (once the finished run is written: it is fadrm's, not the user's)."""
        self.path.unlink(missing_ok=True)
