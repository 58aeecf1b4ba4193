"""Datasets: frozen specs in a registry, and readers for each on-disk format."""

from .datasets import ImageDataset, FileImageDataset, TensorImageDataset
from .specs import DATASETS, DatasetSpec, data_folder, get_dataset_spec, load_split
from .transforms import eval_transform, normalize, denormalize

__all__ = [
    "data_folder",
    "DATASETS",
    "DatasetSpec",
    "FileImageDataset",
    "ImageDataset",
    "TensorImageDataset",
    "denormalize",
    "eval_transform",
    "get_dataset_spec",
    "load_split",
    "normalize",
]
