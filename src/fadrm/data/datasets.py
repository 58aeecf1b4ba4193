"""Two dataset shapes cover every format: images held in memory, or image files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..errors import FadrmError

Transform = Callable[[torch.Tensor], torch.Tensor]


def _to_float(image: torch.Tensor) -> torch.Tensor:
    return image.float().div_(255)


@dataclass
class TrainingSet:
    """Images (uint8, N x C x H x W) and their classes, for a student: a distilled set or a baseline subset."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor


class ImageDataset(Dataset):
    """Labelled images; ``load(i)`` gives the raw uint8 ``C x H x W`` tensor.

    ``__getitem__`` applies ``transform`` (uint8 tensor in, float tensor out),
    which defaults to scaling to [0, 1].
    """

    classes: list[str]
    targets: list[int]
    channels: int
    transform: Transform
    # Whether ``load`` decodes a file (worth loader processes) rather than indexing memory.
    decodes_files: bool = False

    def __len__(self) -> int:
        return len(self.targets)

    def load(self, index: int) -> torch.Tensor:
        """The image at ``index`` as a uint8 tensor of shape (C, H, W)."""
        raise NotImplementedError

    def size_of(self, index: int) -> tuple[int, int]:
        """(H, W) of the image at ``index`` (datasets of files read only the header)."""
        return tuple(self.load(index).shape[-2:])  # type: ignore[return-value]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.load(index)), self.targets[index]

    def indices_of_class(self, label: int) -> list[int]:
        """Indices of every image whose target is ``label``, in dataset order."""
        return [i for i, t in enumerate(self.targets) if t == label]

    def subset(self, indices: Sequence[int]) -> "ImageDataset":
        """A dataset of the images at ``indices`` (same classes and transform)."""
        raise NotImplementedError


class TensorImageDataset(ImageDataset):
    """Images already decoded into one uint8 tensor (IDX, CIFAR pickles)."""

    def __init__(
        self,
        images: torch.Tensor,
        targets: Sequence[int],
        classes: Sequence[str],
        transform: Transform | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError("images must be a uint8 tensor of shape (N, C, H, W)")
        self.images = images
        self.targets = [int(t) for t in targets]
        self.classes = list(classes)
        self.channels = images.shape[1]
        self.transform = transform or _to_float

    def load(self, index: int) -> torch.Tensor:
        return self.images[index]

    def subset(self, indices: Sequence[int]) -> "TensorImageDataset":
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return TensorImageDataset(self.images[index], [self.targets[i] for i in indices], self.classes, self.transform)

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """Batched fetch used by DataLoader: one vectorised transform call when the transform has ``batch``."""
        batch_transform = getattr(self.transform, "batch", None)
        if batch_transform is None:
            return [self[i] for i in indices]
        images = batch_transform(self.images[indices])
        return list(zip(images.unbind(0), (self.targets[i] for i in indices)))


class FileImageDataset(ImageDataset):
    """Images decoded from files on demand (ImageFolder, Tiny-ImageNet)."""

    decodes_files = True

    def __init__(
        self,
        paths: Sequence[Path],
        targets: Sequence[int],
        classes: Sequence[str],
        channels: int = 3,
        transform: Transform | None = None,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.targets = [int(t) for t in targets]
        self.classes = list(classes)
        self.channels = channels
        self.transform = transform or _to_float

    def load(self, index: int) -> torch.Tensor:
        return read_image(self.paths[index], self.channels)

    def size_of(self, index: int) -> tuple[int, int]:
        path = self.paths[index]
        try:
            with Image.open(path) as img:
                width, height = img.size
        except IMAGE_ERRORS as exc:
            raise FadrmError(f"cannot read image {path} ({exc}); remove or replace the file") from None
        return height, width

    def subset(self, indices: Sequence[int]) -> "FileImageDataset":
        return FileImageDataset(
            [self.paths[i] for i in indices],
            [self.targets[i] for i in indices],
            self.classes,
            self.channels,
            self.transform,
        )


# What PIL raises for a file it cannot decode as an image.
IMAGE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError)


def read_image(path: Path, channels: int) -> torch.Tensor:
    """Decode an image file to a uint8 (C, H, W) tensor with ``channels`` channels."""
    try:
        with Image.open(path) as img:
            return image_tensor(img, channels)
    except IMAGE_ERRORS as exc:
        raise FadrmError(f"cannot read image {path} ({exc}); remove or replace the file") from None


def image_tensor(img: Image.Image, channels: int) -> torch.Tensor:
    """An opened image decoded to a uint8 (C, H, W) tensor: grey (``channels`` 1) or RGB, converted by PIL."""
    array = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
