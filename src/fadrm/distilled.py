"""A distilled set on disk: its folder's layout, what defines it, its manifest, and opening it to evaluate.

A set (``fadrm-distilled`` manifest, version 2; version 1 is read too) is an ImageFolder of PNGs
under ``images/``, the selected patches under ``init/``, one record per finished work unit under
``state/``, ``run.json`` (what defines the run), ``config.yaml`` (the resolved config, replayable
with ``--config``) and ``manifest.json`` when complete (see :class:`Layout`). A set made by another
tool is read by :mod:`fadrm.data.foreign`; :func:`open_evaluated_set` opens either.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ._version import __version__
from .artifacts import changed_settings, require_same_settings
from .config import DistillConfig, defining_settings, write_config
from .data import get_dataset_spec, load_split
from .data.foreign import LAYOUT_FOLDER, ImageFolderSet, read_set_image
from .errors import FadrmError
from .io import file_digest_matches, read_json, read_own_json, safe_name, set_aside, sha256_file, write_json
from .ownership import holds_nothing, matches_any, remove_own_files


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

    def image_record(self, path: Path) -> dict[str, str]:
        """How a record lists an image it wrote: its file, relative to the set, and the sha256 of its bytes."""
        return {"file": self.relative(path), "sha256": sha256_file(path)}

    def intact_record(
        self, record_path: Path, files: Sequence[Path], what: str, log: Callable[[str], None]
    ) -> dict[str, Any] | None:
        """The record at ``record_path`` when it is readable and every one of ``files`` it covers is on disk
        with the bytes it recorded; else None, with one line saying why ``what`` is done again (a damaged
        record is set aside, never deleted).

        Records written before fadrm recorded digests are trusted for files that exist.
        """
        record = read_own_json(record_path, what, log)
        if record is None:
            return None
        images = record.get("images", [])
        digests = {image.get("file"): image.get("sha256") for image in images if isinstance(image, dict)}
        for path in files:
            if not file_digest_matches(path, digests.get(self.relative(path))):
                state = "is missing" if not path.exists() else "is not the image it recorded"
                log(f"{path} {state}; {what} again")
                return None
        return record


def run_identity(
    config: DistillConfig,
    teachers_sha256: list[str | None],
    statistics_sha256: list[str] | None = None,
    init_set: str | None = None,
    data_sha256: str | None = None,
) -> dict[str, Any]:
    """What defines a distilled set: its defining settings, its teachers' file hashes, the dataset's content
    (:func:`fadrm.data.digest.data_digest`), for a method that matches the teachers' statistics files their
    hashes, and for a run that starts from another set (``--init-from``) that set's content id."""
    identity = {"config": config.identity(), "teachers_sha256": list(teachers_sha256)}
    if data_sha256 is not None:
        identity["data_sha256"] = data_sha256
    if statistics_sha256 is not None:
        identity["statistics_sha256"] = list(statistics_sha256)
    return identity if init_set is None else {**identity, "init_from_set": init_set}


# The files a set's run writes, relative to its folder: what --overwrite may remove (run.json is rewritten).
RUN_FILES = matches_any(
    [
        r"(images|init)/\d{3,}_[A-Za-z0-9._-]+/\d{3,}\.png",
        r"(images|init|state)/.*\.\d+\.tmp",
        r"state/init/class\d{5}\.json",
        r"state/units/ipc\d{4}(-\d{4})?-group\d{4}\.json",
        r"manifest\.json",
        r"config\.yaml",
        r"\.[^/]+\.\d+\.tmp",
    ]
)
# The patch selection: --overwrite leaves it for the next run, which reuses each class whose record says
# it was selected from that run's inputs (patches.selection_inputs) and selects the others again.
SELECTION_FILES = matches_any([r"init/\d{3,}_[A-Za-z0-9._-]+/\d{3,}\.png", r"state/init/class\d{5}\.json"])


