"""What an evaluation keeps on disk besides its report: label stores and finished student runs.

* **The folder's marker**: ``<eval>/evaluation.json`` (``fadrm-evaluation``, version 1) names the set
  whose evaluation the folder holds (:func:`claim_evaluation_folder`).
* **Label store** (version 1): ``labels.json`` (what the labels were made for:
  :func:`label_store_identity`) and one ``epochNNNNN.safetensors`` of teacher outputs per epoch with
  its sha256 in ``epochNNNNN.sha256`` (:class:`LabelStore`), computed once (:func:`fill_label_store`)
  and read by every student that trains on the same views.
* **Finished run**: ``<eval>/runs/<key>.json`` holding ``identity``, ``weights_sha256`` and ``result``;
  the trained student beside it as ``<key>.pt`` (a teacher checkpoint: any command takes it as a
  teacher). An unfinished student's state is :class:`fadrm.artifacts.StudentCheckpoint`.

A store or run is reused only for the identity it was made for
(:func:`fadrm.artifacts.changed_settings`).
"""

from __future__ import annotations

import json

from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
from safetensors.torch import load_file, save_file

from ..artifacts import changed_settings, require_same_settings
from ..augment import VIEWS_VERSION, ViewSampler
from ..config import EvalConfig
from ..data import DatasetSpec
from ..distributed import Ranks
from ..data.foreign import EVAL_FOLDER
from ..errors import FadrmError
from ..io import (
    DAMAGE_ERRORS,
    atomic_path,
    file_digest_matches,
    read_json,
    read_own_json,
    set_aside,
    sha256_file,
    write_json,
)
from ..locks import exclusive_file
from ..ownership import holds_nothing, inside, same_place, matches_any, refuse_data_folder, remove_own_files
from ..labels import TeacherLabeller, label_epoch, soft_targets
from ..runtime import Runtime
from ..training import progress

STORED_FORMAT_VERSION = 1


class EvaluatedSetFolder(Protocol):
    """What claiming an evaluation folder reads of the set."""

    folder: Path

    def set_id(self) -> str: ...

    def describe(self) -> str: ...


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

    def __init__(
        self,
        folder: Path,
        identity: dict[str, Any],
        num_classes: int,
        topk: int | None,
        temperature: float,
        replaceable: bool = False,
    ):
        self.folder = Path(folder)
        self.identity = identity
        self.num_classes = num_classes
        self.topk = topk
        self.temperature = temperature
        self.replaceable = replaceable

    def open(self, log: Callable[[str], None] = print) -> None:
        """Create the store, or check that an existing one was made for the same plan.

        A store whose ``labels.json`` is damaged is set aside whole (what its epochs were made for is
        unknown) and made again; so is a store of another plan where the store is ``replaceable`` (the
        evaluation's own, in its folder). Another plan's store elsewhere (``--labels-dir``) is refused.
        """
        meta = self.folder / "labels.json"
        expected = {"format_version": STORED_FORMAT_VERSION, **self.identity, "topk": self.topk}
        damaged = meta.exists()
        found = read_own_json(meta, "storing the labels", log)
        if found is None and damaged:
            log(f"the epochs stored in {self.folder} were made for an unknown plan; kept as {set_aside(self.folder)}")
        elif found is not None and self.replaceable and changed_settings(found, expected):
            changed = ", ".join(changed_settings(found, expected))
            aside = set_aside(self.folder, "stale")
            log(f"the labels stored in {self.folder} were made for other inputs ({changed}); kept as {aside.name}")
            found = None
        if found is not None:
            require_same_settings(found, expected, f"the label store in {self.folder}", "use another --labels-dir")
        else:
            write_json(meta, expected)

    def path(self, epoch: int) -> Path:
        return self.folder / f"epoch{epoch:05d}.safetensors"

    def digest_path(self, epoch: int) -> Path:
        """The sha256 of ``epoch``'s file, written after it."""
        return self.folder / f"epoch{epoch:05d}.sha256"

    def has(self, epoch: int, log: Callable[[str], None] = print) -> bool:
        """Whether ``epoch`` is stored whole: a file of this store's tensors whose bytes hash to the digest
        written after it. A damaged file, or one without its digest, is set aside, with one line, and stored
        again. (Stores of fadrm 0.3 had no digests; their identity lacks the set's content, so they are
        replaced whole when opened.)"""
        path, digest_path = self.path(epoch), self.digest_path(epoch)
        if not path.exists():
            return False
        # A damaged digest file reads as some other digest: the epoch is stored again.
        recorded = digest_path.read_text(errors="replace").strip() if digest_path.is_file() else ""
        if self.expected_shapes() == stored_shapes(path) and file_digest_matches(path, recorded):
            return True
        log(f"{path} is damaged; kept as {set_aside(path).name}, storing epoch {epoch} again")
        return False

    def expected_shapes(self) -> dict[str, list[int]]:
        """Each tensor an epoch file holds and its shape."""
        images = self.identity["images"]
        if self.topk is None:
            return {"logits": [images, self.num_classes]}
        return {"probs": [images, self.topk], "indices": [images, self.topk]}

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
        with atomic_path(self.digest_path(epoch)) as tmp:
            tmp.write_text(sha256_file(self.path(epoch)) + "\n")

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


