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
* **Set made by another tool** (read only): an ImageFolder without a manifest, read as a
  registered dataset's classes (:class:`ImageFolderSet`).
* **Statistics file** (``fadrm-statistics``, version 1): a teacher's training-set statistics
  (``fadrm stats``) as ``<teacher>.stats-<hash>.safetensors`` and, written after it, a JSON
  description of what made it (``.json`` beside it); an unfinished pass keeps its sums in
  ``<file>.partial``.
* **Priors file** (``fadrm-priors``, version 1): ``priors.json`` (``fadrm priors``), each teacher's
  source, sha256 and prior with the student and protocol that scored them; ``--priors-from``
  reads it, matching teachers by their hashes.

Every resume asks the same question, "was this file made for the same settings?", through
:func:`changed_settings`; a difference either refuses to continue
(:func:`require_same_settings`, naming the settings that differ) or, for a finished or an
unfinished student, means training it again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import platform
import re
import shutil
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Sequence

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ._version import __version__
from .config import DistillConfig, defining_settings, write_config
from .errors import FadrmError
from .io import atomic_path, read_json, safe_name, save_torch, sha256_file, write_json

if TYPE_CHECKING:
    from .data import DatasetSpec

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


def run_identity(
    config: DistillConfig, teachers_sha256: list[str | None], statistics_sha256: list[str] | None = None
) -> dict[str, Any]:
    """What defines a distilled set: its defining settings, its teachers' file hashes and, for a
    method that matches the teachers' statistics files, their hashes."""
    identity = {"config": config.identity(), "teachers_sha256": list(teachers_sha256)}
    return identity if statistics_sha256 is None else {**identity, "statistics_sha256": list(statistics_sha256)}


def open_distilled_folder(
    layout: Layout,
    config: DistillConfig,
    teachers_sha256: list[str | None],
    log: Callable[[str], None],
    statistics_sha256: list[str] | None = None,
) -> None:
    """Create the folder, or check that an existing one holds the same run (resume).

    With ``config.overwrite`` a different run's outputs are removed first; a non-empty
    folder that is not a fadrm run is never touched.
    """
    identity = run_identity(config, teachers_sha256, statistics_sha256)
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
            previous = {
                **previous.get("config", {}),
                "teachers": previous.get("teachers_sha256"),
                "statistics": previous.get("statistics_sha256"),
            }
            require_same_settings(
                previous,
                {
                    **identity["config"],
                    "teachers": identity["teachers_sha256"],
                    "statistics": identity.get("statistics_sha256"),
                },
                f"{layout.root} holds a run that",
                "pass --overwrite to replace it or choose another --out",
                RESUME_HINTS,
            )
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
    def images_per_class(self) -> tuple[int, int]:
        """The fewest and the most images of any class (both the IPC for a set fadrm made)."""
        counts = Counter(record["class"] for record in self.manifest["images"])
        return min(counts.values()), max(counts.values())

    def describe(self) -> str:
        """One line naming the set, for the log."""
        return f"{self.method} set of {self.dataset}, IPC {self.ipc} ({self.folder})"

    def labels_identity(self) -> dict[str, Any]:
        """What stored labels are made for besides the evaluation's settings: nothing more than the set's size
        and teachers, as stores have been identified since fadrm 0.1 (so they stay valid)."""
        return {}

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


# ---------------------------------------------------------- foreign sets
# The results folder ``fadrm evaluate`` writes inside the set's folder unless given --out; in a set
# made by another tool it is no class folder.
EVAL_FOLDER = "eval"
# Image modes read exactly as grey or RGB: bilevel, grey and palette images and RGB, with or
# without an alpha channel (which must be opaque).
EXACT_IMAGE_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA"})
# A class folder named by the class's index: RDED writes 00000, 00001, ...; SRe2L, SRe2L++ (CV-DD)
# and the FADRM reference code write new000, new001, ...
INDEX_FOLDER = re.compile(r"(?:new)?(\d+)")
# A class folder as fadrm itself names it (:meth:`Layout.class_dir`): <index>_<class name>.
LAYOUT_FOLDER = re.compile(r"(\d+)_(.+)")


def _loose(name: str) -> str:
    """A class or folder name compared loosely: case ignored, any run of characters a folder name may
    not safely hold read as one underscore ("T-shirt/top" and "t-shirt top" agree)."""
    return safe_name(name).casefold()


