"""fadrm: dataset distillation with FADRM / FADRM+ and the baselines on the same engine.

The public names below are imported on first use, so that ``import fadrm`` (and the ``fadrm``
command, which starts in :mod:`fadrm.command`) does not load PyTorch before it is needed: a Ctrl-C
while it loads ends the command in one line, not in a traceback from inside the import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:  # what type checkers and editors see
    from .api import compute_priors, compute_statistics, distill, evaluate, run, train_teacher
    from .config import DistillConfig, EvalConfig, PriorsConfig, RunConfig, StatsConfig, TeacherConfig, resolve
    from .data import DATASETS, DatasetSpec, get_dataset_spec, load_split
    from .errors import FadrmError
    from .models import MODELS, build_model, list_models
    from .synthesis.methods import METHODS
    from .teachers import Teacher, load_teacher

# Each public name and the module that defines it.
_PUBLIC = {
    **dict.fromkeys(("compute_priors", "compute_statistics", "distill", "evaluate", "run", "train_teacher"), ".api"),
    **dict.fromkeys(
        ("DistillConfig", "EvalConfig", "PriorsConfig", "RunConfig", "StatsConfig", "TeacherConfig", "resolve"),
        ".config",
    ),
    **dict.fromkeys(("DATASETS", "DatasetSpec", "get_dataset_spec", "load_split"), ".data"),
    "FadrmError": ".errors",
    **dict.fromkeys(("MODELS", "build_model", "list_models"), ".models"),
    "METHODS": ".synthesis.methods",
    **dict.fromkeys(("StudyGrid", "read_grid", "run_study"), ".study"),
    **dict.fromkeys(("Teacher", "load_teacher"), ".teachers"),
}

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "DistillConfig",
    "EvalConfig",
    "FadrmError",
    "METHODS",
    "MODELS",
    "PriorsConfig",
    "RunConfig",
    "StatsConfig",
    "StudyGrid",
    "Teacher",
    "TeacherConfig",
    "__version__",
    "build_model",
    "compute_priors",
    "compute_statistics",
    "distill",
    "evaluate",
    "get_dataset_spec",
    "list_models",
    "load_split",
    "load_teacher",
    "read_grid",
    "resolve",
    "run",
    "run_study",
    "train_teacher",
]


def __getattr__(name: str) -> Any:
    """A public name, imported from its module on first use (and kept)."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'fadrm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