def stored_shapes(path: Path) -> dict[str, list[int]] | None:
    """The tensors a safetensors file names and their shapes, read from its header, when the file is as long
    as its header says; else None (truncated, or not a safetensors file)."""
    try:
        with open(path, "rb") as fh:
            length = int.from_bytes(fh.read(8), "little")
            if not 2 <= length <= 1 << 20:
                return None
            header = json.loads(fh.read(length))
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
        if path.stat().st_size != 8 + length + end:
            return None
        return {name: list(v["shape"]) for name, v in tensors.items()}
    except (*DAMAGE_ERRORS, IndexError):
        return None


def read_finished_run(path: Path, identity: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any] | None:
    """The result stored in an evaluation run file, when it was made with ``identity`` and the trained student
    beside it (``<key>.pt``) is the one it recorded; else None: the student is trained again (a damaged record
    or student file is set aside, with one line)."""
    stored = read_own_json(path, "training its student", log)
    if stored is None or changed_settings(stored.get("identity", {}), identity):
        return None
    result = stored.get("result")
    if not isinstance(result, dict) or not isinstance(result.get("evaluated_epochs"), list):
        log(f"{path} is damaged (no result); kept as {set_aside(path).name}, training its student again")
        return None
    weights = path.with_suffix(".pt")
    if not file_digest_matches(weights, stored.get("weights_sha256")):
        state = "is missing" if not weights.exists() else "is not the student its run recorded"
        log(f"{weights} {state}; training its student again")
        return None
    return result


def write_finished_run(path: Path, identity: dict[str, Any], result: dict[str, Any]) -> None:
    """Store one finished student run with the identity it was made for and the sha256 of the trained student
    beside it (``<key>.pt``, written first)."""
    write_json(path, {"identity": identity, "weights_sha256": sha256_file(path.with_suffix(".pt")), "result": result})


# ------------------------------------------------------------- the folder
EVALUATION_MARKER = "evaluation.json"
EVALUATION_FORMAT = "fadrm-evaluation"
# The files an evaluation writes, relative to its folder: what --overwrite may remove.
EVALUATION_FILES = matches_any(
    [
        r"runs/[^/]+\.(json|pt)",
        r"labels[^/]*/(labels\.json|epoch\d{5}\.(safetensors|sha256))",
        r"results\.(json|md)",
        r"curves\.png",
        r"config\.yaml",
        r"evaluation\.json",
        r"(.*/)?\.[^/]+\.\d+\.tmp",
    ]
)