def open_distilled_folder(
    layout: Layout,
    config: DistillConfig,
    teachers_sha256: list[str | None],
    log: Callable[[str], None],
    statistics_sha256: list[str] | None = None,
    init_set: str | None = None,
    data_sha256: str | None = None,
) -> None:
    """Create the folder, or check that an existing one holds the same run (resume).

    A folder is taken only when it is empty or holds a fadrm run (its ``run.json``): a folder of other
    files is refused, ``--overwrite`` included. With ``config.overwrite`` a different run's files are
    removed first, only those the run writes (:data:`RUN_FILES`), but for the patch selection
    (:data:`SELECTION_FILES`), which the run reuses where it was made from the same inputs. A damaged
    ``run.json`` is set aside with the run's records (what they were made for is unknown), so the run starts
    again in the folder.
    """
    identity = run_identity(config, teachers_sha256, statistics_sha256, init_set, data_sha256)
    damaged = layout.run_file.exists()
    previous = read_own_json(layout.run_file, "starting the run", log)
    damaged = damaged and previous is None
    if damaged:
        # What the records and the manifest were made for is lost with run.json: they are set aside too.
        for path in (layout.root / "state", layout.manifest):
            if path.exists():
                log(f"{path} belongs to the run whose run.json was damaged; kept as {set_aside(path).name}")
    if previous is not None:
        if not changed_settings(previous, identity):
            log(f"resuming in {layout.root}")
        elif config.overwrite:
            selection = " but for its patch selection, reused where made from the same inputs" * any(
                (layout.root / "state" / "init").glob("*.json")
            )
            log(f"--overwrite: removing the previous run's outputs in {layout.root}{selection}")
            remove_own_files(layout.root, RUN_FILES, log, reusable=SELECTION_FILES)
        elif not holds_finished_work(layout):
            # A run stopped before it finished anything left only its run.json and config.yaml: a command
            # of other settings takes the folder over, losing nothing.
            log(f"{layout.root} holds a run that finished no work; starting this one in its place")
        else:
            previous = {
                **previous.get("config", {}),
                "teachers": previous.get("teachers_sha256"),
                "statistics": previous.get("statistics_sha256"),
                "init_from": previous.get("init_from_set", previous.get("config", {}).get("init_from")),
                "data": previous.get("data_sha256", identity.get("data_sha256")),  # (0.3 recorded none)
            }
            require_same_settings(
                previous,
                {
                    **identity["config"],
                    "teachers": identity["teachers_sha256"],
                    "statistics": identity.get("statistics_sha256"),
                    "init_from": identity.get("init_from_set"),
                    "data": identity.get("data_sha256"),
                },
                f"{layout.root} holds a run that",
                "pass --overwrite to replace it or choose another --out",
                RESUME_HINTS,
            )
    elif not damaged and not holds_nothing(layout.root):
        raise FadrmError(
            f"{layout.root} holds files but no run.json, the record of a fadrm set's settings; fadrm writes only "
            "into an empty folder or its own set, --overwrite included: restore run.json if it was a fadrm set, "
            "or choose another --out"
        )
    layout.root.mkdir(parents=True, exist_ok=True)
    write_json(layout.run_file, identity)
    write_config(layout.config_file, config)


def holds_finished_work(layout: Layout) -> bool:
    """Whether the run in ``layout`` finished anything: a selected class, a synthesised unit, an image
    or the manifest (files under ``init/``, ``images/`` or ``state/``, or ``manifest.json``)."""
    if layout.manifest.exists():
        return True
    return any(path.is_file() for name in ("images", "init", "state") for path in (layout.root / name).rglob("*"))


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


