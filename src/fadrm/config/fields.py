"""The options several stages share, each declared once: which dataset, where, on what device.

Each factory returns one :func:`~fadrm.config.options.option` field; a stage that words an
option for itself (what ``--out`` holds, what the seed draws) passes its own help text.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..runtime import AMP_MODES
from .options import (
    Check,
    at_least,
    device_name,
    existing_folder,
    job_count_value,
    not_a_file,
    not_a_folder,
    option,
    registered,
)

DEVICE_HELP = "auto (CUDA when present), cpu, cuda or cuda:N"


def dataset_option() -> Any:
    """``--dataset``: the registered dataset a stage works on (required)."""
    return option(help="registered dataset name (fadrm list datasets)", choices=registered("dataset"))


def out_option(help: str, file: bool = False) -> Any:
    """``--out``: where the stage writes (a folder, or with ``file`` a file); never part of the identity."""
    return option(help=help, defines=False, check=not_a_folder if file else not_a_file)


def data_root_option() -> Any:
    """``--data-root``: the dataset's folder on disk."""
    return option(
        None, help="dataset folder (default: the dataset's usual place)", defines=False, check=existing_folder
    )


def device_option() -> Any:
    """``--device``: where the stage computes (:func:`fadrm.runtime.make_runtime` decides ``auto``)."""
    return option("auto", help=DEVICE_HELP, defines=False, check=device_name)


def amp_option(help: str) -> Any:
    """``--amp``: mixed precision; ``auto`` given anywhere keeps the preset's choice."""
    return option("auto", help=help, defines=False, choices=AMP_MODES, unset="auto")


def seed_option(help: str) -> Any:
    """``--seed``: the stage's random seed (defining)."""
    return option(0, help=help)


def holdout_option(help: str, default: int | None = 0) -> Any:
    """``--holdout``: training images per class kept out for validation (defining)."""
    return option(default, help=help, check=at_least(0))


def teachers_option(check: Check | Sequence[Check] = ()) -> Any:
    """``--teacher`` (repeatable): the teachers a stage uses, identified by their files' hashes, not their paths."""
    return option(
        help="teacher checkpoint, .safetensors, or torchvision weights arch:WEIGHTS; repeat for several",
        flag="--teacher",
        repeat=True,
        defines=False,
        check=check,
    )


def workers_option(help: str = "data-loading processes (default: 0 on <= 2 cores)") -> Any:
    """``--workers``: data-loading processes."""
    return option(None, help=help, defines=False, check=at_least(0))


def jobs_option() -> Any:
    """``--jobs``: student runs trained at once, each in its own process (:mod:`fadrm.evaluation.jobs`)."""
    return option(
        "1",
        defines=False,
        check=job_count_value,
        help="students trained at once, each in its own process with its share of the cores (CUDA: of the "
        "visible GPUs); auto: one per core on the CPU, 8 per GPU on CUDA (at most one per core); the "
        "results equal one job's at the same threads per process",
    )


def overwrite_option(help: str) -> Any:
    """``--overwrite``: a one-shot instruction, never replayed from a written config."""
    return option(False, help=help, defines=False, persist=False)