def claim_evaluation_folder(
    out: Path, distilled_set: EvaluatedSetFolder, overwrite: bool, data_dir: Path | None, log: Callable[[str], None]
) -> None:
    """Check that the evaluation may write into ``out`` and mark it as this set's evaluation.

    ``out`` must not be the set's own folder (nor its images, patches or records), nor lie in the
    dataset's folder. It is taken when it is empty, or holds this set's evaluation (its
    ``evaluation.json``; an evaluation written before fadrm 0.4 is recognised by its finished runs),
    or the evaluation of the set's earlier content in the set's own ``eval/``; another set's evaluation
    is replaced only with ``overwrite``, which removes only the files an evaluation writes
    (:data:`EVALUATION_FILES`); a folder of other files is refused, ``overwrite`` included.

    Raises:
        FadrmError: one line naming the folder and what to do, before anything is written.
    """
    set_folder = distilled_set.folder
    if same_place(out, set_folder) or any(inside(out, set_folder / part) for part in ("images", "init", "state")):
        raise FadrmError(
            f"--out {out} is the set's own folder, whose files are the set's; choose another --out (the default "
            f"is {set_folder / EVAL_FOLDER})"
        )
    refuse_data_folder(out, data_dir, "--out")
    set_id = distilled_set.set_id()
    marker = read_own_json(out / EVALUATION_MARKER, "marking the folder", log)
    # Written before fadrm 0.4 (no marker): the sets its students were trained on are in their identities.
    found = legacy_sets(out) if marker is None else set()
    if marker is not None:
        evaluated = marker.get("set_id")
    elif holds_nothing(out):
        evaluated = set_id
    elif found:
        evaluated = found.pop() if len(found) == 1 else None
    else:
        raise FadrmError(
            f"--out {out} holds files and is not a fadrm evaluation (no {EVALUATION_MARKER}); fadrm writes only "
            "into an empty folder or its own, --overwrite included: choose another --out"
        )
    if evaluated != set_id:
        if same_place(out, set_folder / EVAL_FOLDER):
            log(
                f"{out} holds the evaluation of the set's earlier content; the students of its images are trained "
                "again, baselines that never saw them are reused"
            )
        elif not overwrite:
            raise FadrmError(
                f"--out {out} holds the evaluation of another set; choose another --out, or pass --overwrite "
                "to replace it"
            )
        else:
            log(f"--overwrite: removing the evaluation of another set in {out}")
            remove_own_files(out, EVALUATION_FILES, log)
    out.mkdir(parents=True, exist_ok=True)
    write_json(
        out / EVALUATION_MARKER,
        {"format": EVALUATION_FORMAT, "format_version": 1, "set_id": set_id, "set": distilled_set.describe()},
    )


def legacy_sets(out: Path) -> set[str]:
    """The ids of the sets whose students the finished-run records in ``out/runs`` hold (an evaluation
    written before its folder was marked); empty when it holds none (a damaged record is left for its
    run to set aside)."""
    found = set()
    for path in sorted((out / "runs").glob("*.json")):
        try:
            record = read_json(path)
        except DAMAGE_ERRORS:
            continue
        identity = record.get("identity") if isinstance(record, dict) else None
        set_id = identity.get("distilled_set") if isinstance(identity, dict) else None
        if isinstance(set_id, str):
            found.add(set_id)
    return found


def label_store_identity(
    config: EvalConfig, images: int, ipc: int, teachers: Sequence[str | None], set_identity: dict[str, Any]
) -> dict[str, Any]:
    """What a label store is made for: the set's size, the relabelling teachers' file hashes
    (``teachers``), and the settings of the views and the relabelling (``set_identity``: what the set
    adds, its content for a set made by another tool).

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
        "teachers": list(teachers),
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
        # Stores before views were drawn batch by batch (VIEWS_VERSION 1) lack it: they are made again.
        "views": VIEWS_VERSION,
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
        # One writer per store, also for a store evaluations share (the lock lies beside it: a stale store is
        # renamed while held).
        with exclusive_file(store.folder, "--labels-dir"):
            fill_epochs(store, config, images, spec, labeller, runtime, log)
    ranks.barrier()


def fill_epochs(
    store: LabelStore,
    config: EvalConfig,
    images: torch.Tensor,
    spec: DatasetSpec,
    labeller: TeacherLabeller,
    runtime: Runtime,
    log: Callable[[str], None],
) -> None:
    """:func:`fill_label_store` in the process that writes: open the store, compute the epochs it lacks."""
    store.open(log)
    sampler = ViewSampler.from_config(config, spec.image_size)
    missing = [e for e in range(config.epochs) if not store.has(e, log)]
    if missing:
        log(f"storing soft labels for {len(missing)} epochs in {store.folder}")
    for epoch in progress(missing, "labels"):
        logits = label_epoch(images, sampler, epoch, config.batch_size, labeller, spec.mean, spec.std, runtime)
        store.write(epoch, logits)