def manifest_problem(manifest: dict[str, Any]) -> str | None:
    """What in a finished set's manifest disagrees with itself, or None: every class holds exactly
    ``ipc`` images, one per IPC index, each record's class and class name agree with the dataset's
    classes and with the class folder its file lies in. (Older manifests lack some of these fields;
    what a record holds is checked.)"""
    try:
        ipc = manifest["ipc"]
        class_names = manifest["dataset"]["class_names"]
        records = manifest["images"]
        configured = manifest.get("config", {}).get("ipc", ipc)
    except (KeyError, TypeError, AttributeError) as exc:
        return f"it lacks {exc}"
    if not isinstance(ipc, int) or isinstance(ipc, bool) or ipc < 1 or configured != ipc:
        return f"its ipc {ipc!r} is not the {configured!r} its config was run with"
    seen: set[tuple[int, int]] = set()
    counts = Counter()
    for number, record in enumerate(records):
        label = record.get("class") if isinstance(record, dict) else None
        if not isinstance(label, int) or not 0 <= label < len(class_names):
            return f"image record {number} has no class of the set's {len(class_names)}"
        name, index = record.get("class_name", class_names[label]), record.get("ipc_index")
        if name != class_names[label]:
            return f"image record {number} says class {label} is {name!r}, the dataset's is {class_names[label]!r}"
        folder = LAYOUT_FOLDER.fullmatch(Path(str(record.get("file", ""))).parent.name)
        if folder and int(folder[1]) != label:
            return f"image record {number} ({record['file']}) is of class {label}, its folder of class {folder[1]}"
        if index is not None and (not isinstance(index, int) or not 0 <= index < ipc or (label, index) in seen):
            return f"image record {number} has IPC index {index!r}: not one of 0-{ipc - 1}, or given twice"
        seen.add((label, index))
        counts[label] += 1
    short = [label for label in range(len(class_names)) if counts[label] != ipc]
    if short:
        label = short[0]
        return f"class {label} ({class_names[label]}) has {counts[label]} images, the set's IPC is {ipc}"
    return None


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
        if not path.exists() and (Path(folder) / "run.json").exists():
            raise FadrmError(
                f"{folder} is an unfinished fadrm distill run (no manifest.json yet); run the same fadrm "
                "distill command again to finish it"
            )
        if not path.exists():
            raise FadrmError(
                f"{folder} is not a distilled set (no manifest.json); make one with fadrm distill, or "
                "evaluate an ImageFolder made by another tool with --dataset and --teacher"
            )
        try:
            manifest = read_json(path)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise FadrmError(
                f"{path} is damaged ({' '.join(str(exc).split())[:120]}); a manifest cannot be remade from the "
                "images: restore it, or distill the set again with --overwrite"
            ) from None
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise FadrmError(f"{path} is not a fadrm manifest")
        if manifest.get("format_version", 0) > MANIFEST_VERSION:
            raise FadrmError(f"{path} was written by a newer fadrm ({manifest.get('fadrm_version')}); upgrade fadrm")
        problem = manifest_problem(manifest)
        if problem:
            raise FadrmError(
                f"{path} does not describe a whole set ({problem}); restore it, or distill the set again "
                "with --overwrite"
            )
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
    def priors(self) -> list[float] | None:
        """The committee priors the set was distilled with, one per teacher (None: not a committee method)."""
        config = self.manifest["config"]
        priors = config.get("synthesis", config).get("priors")  # format 1 kept its settings flat
        return list(priors) if priors else None

    @property
    def teachers(self) -> list[dict[str, Any]]:
        """The teachers that made the set, as described in the manifest (source, sha256, ...)."""
        return list(self.manifest["teachers"])

    @property
    def num_images(self) -> int:
        """How many images the set holds."""
        return len(self.manifest["images"])

    @property
    def images_per_class(self) -> tuple[int, int]:
        """The fewest and the most images of any class (both the IPC for a set fadrm made)."""
        counts = Counter(record["class"] for record in self.manifest["images"])
        return min(counts.values()), max(counts.values())

    def describe(self) -> str:
        """One line naming the set, for the log."""
        return f"{self.method} set of {self.dataset}, IPC {self.ipc} ({self.folder})"

    def labels_identity(self) -> dict[str, Any]:
        """What stored labels are made for besides the evaluation's settings: the set's content (since fadrm
        0.4: a set distilled again into its folder must not reuse the labels of its former images)."""
        return {"distilled_set": self.set_id()}

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
        """Every image the manifest lists (uint8, N x C x H x W) and its class, in the manifest's order.

        Each file must be the one the manifest records (its sha256, where the manifest holds one: sets
        made since fadrm 0.4), of the dataset's size and channels.

        Raises:
            FadrmError: naming the first file that is missing, changed, or not an image of the set's kind,
                and the command that remakes it.
        """
        spec = get_dataset_spec(self.dataset)
        images, labels = [], []
        remedy = "run the fadrm distill command that made the set again to remake it, or restore the file"
        for record in self.manifest["images"]:
            path = self.folder / record["file"]
            if not path.is_file():
                raise FadrmError(f"{path}, listed in the set's manifest, is missing; {remedy}")
            if not file_digest_matches(path, record.get("sha256")):
                raise FadrmError(f"{path} is not the image the set's manifest records (its sha256 differs); {remedy}")
            images.append(read_set_image(path, spec))
            labels.append(record["class"])
        return torch.stack(images), torch.tensor(labels)


def open_evaluated_set(
    folder: str | Path, dataset: str | None = None, data_root: str | None = None, teachers: Sequence[str] | None = None
) -> DistilledSet | ImageFolderSet:
    """The set ``fadrm evaluate`` trains on: ours when ``folder`` holds a manifest (``dataset``, if
    given, must agree), else an ImageFolder made by another tool read as ``dataset``'s classes
    (from its data in ``data_root``), which needs ``teachers`` to label it.
    """
    folder = Path(folder)
    if dataset is None or (folder / "manifest.json").exists() or (folder / "run.json").exists():
        distilled_set = DistilledSet.open(folder)
        if dataset is not None and dataset != distilled_set.dataset:
            raise FadrmError(
                f"--dataset {dataset} disagrees with {folder}, a set of {distilled_set.dataset} (its "
                "manifest.json); leave --dataset out"
            )
        return distilled_set
    if not teachers:
        raise FadrmError(
            f"{folder} has no manifest.json, so no teachers of its own to label its images: give --teacher"
        )
    spec = get_dataset_spec(dataset)
    return ImageFolderSet.open(folder, spec, load_split(spec, "val", data_root).classes)