def _some(names: Sequence[str], shown: int = 3) -> str:
    """A few names, quoted, and how many more there are."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(repr(n) for n in names[:shown]) + more


def class_of_folders(
    folders: Sequence[str], class_names: Sequence[str], display_names: Sequence[str] | None = None
) -> dict[str, int | None]:
    """The class (an index into ``class_names``) each folder of an ImageFolder holds; None for a folder
    that names no class.

    A folder names a class by its name (for the ImageNet family its WordNet id) or its display
    name, exactly; as fadrm writes it (``<index>_<name>``, index and name agreeing); or by the name
    compared loosely (:func:`_loose`) where no two classes share that loose form. Only when no
    folder names a class that way are numbers read as class indices in the dataset's label order
    (``00000`` or ``new000``), which is ambiguous, and refused, where class names are numbers.
    """
    aliases = [[name, *([display_names[i]] if display_names else [])] for i, name in enumerate(class_names)]
    exact = {alias: label for label, names in enumerate(aliases) for alias in names}
    sharing: dict[str, set[int]] = {}
    for label, names in enumerate(aliases):
        for alias in names:
            sharing.setdefault(_loose(alias), set()).add(label)
    loose = {key: next(iter(labels)) for key, labels in sharing.items() if len(labels) == 1}

    def by_name(name: str) -> int | None:
        return exact[name] if name in exact else loose.get(_loose(name))

    def by_folder(folder: str) -> int | None:
        ours = LAYOUT_FOLDER.fullmatch(folder)
        if folder not in exact and ours and by_name(ours[2]) == int(ours[1]):
            return int(ours[1])
        return by_name(folder)

    labels = {folder: by_folder(folder) for folder in folders}
    numbered = {folder: INDEX_FOLDER.fullmatch(folder) for folder in folders}
    if any(label is not None for label in labels.values()) or not any(numbered.values()):
        return labels
    if any(name.isdigit() for name in class_names):
        numbers = sorted(folder for folder, match in numbered.items() if match)
        raise FadrmError(
            f"class folders named by number ({_some(numbers)}) are ambiguous where class names are "
            "numbers too; name each folder exactly as its class"
        )
    return {folder: int(m[1]) if m and int(m[1]) < len(class_names) else None for folder, m in numbered.items()}


def _refuse_outside_link(path: Path, inside: Path, root: Path) -> None:
    """Refuse a symbolic link that leads out of the set: its content would not be the folder's."""
    if path.is_symlink() and not path.resolve().is_relative_to(inside):
        raise FadrmError(
            f"{path} is a symbolic link to {os.readlink(path)}, outside {root}; links out of the set "
            "are not followed: copy what it points to into the set"
        )


