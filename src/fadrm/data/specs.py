"""Dataset facts as data: one frozen spec per dataset, held in a registry."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Literal

from ..errors import FadrmError
from ..registry import Registry
from .datasets import ImageDataset, TensorImageDataset
from .formats import read_cifar_split, read_idx_split, read_image_folder_split, read_tiny_imagenet_split

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# ImageNette / ImageWoof: class order is the sorted WordNet ids (the order of
# their train/ folders), each paired with its ImageNet-1k class index so a
# 1000-class teacher can be restricted to the right ten logits.
IMAGENETTE_CLASSES = (
    ("n01440764", "tench", 0),
    ("n02102040", "English springer", 217),
    ("n02979186", "cassette player", 482),
    ("n03000684", "chain saw", 491),
    ("n03028079", "church", 497),
    ("n03394916", "French horn", 566),
    ("n03417042", "garbage truck", 569),
    ("n03425413", "gas pump", 571),
    ("n03445777", "golf ball", 574),
    ("n03888605", "parachute", 701),
)
IMAGEWOOF_CLASSES = (
    ("n02086240", "Shih-Tzu", 155),
    ("n02087394", "Rhodesian ridgeback", 159),
    ("n02088364", "beagle", 162),
    ("n02089973", "English foxhound", 167),
    ("n02093754", "Border terrier", 182),
    ("n02096294", "Australian terrier", 193),
    ("n02099601", "golden retriever", 207),
    ("n02105641", "Old English sheepdog", 229),
    ("n02111889", "Samoyed", 258),
    ("n02115641", "dingo", 273),
)

Reader = Callable[[Path, str], ImageDataset]


@dataclass(frozen=True)
class DatasetSpec:
    """Everything the pipeline needs to know about a dataset.

    Attributes:
        name: registry name, also the name of its synthesis preset.
        num_classes: class count, or None where it is read from disk (imagefolder).
        channels: image channels the models take.
        image_size: side of the square images models are trained and distilled at.
        mean, std: per-channel normalisation.
        reader: ``(root, split) -> ImageDataset`` for split "train" or "val".
        default_root: where the data lives when no ``--data-root`` is given.
        layout: a one-line description of the expected files, used in errors.
        augment: "pad-crop" (small images: padded random crop) or
            "resized-crop" (ImageNet family: random-resized crop, resize + centre crop for eval).
        imagenet_indices: for ImageNet subsets, each class's ImageNet-1k index.
        display_names: human names where the on-disk class names are ids.
    """

    name: str
    num_classes: int | None
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    reader: Reader = field(repr=False, compare=False)
    default_root: Path | None
    layout: str
    augment: Literal["pad-crop", "resized-crop"]
    imagenet_indices: tuple[int, ...] | None = None
    display_names: tuple[str, ...] | None = None

    def to_dict(self) -> dict:
        """JSON-friendly summary, written into manifests and checkpoints."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "channels": self.channels,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
        }


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def _add(spec: DatasetSpec) -> None:
    DATASETS.add(spec.name, spec)


def _hint(spec_name: str, layout: str) -> str:
    return f"pass --data-root pointing at the {spec_name} data ({layout})"


def _idx_reader(root: Path, split: str) -> ImageDataset:
    layout = "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-* alike"
    hint = _hint("fashion-mnist", layout) + ", or run: apt-get install -y dataset-fashion-mnist"
    return read_idx_split(root, split, FASHION_MNIST_CLASSES, hint)


_add(
    DatasetSpec(
        name="fashion-mnist",
        num_classes=10,
        channels=1,
        image_size=28,
        mean=(0.2860,),
        std=(0.3530,),
        reader=_idx_reader,
        default_root=Path("/usr/share/datasets/fashion-mnist"),
        layout="the four IDX files",
        augment="pad-crop",
    )
)

