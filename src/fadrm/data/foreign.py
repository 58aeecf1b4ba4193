"""Distilled sets made by other tools: an ImageFolder read, exactly as stored, as a registered dataset's classes.

Class folders are matched to the dataset's classes by name, WordNet id, fadrm's own
``<index>_<name>`` or, where unambiguous, an index (:func:`class_of_folders`); every image is
checked for size, mode and opacity before it is decoded (:func:`read_set_image`). A set's
identity is its content (:meth:`ImageFolderSet.set_id`), so a changed image is never mistaken
for the set a finished evaluation was made from.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from PIL import Image

from ..errors import FadrmError
from ..io import safe_name, sha256_file
from .datasets import IMAGE_ERRORS, image_tensor
from .specs import DatasetSpec, get_dataset_spec

# The results folder ``fadrm evaluate`` writes inside the set's folder unless given --out; in a set
# made by another tool it is no class folder.
EVAL_FOLDER = "eval"
# Image modes read exactly as grey or RGB: bilevel, grey and palette images and RGB, with or
# without an alpha channel (which must be opaque).
EXACT_IMAGE_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA"})
# A class folder named by the class's index: RDED writes 00000, 00001, ...; SRe2L, SRe2L++ (CV-DD)
# and the FADRM reference code write new000, new001, ...
INDEX_FOLDER = re.compile(r"(?:new)?(\d+)")
# A class folder as fadrm itself names it (:meth:`fadrm.distilled.Layout.class_dir`): <index>_<class name>.
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
    def num_images(self) -> int:
        """How many images the set holds."""
        return len(self.files)

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
        spec = get_dataset_spec(self.dataset)
        images = [read_set_image(path, spec) for _, path in self.files]
        return torch.stack(images), torch.tensor([label for label, _ in self.files])
