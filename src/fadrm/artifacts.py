"""Every file format fadrm writes, in one place: layout, version, reading, writing, and the identity check.

* **Teacher checkpoint** (``fadrm-teacher``, version 1): a ``torch.save`` dict of plain
  data, the state dict plus self-describing metadata, loadable with ``weights_only=True``;
  an unfinished training run keeps its per-epoch state in ``<checkpoint>.partial``, and the
  resolved training config is written to ``<checkpoint>.config.yaml``.
* **Distilled set** (``fadrm-distilled`` manifest): :mod:`fadrm.distilled`.
* **Unfinished student**: an evaluation's student's state after its last finished epoch in
  ``<eval>/runs/<key>.partial.pt`` (:class:`StudentCheckpoint`), removed once the run is finished.
  The evaluation's other files, its label stores and finished runs, are
  :mod:`fadrm.evaluation.store`'s.
* **Set made by another tool** (read only): an ImageFolder without a manifest, read as a
  registered dataset's classes (:class:`fadrm.data.foreign.ImageFolderSet`).
* **Statistics file** (``fadrm-statistics``): :mod:`fadrm.synthesis.statistics`, the pass that
  writes and reads it.
* **Priors file** (``fadrm-priors``, version 1): ``priors.json`` (``fadrm priors``), each teacher's
  source, sha256 and prior with the student and protocol that scored them; ``--priors-from``
  reads it, matching teachers by their hashes.

Every resume asks the same question, "was this file made for the same settings?", through
:func:`changed_settings`; a difference either refuses to continue
(:func:`require_same_settings`, naming the settings that differ) or, for a finished or an
unfinished student, means training it again.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ._version import __version__
from .errors import FadrmError
from .io import read_json, save_torch, seal, seal_broken, set_aside, write_json

# ---------------------------------------------------------------- identity


# Keys that identities written by fadrm 0.3 and earlier held and that name a place, not content: the
# evaluated set's folder (a set is identified by its content since 0.4). Never compared, so a moved
# set's finished students are reused.
PLACE_KEYS = frozenset({"distilled"})
# Keys identities hold since fadrm 0.4, compared only where the stored identity has them: a result made
# before is taken as made from the same data (what it was made from was not recorded).
RECORDED_SINCE_0_4 = frozenset({"data_sha256"})


def changed_settings(found: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """The names of the settings that differ between two identities, sorted (nested mappings are
    compared key by key, so a changed ``config.ipc`` is named ``ipc``; :data:`PLACE_KEYS` are not
    compared, nor :data:`RECORDED_SINCE_0_4` where ``found`` lacks them)."""
    changed = []
    for key in sorted((set(found) | set(expected)) - PLACE_KEYS):
        if key in RECORDED_SINCE_0_4 and key not in found:
            continue
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


def checkpoint_meta(
    arch: str,
    arch_args: dict[str, Any],
    dataset: str,
    class_names: Sequence[str],
    channels: int,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    top1: float,
    top5: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """What every teacher checkpoint says of itself (beside its weights, see :func:`checkpoint_dict`), in one
    order: the architecture and its arguments, the dataset, its classes and input, the validation accuracy,
    then ``extra`` (e.g. the training history and the settings' identity)."""
    meta = {
        "arch": arch,
        "arch_args": arch_args,
        "dataset": dataset,
        "class_names": list(class_names),
        "in_channels": channels,
        "image_size": image_size,
        "mean": list(mean),
        "std": list(std),
        "val_top1": top1,
    }
    if top5 is not None:
        meta["val_top5"] = top5
    return {**meta, **extra}


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


def save_teacher_progress(
    path: Path, identity: dict[str, Any], epoch: int, history: list[dict[str, float]], states: dict[str, dict[str, Any]]
) -> None:
    """Atomically save an unfinished teacher run after ``epoch``: its identity, history and the
    state dicts in ``states`` (model, optimizer, scheduler)."""
    save_torch(path, seal({"train_config": identity, "epoch": epoch, "history": history, **states}))


def load_unfinished(
    path: Path, identity_key: str, progress_key: str, redo: str, log: Callable[[str], None]
) -> dict[str, Any] | None:
    """An unfinished run's sealed state (:func:`fadrm.io.seal`), or None when it is damaged: unreadable,
    without its ``identity_key`` mapping or its ``progress_key``, or not what was sealed. A damaged one is
    set aside with one line saying that ``redo`` follows."""
    try:
        state = safe_torch_load(path)
    except FadrmError:
        state = None
    if (
        not isinstance(state, dict)
        or not isinstance(state.get(identity_key), dict)
        or progress_key not in state
        or seal_broken(state)
    ):
        log(f"{path} is damaged; kept as {set_aside(path).name}, {redo}")
        return None
    return state


def load_teacher_progress(path: Path, identity: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any] | None:
    """An unfinished teacher run's saved state; one made with other settings is refused. A damaged one
    (unreadable, or without its settings and epoch) is set aside, with one line, and None returned: the
    run starts again."""
    state = load_unfinished(path, "train_config", "epoch", "training the teacher from the start", log)
    if state is None:
        return None
    require_same_settings(
        state["train_config"], identity, f"the unfinished run {path}", "pass --overwrite to start again"
    )
    return state


def teacher_config_path(out: str | Path) -> Path:
    """Where a teacher's resolved training config is written (beside the checkpoint)."""
    out = Path(out)
    return out.with_name(out.name + ".config.yaml")


# ----------------------------------------------------------- evaluation runs
class StudentCheckpoint:
    """An unfinished student run's state after its last finished epoch (format version 1).

    A ``torch.save`` dict of plain data, loadable with ``weights_only=True``: the run's
    identity, the epoch, the history so far, the seconds spent, and the state dicts the loop
    gives (model with its BatchNorm buffers, optimiser, scheduler, gradient scaler, the EMA of
    the weights where the protocol keeps one, global random generators). The run's key and
    identity define a student, so a checkpoint made with other settings is stale: it is
    replaced, with a line naming the settings, as a finished run of other settings is retrained.
    """

    VERSION = 1

    def __init__(self, path: Path, identity: dict[str, Any]) -> None:
        self.path = Path(path)
        self.identity = identity

    def load(self, log: Callable[[str], None]) -> dict[str, Any] | None:
        """The saved state when there is one for this identity, else None."""
        if not self.path.exists():
            return None
        state = load_unfinished(self.path, "identity", "epoch", "starting the student again", log)
        if state is None:
            return None
        changed = changed_settings(state.get("identity", {}), self.identity)
        if changed:
            log(f"{self.path} holds a student of other settings ({', '.join(changed)}); starting it again")
            return None
        return state

    def save(self, epoch: int, history: list[dict[str, Any]], seconds: float, states: dict[str, Any]) -> None:
        """Atomically replace the checkpoint with the state after ``epoch`` (1-based) finished epochs."""
        save_torch(
            self.path,
            seal(
                {
                    "format_version": self.VERSION,
                    "identity": self.identity,
                    "epoch": epoch,
                    "history": history,
                    "seconds": seconds,
                    **states,
                }
            ),
        )

    def remove(self) -> None:
        """Delete the checkpoint (once the finished run is written: it is fadrm's, not the user's)."""
        self.path.unlink(missing_ok=True)


# ------------------------------------------------------------------ priors
PRIORS_FORMAT = "fadrm-priors"
PRIORS_VERSION = 1


def write_priors(path: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Write a priors file: the format header, then ``record`` (its ``teachers`` each with
    ``sha256`` and ``prior``). Returns what was written."""
    contents = {"format": PRIORS_FORMAT, "format_version": PRIORS_VERSION, **record}
    write_json(path, contents)
    return contents


def read_priors(
    path: str | Path,
    teachers_sha256: Sequence[str | None],
    given: Sequence[float] | None,
    data_sha256: str | None = None,
) -> list[float]:
    """The priors a priors file holds for these teachers (by hash), in their order.

    Args:
        path: the file (``--priors-from``).
        teachers_sha256: the run's teachers.
        given: priors given as well (``--prior``, or a written config replayed): they must be the file's.
        data_sha256: the content of the run's dataset; a file that records other data is refused (one
            written before fadrm recorded it is taken as made from the same data).

    Raises:
        FadrmError: the file is not a priors file, lacks one of the teachers, was computed on other data,
            or disagrees with ``given``.
    """
    try:
        record = read_json(path)
    except (OSError, ValueError):
        record = None
    entries = record.get("teachers") if isinstance(record, dict) and record.get("format") == PRIORS_FORMAT else None
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and {"source", "sha256", "prior"} <= set(e) for e in entries
    ):
        raise FadrmError(f"--priors-from {path} is not a priors.json written by fadrm priors")
    recorded = record.get("data_sha256")
    if data_sha256 is not None and recorded is not None and recorded != data_sha256:
        raise FadrmError(
            f"--priors-from {path} was computed on other data than this run's (the dataset's files differ); "
            "compute the priors on this data with fadrm priors"
        )
    by_hash = {entry["sha256"]: entry["prior"] for entry in entries}
    if any(sha not in by_hash for sha in teachers_sha256):
        sources = ", ".join(str(entry["source"]) for entry in entries)
        raise FadrmError(
            f"--priors-from {path} holds the priors of other teachers ({sources}); compute these "
            "teachers' with fadrm priors"
        )
    priors = [float(by_hash[sha]) for sha in teachers_sha256]
    if given is not None and list(given) != priors:
        raise FadrmError(
            f"--prior {' '.join(f'{p:g}' for p in given)} and --priors-from {path} "
            f"({' '.join(f'{p:g}' for p in priors)}) disagree; give one of them"
        )
    return priors