for _variant, _mean, _std in (
    (10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    (100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
):
    _layout = "cifar-10-batches-py/" if _variant == 10 else "cifar-100-python/"
    _add(
        DatasetSpec(
            name=f"cifar{_variant}",
            num_classes=_variant,
            channels=3,
            image_size=32,
            mean=_mean,
            std=_std,
            default_root=None,
            layout=_layout,
            augment="pad-crop",
            reader=lambda root, split, v=_variant, lay=_layout: read_cifar_split(
                root, split, v, _hint(f"cifar{v}", lay)
            ),
        )
    )

_TINY_LAYOUT = "tiny-imagenet-200/ with wnids.txt, train/<wnid>/images/, val/val_annotations.txt"
_add(
    DatasetSpec(
        name="tiny-imagenet",
        num_classes=200,
        channels=3,
        image_size=64,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        default_root=None,
        layout=_TINY_LAYOUT,
        augment="pad-crop",
        reader=lambda root, split: read_tiny_imagenet_split(root, split, _hint("tiny-imagenet", _TINY_LAYOUT)),
    )
)


def _folder_spec(
    name: str, num_classes: int | None, classes: tuple[tuple[str, str, int], ...] | None = None
) -> DatasetSpec:
    layout = "train/ and val/ with one sub-folder per class" + (" named by WordNet id" if num_classes else "")
    wnids = [c[0] for c in classes] if classes else None
    return DatasetSpec(
        name=name,
        num_classes=num_classes,
        channels=3,
        image_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        default_root=None,
        layout=layout,
        augment="resized-crop",
        reader=partial(_read_folder, name=name, layout=layout, wnids=wnids, num_classes=num_classes),
        imagenet_indices=tuple(c[2] for c in classes) if classes else None,
        display_names=tuple(c[1] for c in classes) if classes else None,
    )


def _read_folder(
    root: Path, split: str, *, name: str, layout: str, wnids: list[str] | None, num_classes: int | None
) -> ImageDataset:
    dataset = read_image_folder_split(root, split, _hint(name, layout), expected_classes=wnids)
    if num_classes is not None and len(dataset.classes) != num_classes:
        raise FadrmError(
            f"{root / split} holds {len(dataset.classes)} class folders, {name} has {num_classes}; "
            f"{_hint(name, layout)}"
        )
    return dataset


_add(_folder_spec("imagenet-1k", 1000))
_add(_folder_spec("imagenette", 10, IMAGENETTE_CLASSES))
_add(_folder_spec("imagewoof", 10, IMAGEWOOF_CLASSES))
_add(_folder_spec("imagefolder", None))


# Datasets torchvision can fetch, and the class that does it. Downloads happen
# only when asked for (``fadrm download``), never as a side effect of a run.
TORCHVISION_DOWNLOADS = {"fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100"}


def download_dataset(name: str, root: str | Path) -> Path:
    """Fetch a dataset with torchvision into ``root`` (in the layout our readers accept)."""
    spec = get_dataset_spec(name)
    if name not in TORCHVISION_DOWNLOADS:
        raise FadrmError(f"{name} cannot be downloaded automatically; place it under a folder holding {spec.layout}")
    import torchvision

    cls = getattr(torchvision.datasets, TORCHVISION_DOWNLOADS[name])
    root = Path(root)
    try:
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except (OSError, RuntimeError) as exc:  # urllib errors are OSErrors
        raise FadrmError(
            f"downloading {name} failed ({str(exc).splitlines()[0][:120]}); without network access, copy "
            f"{spec.layout} into {root} by hand"
        ) from None
    load_split(spec, "val", root)  # what was fetched must load
    return root


def get_dataset_spec(name: str) -> DatasetSpec:
    """The registered spec for ``name`` (unknown names list the valid ones)."""
    return DATASETS.get(name)


def holdout_indices(targets: list[int], per_class: int) -> list[int]:
    """The last ``per_class`` images of each class, in dataset order: a fixed validation split."""
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(t, []).append(i)
    short = [c for c, idx in by_class.items() if len(idx) <= per_class]
    if short:
        raise FadrmError(f"--holdout {per_class} would leave class {short[0]} without training images; lower it")
    return sorted(i for idx in by_class.values() for i in idx[-per_class:])


def check_contents(dataset: ImageDataset, spec: DatasetSpec, folder: Path, split: str) -> None:
    """Refuse, in one line naming the folder, a split that is not ``spec``'s: no images, labels outside
    its classes, or (for formats decoded whole: IDX, CIFAR) images of another shape."""
    if not len(dataset):
        raise FadrmError(f"{folder} holds no {split} images of {spec.name}; {_hint(spec.name, spec.layout)}")
    low, high = min(dataset.targets), max(dataset.targets)
    classes = len(dataset.classes)
    if low < 0 or high >= classes:
        raise FadrmError(
            f"{folder}: the {split} labels run from {low} to {high}, but {spec.name} has {classes} classes; "
            f"these files are not {spec.name}'s"
        )
    if not isinstance(dataset, TensorImageDataset):
        return  # image files: each is checked when it is decoded
    shape = tuple(dataset.images.shape[1:])
    expected = (spec.channels, spec.image_size, spec.image_size)
    if shape != expected:
        raise FadrmError(
            f"{folder}: the {split} images are {' x '.join(map(str, shape))} (channels x height x width); "
            f"{spec.name}'s are {' x '.join(map(str, expected))}: these files are not {spec.name}'s"
        )


def data_folder(spec: DatasetSpec, root: str | Path | None = None) -> Path | None:
    """Where ``spec``'s data is read from: ``root`` (``--data-root``), else the dataset's default place."""
    return Path(root) if root is not None else spec.default_root


def load_split(spec: DatasetSpec, split: str, root: str | Path | None = None, holdout: int = 0) -> ImageDataset:
    """Load the ``train`` or ``val`` split of ``spec`` from ``root`` (or its default place).

    With ``holdout`` > 0 the real validation set is not touched: the last
    ``holdout`` training images of each class form "val", and "train" is the
    rest. Hyperparameters are chosen this way, never on the test set.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    folder = data_folder(spec, root)
    if folder is None:
        raise FadrmError(f"{spec.name} needs --data-root ({spec.layout})")
    if not folder.exists():
        raise FadrmError(f"data root {folder} does not exist; {_hint(spec.name, spec.layout)}")
    if holdout < 0:
        raise FadrmError(f"--holdout must be >= 0, got {holdout}")
    dataset = spec.reader(folder, "train" if holdout else split)
    check_contents(dataset, spec, folder, "train" if holdout else split)
    if holdout:
        held = holdout_indices(dataset.targets, holdout)
        if split == "train":
            kept = set(held)
            held = [i for i in range(len(dataset)) if i not in kept]
        dataset = dataset.subset(held)
    if spec.num_classes is not None and len(dataset.classes) != spec.num_classes:
        raise FadrmError(f"{folder} holds {len(dataset.classes)} classes, {spec.name} has {spec.num_classes}")
    return dataset
