"""fadrm: dataset distillation with FADRM / FADRM+ and the baselines on the same engine."""

from ._version import __version__
from .api import compute_priors, compute_statistics, distill, evaluate, run, train_teacher
from .config import DistillConfig, EvalConfig, PriorsConfig, RunConfig, StatsConfig, TeacherConfig, resolve
from .data import DATASETS, DatasetSpec, get_dataset_spec, load_split
from .errors import FadrmError
from .models import MODELS, build_model, list_models
from .synthesis.methods import METHODS
from .teachers import Teacher, load_teacher

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
    "resolve",
    "run",
    "train_teacher",
]