def _image_folder_listing(root: Path) -> dict[str, list[Path]]:
    """Each class folder's name and its files, sorted by name. Skipped: hidden entries (``.DS_Store``),
    files beside the class folders (a README) and the results of an earlier ``fadrm evaluate``."""
    if not root.is_dir():
        raise FadrmError(f"{root} is not a folder")
    inside = root.resolve()
    listing: dict[str, list[Path]] = {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        _refuse_outside_link(entry, inside, root)
        results = entry.name == EVAL_FOLDER and (entry / "config.yaml").is_file()
        if results or not entry.is_dir():
            continue
        files = listing.setdefault(entry.name, [])
        for path in sorted(entry.iterdir()):
            if path.name.startswith("."):
                continue
            _refuse_outside_link(path, inside, root)
            if path.is_dir():
                raise FadrmError(f"{path} is a folder inside a class folder; class folders hold images only")
            if not path.is_file():
                raise FadrmError(f"cannot read {path}: it is not a file (a broken link?); remove or replace it")
            files.append(path)
    if not listing:
        raise FadrmError(
            f"{root} holds no class folders; a set made by another tool is an ImageFolder: <folder>/<class>/<images>"
        )
    return listing


def read_set_image(path: Path, spec: DatasetSpec) -> torch.Tensor:
    """One image of a set made by another tool, as a uint8 (C, H, W) tensor exactly as stored.

    Nothing is resized or blended: the image must be ``spec``'s size, which is read from the
    header before anything is decoded (so an image that would decompress to gigabytes never
    is); its mode 8-bit grey, RGB or palette, opaque. A grey image in an RGB dataset is copied
    into the three channels; an RGB image in a grey dataset is read only when its channels are
    equal (as tools that save grey images as RGB write them).

    Raises:
        FadrmError: naming the file, for anything else (not an image, another size, ...).
    """
    from .data.datasets import IMAGE_ERRORS, image_tensor

    size = spec.image_size
    try:
        with warnings.catch_warnings():
            # PIL only warns below twice its pixel limit; that is refused too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.size != (size, size):
                    raise FadrmError(
                        f"{path} is {img.width} x {img.height} px; {spec.name} images are {size} x "
                        f"{size} and nothing is resized: save the set at {size} px"
                    )
                if img.mode not in EXACT_IMAGE_MODES:
                    raise FadrmError(f"{path} has image mode {img.mode}; give 8-bit grey or RGB images")
                if ("A" in img.getbands() or "transparency" in img.info) and min(
                    img.convert("RGBA").getchannel("A").getextrema()
                ) < 255:
                    raise FadrmError(f"{path} has transparent pixels; give opaque images")
                pixels = image_tensor(img, 3)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise FadrmError(
            f"{path} is too large to decode safely ({exc}); {spec.name} images are {size} x {size} px"
        ) from None
    except IMAGE_ERRORS as exc:
        raise FadrmError(f"cannot read {path} as an image ({exc}); remove or replace the file") from None
    if spec.channels == 3:
        return pixels
    if not torch.equal(pixels, pixels[:1].expand_as(pixels)):
        raise FadrmError(
            f"{path} is a colour image; {spec.name} is greyscale (an RGB image is read only when its "
            "three channels are equal)"
        )
    return pixels[:1].clone()


@dataclass(frozen=True)
class ImageFolderSet:
    """A distilled set made by another tool: an ImageFolder (``folder/<class folder>/<images>``)
    without our manifest, read as the classes of a registered dataset.

    It offers what evaluation asks of a :class:`DistilledSet`; it has no teachers (nor priors)
    of its own and no holdout. Classes may hold different numbers of images.

    Attributes:
        folder: the set's folder.
        dataset: the registered dataset its images belong to.
        class_names: the dataset's classes in its label order (not the folders' order).
        files: (class, image file) of every image: by class, then by file name.
    """

    folder: Path
    dataset: str
    class_names: list[str]
    files: tuple[tuple[int, Path], ...]

    method: ClassVar[str] = "imagefolder"
    holdout: ClassVar[int] = 0

    @classmethod
    def open(cls, folder: str | Path, spec: DatasetSpec, class_names: Sequence[str]) -> ImageFolderSet:
        """The ImageFolder in ``folder`` as a set of ``spec``'s dataset, whose classes are ``class_names``
        (as read from its data); every class needs a folder and every folder must be a class.

        Its images are only listed here; :meth:`images` checks and decodes them.
        """
        root = Path(folder)
        listing = _image_folder_listing(root)
        labels = class_of_folders(list(listing), class_names, spec.display_names)
        unknown = [name for name, label in labels.items() if label is None]
        missing = [name for label, name in enumerate(class_names) if label not in labels.values()]
        if unknown:
            also = f"; {len(missing)} of its {len(class_names)} classes have no folder" if missing else ""
            raise FadrmError(
                f"{root} holds folders that are no {spec.name} class: {_some(unknown)}{also}; name each "
                "class folder by its class's name, WordNet id or index (00000 or new000)"
            )
        by_class: dict[int, list[str]] = {}
        for name, label in labels.items():
            by_class.setdefault(label, []).append(name)
        shared = next((names for names in by_class.values() if len(names) > 1), None)
        if shared:
            raise FadrmError(
                f"{root}: folders {_some(shared)} hold the same {spec.name} class "
                f"{class_names[labels[shared[0]]]!r}; keep one"
            )
        if missing:
            raise FadrmError(
                f"{root} has no folder for {len(missing)} of the {len(class_names)} {spec.name} classes: "
                f"{_some(missing)}"
            )
        empty = [name for name, files in listing.items() if not files]
        if empty:
            raise FadrmError(f"class folders of {root} hold no images: {_some(empty)}")
        files = tuple((label, path) for label in sorted(by_class) for path in listing[by_class[label][0]])
        return cls(root, spec.name, list(class_names), files)

    @property
    def teachers(self) -> list[dict[str, Any]]:
        """Empty: the tool that made the set used its own teachers; evaluation needs ``--teacher``."""
        return []

    @property
    def priors(self) -> None:
        """None: weights for the relabelling teachers are the user's to give."""
        return None

    @property
    def images_per_class(self) -> tuple[int, int]:
        """The fewest and the most images of any class."""
        counts = Counter(label for label, _ in self.files)
        return min(counts.values()), max(counts.values())

    @property
    def ipc(self) -> int:
        """Images per class: the mean, rounded half up, when classes differ; the random-real baseline
        takes this many real images per class, so it holds as many images as the set, give or take rounding."""
        classes = len(self.class_names)
        return (2 * len(self.files) + classes) // (2 * classes)

    def describe(self) -> str:
        """One line naming the set, for the log: its size and how evenly its classes are filled."""
        fewest, most = self.images_per_class
        spread = f"{fewest} per class" if fewest == most else f"{fewest} to {most} per class, IPC {self.ipc} on average"
        return f"ImageFolder {self.folder} as {self.dataset}: {len(self.files)} images, {spread}"

    def labels_identity(self) -> dict[str, Any]:
        """What stored labels are made for besides the evaluation's settings: this content (the folder
        may change under the same number of images)."""
        return {"distilled_set": self.set_id()}

    def set_id(self) -> str:
        """A fingerprint of the set's content: the dataset, then each image's class and bytes in the
        order students see them. Changing, adding or removing an image changes it; renaming a file
        or folder without changing that order does not."""
        return self._fingerprint

    @functools.cached_property
    def _fingerprint(self) -> str:
        digest = hashlib.sha256(f"{self.method} {self.dataset}\n".encode())
        for label, path in self.files:
            digest.update(f"{label} {sha256_file(path)}\n".encode())
        return digest.hexdigest()

    def images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every image (uint8, N x C x H x W), each checked by :func:`read_set_image`, and its class."""
        from .data import get_dataset_spec

        spec = get_dataset_spec(self.dataset)
        images = [read_set_image(path, spec) for _, path in self.files]
        return torch.stack(images), torch.tensor([label for label, _ in self.files])


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
    from .data import get_dataset_spec, load_split

    spec = get_dataset_spec(dataset)
    return ImageFolderSet.open(folder, spec, load_split(spec, "val", data_root).classes)


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
        return self.read_with_logits(epoch)[0]

    def read_with_logits(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One epoch's soft targets (as :meth:`read`) and the stored logits as float32 (None for top-k)."""
        from .labels import soft_targets

        tensors = load_file(str(self.path(epoch)))
        if "logits" in tensors:
            return soft_targets(tensors["logits"], self.temperature), tensors["logits"].float()
        probs, indices = tensors["probs"].float(), tensors["indices"].long()
        rest = (1.0 - probs.sum(1, keepdim=True)).clamp_min(0) / max(self.num_classes - self.topk, 1)
        full = rest.expand(len(probs), self.num_classes).clone()
        return full.scatter_(1, indices, probs), None

    def bytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("epoch*.safetensors"))


