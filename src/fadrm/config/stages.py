"""The stages' configurations: each stage's options, declared once (see :mod:`fadrm.config`).

``fadrm distill``'s config is in :mod:`fadrm.config.distillation`, ``fadrm evaluate``'s in
:mod:`fadrm.config.evaluation`; the teacher, statistics, priors and whole-run stages are here, and
:data:`STAGES` names every stage's config by its command.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import FadrmError
from ..runtime import CUDA_AUTO_AMP
from .distillation import DistillConfig
from .evaluation import EvalConfig, protocol_option
from .fields import (
    amp_option,
    data_root_option,
    dataset_option,
    device_option,
    holdout_option,
    jobs_option,
    out_option,
    overwrite_option,
    seed_option,
    teachers_option,
    workers_option,
)
from .options import (
    at_least,
    each,
    in_range,
    model_name,
    model_or_weights,
    non_negative,
    not_a_file,
    option,
    positive,
    registered,
    teacher_source,
)
from .resolver import StageConfig, merged


@dataclass(frozen=True)
class TeacherConfig(StageConfig):
    """How ``fadrm train-teacher`` trains a teacher on a whole dataset."""

    SECTION: ClassVar[str] = "teacher"

    dataset: str = dataset_option()
    model: str = option(
        help="registered model name (fadrm list models) or timm:<name>; default: the preset's", check=model_name
    )
    out: str = out_option("checkpoint file to write", file=True)
    data_root: str | None = data_root_option()
    model_args: dict[str, Any] = option({}, help="architecture option, e.g. width=64", flag="--model-arg", repeat=True)
    epochs: int = option(10, help="training epochs", check=at_least(1))
    batch_size: int = option(256, help="images per optimiser step", check=at_least(1))
    lr: float = option(0.1, help="peak learning rate of the one-cycle cosine schedule", check=positive)
    momentum: float = option(0.9, help="SGD (Nesterov) momentum", check=in_range(0.0, 1.0))
    weight_decay: float = option(5e-4, help="SGD weight decay", check=non_negative)
    seed: int = seed_option("random seed (initialisation, batches, augmentation)")
    holdout: int = holdout_option("hold out the last N training images per class as the validation set")
    workers: int | None = workers_option()
    device: str = device_option()
    amp: str = amp_option(
        f"mixed precision (auto: {CUDA_AUTO_AMP['teacher']} on CUDA, fp16 where bf16 is unsupported; off on the CPU)"
    )
    overwrite: bool = overwrite_option("discard an existing checkpoint or unfinished run")


@dataclass(frozen=True)
class RunConfig(StageConfig):
    """``fadrm run``: the whole pipeline; each stage's other options come from its preset.

    A preset's ``priors`` and ``fixed_committee`` (CV-DD's published values) describe its own
    ``teacher_models`` by position, so they apply only while the run trains or loads exactly that
    list; with other teachers a committee method's priors are computed (:mod:`fadrm.priors`).
    """

    SECTION: ClassVar[str] = "run"

    dataset: str = dataset_option()
    out: str = out_option("folder for the teachers, the distilled set and its evaluation")
    method: str = option("fadrm", help="the method (fadrm list methods)", choices=registered("method"))
    ipc: int = option(10, help="images per class", check=at_least(1))
    protocol: str = protocol_option()
    teachers: list[str] | None = option(
        None,
        help="use these teachers instead of training the preset's",
        flag="--teacher",
        repeat=True,
        check=each(teacher_source),
    )
    teacher_models: list[str] | None = option(
        None,
        flag="--teacher-model",
        repeat=True,
        check=each(model_or_weights),
        help="architectures (or torchvision arch:WEIGHTS) of the teachers to "
        "train when none is given (default: the preset's)",
    )
    data_root: str | None = data_root_option()
    seed: int = seed_option("random seed of every stage")
    holdout: int = holdout_option("validate on the last N training images per class")
    repeats: int | None = option(
        None, help="repeat the evaluation with seeds seed, seed+1, ... (mean ± std)", defines=False, check=at_least(1)
    )
    robustness: bool = option(
        False,
        defines=False,
        help="also train every baseline the robustness scores need and report HLR, IOR, LRS and ARS",
    )
    priors: list[float] | None = option(
        None,
        flag="--prior",
        repeat=True,
        help="a committee method's prior per teacher, in teacher order (default: "
        "the preset's published ones when the run uses the preset's own "
        "teachers, else computed first as fadrm priors does)",
    )
    fixed_committee: list[int] | None = option(
        None,
        check=each(at_least(0)),
        help="positions (0: the first teacher) of one committee used at every "
        "IPC index (default: the preset's published pair when the run uses "
        "the preset's own teachers)",
    )
    prior_student: str | None = option(
        None,
        check=model_name,
        help="the student that scores every teacher's SRe2L++ set when the priors "
        "are computed (default: the first teacher's architecture)",
    )
    jobs: str = jobs_option()
    device: str = device_option()
    amp: str = amp_option(
        "mixed precision (auto: each stage's published precision on CUDA: "
        + ", ".join(f"{stage} {amp}" for stage, amp in CUDA_AUTO_AMP.items())
        + "; off on the CPU)"
    )

    # Options that name or weigh the preset's teachers by their position in its teacher_models:
    # published for those teachers, so they never reach a run with other teachers.
    TEACHER_BOUND: ClassVar[tuple[str, ...]] = ("priors", "fixed_committee")

    @classmethod
    def preset_layers(
        cls, dataset: str, method: str | None, ipc: int | None, chosen: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """The preset's layers; its priors and fixed committee only while the run uses the preset's own
        teacher list (no ``--teacher``, and ``--teacher-model`` either unset or the preset's list)."""
        layers = super().preset_layers(dataset, method, ipc, chosen)
        own_models = merged(cls, *layers).get("teacher_models")
        if chosen.get("teachers") or chosen.get("teacher_models", own_models) != own_models:
            layers = [{k: v for k, v in layer.items() if k not in cls.TEACHER_BOUND} for layer in layers]
        return layers


@dataclass(frozen=True)
class PriorsConfig(StageConfig):
    """A committee method's priors (``fadrm priors``): per teacher, the last-epoch top-1 of one fixed
    student trained on an SRe2L++ set distilled from that teacher alone."""

    SECTION: ClassVar[str] = "priors"

    dataset: str = dataset_option()
    # Checked when loaded, not here: `fadrm run` resolves this config before it trains them.
    teachers: list[str] = teachers_option()
    out: str = out_option("folder for each teacher's SRe2L++ set and priors.json")
    ipc: int = option(10, help="images per class of each teacher's set (the IPC the priors are for)", check=at_least(1))
    student: str | None = option(
        None,
        check=model_name,
        help="the one student trained on every teacher's set (default: the first teacher's architecture)",
    )
    seed: int = seed_option("random seed of the sets and the students")
    holdout: int = holdout_option("validate on the last N training images per class, not the test set")
    data_root: str | None = data_root_option()
    device: str = device_option()
    amp: str = amp_option("mixed precision (auto: the presets' precision of SRe2L++ and of the students)")

    def check(self) -> None:
        if not self.teachers:
            raise FadrmError("give at least one --teacher")


@dataclass(frozen=True)
class StatsConfig(StageConfig):
    """The statistics pass (``fadrm stats``) of G-VBSM and EDC: per teacher, the training set's
    statistics at the input of every convolution and BatchNorm layer, globally and per class."""

    SECTION: ClassVar[str] = "stats"

    dataset: str = dataset_option()
    teachers: list[str] = teachers_option(check=each(teacher_source))
    holdout: int = holdout_option("leave out the last N training images per class, as the distillation does")
    data_root: str | None = data_root_option()
    teacher_arch: str | None = option(None, help="architecture of a plain state-dict teacher", check=model_name)
    batch_size: int = option(
        64, help="images per forward pass; the targets are the mean of per-batch statistics", check=at_least(1)
    )
    seed: int = seed_option("random seed of the image order and the augmentation")
    stats_dir: str | None = option(
        None, defines=False, check=not_a_file, help="where to write the statistics files (default: beside each teacher)"
    )
    workers: int | None = workers_option()
    device: str = device_option()
    overwrite: bool = overwrite_option("compute again a file made with other settings")

    def check(self) -> None:
        if not self.teachers:
            raise FadrmError("give at least one --teacher")


STAGES: dict[str, type[StageConfig]] = {
    "train-teacher": TeacherConfig,
    "distill": DistillConfig,
    "evaluate": EvalConfig,
    "run": RunConfig,
    "stats": StatsConfig,
    "priors": PriorsConfig,
}