# ------------------------------------------------------------ statistics file
STATISTICS_FORMAT = "fadrm-statistics"
STATISTICS_VERSION = 1


def statistics_description(path: Path) -> Path:
    """The JSON that describes a statistics file (written after it: its presence means complete)."""
    return path.with_suffix(".json")


def write_statistics(path: Path, tensors: dict[str, torch.Tensor], description: dict[str, Any]) -> dict[str, Any]:
    """Atomically write a statistics file, then its description (with the format header and the
    tensors' hash); returns the description."""
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    description = {
        "format": STATISTICS_FORMAT,
        "format_version": STATISTICS_VERSION,
        "fadrm_version": __version__,
        **description,
        "sha256": sha256_file(path),
    }
    write_json(statistics_description(path), description)
    return description


def read_statistics_description(path: Path, expected: Mapping[str, Any], fix: str) -> dict[str, Any] | None:
    """The description of a complete statistics file (None if there is none), checked against ``expected``.

    Raises:
        FadrmError: one line naming the settings that differ from ``expected`` and ``fix``.
    """
    described = statistics_description(path)
    if not (path.exists() and described.exists()):
        return None
    description = read_json(described)
    if description.get("format") != STATISTICS_FORMAT or description.get("format_version", 0) > STATISTICS_VERSION:
        raise FadrmError(f"{described} is not a statistics file this fadrm reads; {fix}")
    require_same_settings({k: description.get(k) for k in expected}, expected, f"the statistics file {path}", fix)
    return description


def read_statistics(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a statistics file."""
    return load_file(str(path))


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
        state = safe_torch_load(self.path)
        changed = changed_settings(state.get("identity", {}), self.identity)
        if changed:
            log(f"{self.path} holds a student of other settings ({', '.join(changed)}); starting it again")
            return None
        return state

    def save(self, epoch: int, history: list[dict[str, Any]], seconds: float, states: dict[str, Any]) -> None:
        """Atomically replace the checkpoint with the state after ``epoch`` (1-based) finished epochs."""
        save_torch(
            self.path,
            {
                "format_version": self.VERSION,
                "identity": self.identity,
                "epoch": epoch,
                "history": history,
                "seconds": seconds,
                **states,
            },
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


def read_priors(path: str | Path, teachers_sha256: Sequence[str | None], given: Sequence[float] | None) -> list[float]:
    """The priors a priors file holds for these teachers (by hash), in their order.

    Args:
        path: the file (``--priors-from``).
        teachers_sha256: the run's teachers.
        given: priors given as well (``--prior``, or a written config replayed): they must be the file's.

    Raises:
        FadrmError: the file is not a priors file, lacks one of the teachers, or disagrees with ``given``.
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
