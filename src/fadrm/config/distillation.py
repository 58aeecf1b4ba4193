"""The configuration of ``fadrm distill``: the synthesis loop, the patch selection, and the stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..data import get_dataset_spec
from ..errors import FadrmError
from ..runtime import CUDA_AUTO_AMP
from .fields import (
    amp_option,
    data_root_option,
    dataset_option,
    device_option,
    holdout_option,
    out_option,
    overwrite_option,
    seed_option,
    teachers_option,
    workers_option,
)
from .options import (
    Options,
    at_least,
    difficulty_band,
    each,
    existing_file,
    existing_folder,
    in_range,
    model_name,
    non_negative,
    not_a_file,
    option,
    positive,
    registered,
    scale_pair,
)
from .resolver import StageConfig, merged

# Synthesis images per forward pass when --groups-per-batch is not given, by device type: a GPU
# is filled (ImageNet-1k: ten groups of 100 classes), the CPU kept near its cache.
DEFAULT_BATCH_IMAGES = {"cpu": 100, "cuda": 1000}


@dataclass(frozen=True)
class SynthesisConfig(Options):
    """The recover loop: stages, loss weights, augmentation (docs/method.md, section 3)."""

    sizes: list[int] = option([32, 32, 32, 32], help="input size of each stage", check=each(at_least(1)))
    budgets: list[int] = option([500, 500, 500, 500], help="iterations of each stage", check=each(at_least(0)))
    lr: float = option(0.25, help="Adam learning rate of the pixels (cosine-decayed over all stages)", check=positive)
    r_bn: float = option(0.01, help="weight of the BN-statistics loss", check=non_negative)
    first_bn_multiplier: float = option(10.0, help="extra weight of the first BatchNorm layer", check=non_negative)
    jitter: int = option(4, help="largest random shift in pixels", check=at_least(0))
    alpha: float = option(0.5, help="ARC merge ratio in [0, 1] (1: no residual)", check=in_range(0.0, 1.0))
    crop_scale: list[float] = option(
        [0.08, 1.0], help="area range of the random-resized crops", nargs=2, check=scale_pair
    )
    classes_per_group: int = option(
        100,
        check=at_least(1),
        help="classes sharing BN statistics in one group (more than the dataset has: one group of all its classes)",
    )
    # Added in fadrm 0.3 for G-VBSM, EDC and CV-DD (out of the identity at their former behaviour:
    # fadrm.config.identity).
    stat_ema: float = option(
        0.0,
        check=in_range(0.0, 1.0),
        help="EMA coefficient a of each matched statistic: the distance is taken at "
        "a * previous + (1 - a) * current, the gradient goes to the current one (G-VBSM, "
        "EDC); 0: the current statistic",
    )
    conv_drop: float = option(
        0.0,
        check=in_range(0.0, 1.0),
        help="probability that a convolution's statistics term is left out of an "
        "iteration, drawn per group (G-VBSM's beta_dr)",
    )
    dd_weight: float = option(
        0.0,
        check=non_negative,
        help="weight of G-VBSM's data-densification term on the eigenvalue spectrum of each "
        "class's images in a group (needs several images of a class per group)",
    )
    group_images: int | None = option(
        None,
        check=at_least(1),
        help="images per group of a class-major method: whole classes with their "
        "IPC slots (or --group-slots) each, which must divide it",
    )
    group_slots: int | None = option(
        None,
        check=at_least(1),
        help="IPC slots of each class in a class-major group (default: all; must divide --ipc)",
    )
    committee_size: int = option(
        1,
        check=at_least(1),
        help="teachers in the committee of a committee method (CV-DD: 2)",
    )
    fixed_committee: list[int] | None = option(
        None,
        check=each(at_least(0)),
        help="positions (0: the first --teacher) of one committee used at "
        "every IPC index (default: a committee per IPC index)",
    )
    priors: list[float] | None = option(
        None,
        flag="--prior",
        repeat=True,
        help="a committee method's prior per teacher, in --teacher order; member "
        "k is weighted softmax(prior / 5)_k (default: equal weights)",
    )

    @property
    def total_budget(self) -> int:
        return sum(self.budgets)


@dataclass(frozen=True)
class PatchConfig(Options):
    """Realistic patch selection (the initial images and ARC's residual source)."""

    mipc: int = option(300, help="candidate real images per class for patch selection", check=at_least(1))
    num_crop: int = option(5, help="crops scored per candidate image", check=at_least(1))
    factor: int = option(1, help="patches per side of a stitched image", check=at_least(1))
    difficulty: str | float = option("easy", help="easy, medium, hard, or a quantile in [0, 1]", check=difficulty_band)
    crop_scale: list[float] = option(
        [0.08, 1.0], help="area range of the patch crops", key="patch_crop_scale", nargs=2, check=scale_pair
    )
    scoring: str = option(
        "pad",
        key="patch_scoring",
        choices=registered("patch scoring"),
        help="score a patch smaller than the image (factor > 1) zero-padded into the full "
        "canvas (pad, RDED's) or upsampled to it (resize)",
    )


@dataclass(frozen=True)
class DistillConfig(StageConfig):
    """Everything ``fadrm distill`` needs."""

    SECTION: ClassVar[str] = "distill"

    dataset: str = dataset_option()
    # Checked when loaded, not here: `fadrm run` resolves this config before it trains them.
    teachers: list[str] = teachers_option()
    out: str = out_option("output folder")
    method: str = option("fadrm", help="the method (fadrm list methods)", choices=registered("method"))
    ipc: int = option(10, help="images per class", check=at_least(1))
    seed: int = seed_option("random seed")
    holdout: int = holdout_option("validate on the last N training images per class, not the test set")
    data_root: str | None = data_root_option()
    teacher_arch: str | None = option(None, help="architecture of a plain state-dict teacher", check=model_name)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    patches: PatchConfig = field(default_factory=PatchConfig)
    # Not defining by path: a run records the content id of the set it starts from (moved, it is the same set).
    init_from: str | None = option(
        None,
        defines=False,
        check=existing_folder,
        help="a finished distilled set of the same dataset and IPC whose images a "
        "real-image initialiser draws from instead of the training set (EDC on "
        "ImageNet-1k: an RDED set)",
    )
    stats_dir: str | None = option(
        None,
        defines=False,
        check=not_a_file,
        help="where the teachers' statistics files are kept (default: beside each "
        "teacher); computed there when a method needs them",
    )
    # Not defining: the priors it gives are (written into the config as --prior values).
    priors_from: str | None = option(
        None,
        defines=False,
        check=existing_file,
        help="a committee method's priors from the priors.json of fadrm priors, "
        "matched to each --teacher by its file's hash",
    )
    # Acts through the synthesis sizes and budgets it resolves to.
    equal_budget: bool = option(
        False, defines=False, help="give SRe2L / SRe2L++ FADRM's iteration budget instead of the one their authors ran"
    )
    groups_per_batch: int | None = option(
        None,
        defines=False,
        check=at_least(1),
        help=f"groups optimised in one forward pass (default: as many as hold {DEFAULT_BATCH_IMAGES['cuda']} images "
        f"on CUDA, {DEFAULT_BATCH_IMAGES['cpu']} on the CPU; at least one)",
    )
    workers: int | None = workers_option(
        "processes decoding the real images of patch selection (default: one "
        "per available core for image files on more than 2 cores, else none)"
    )
    device: str = device_option()
    amp: str = amp_option(
        f"mixed precision (auto: the preset's, else {CUDA_AUTO_AMP['synthesis']} on CUDA; off on the CPU)"
    )
    compile: bool = option(
        False,
        defines=False,
        help="torch.compile the teachers: minutes of compiling per input size first; 3%% faster "
        "per iteration for a CPU ResNet-18, no gain for small ConvNets",
    )
    fused_statistics: bool = option(
        False,
        defines=False,
        help="compute the statistics loss of all matched layers in one step: "
        "FADRM's 1.49x the bare teacher's host operations per iteration instead of "
        "6.9x, G-VBSM's and EDC's 3.5-3.9x instead of 17-30x (benchmarks/host_cost.py); "
        "other float rounding; not with --compile; off until timed on a GPU",
    )
    overwrite: bool = overwrite_option("replace a different run already in --out")

    @classmethod
    def preset_layers(
        cls, dataset: str, method: str | None, ipc: int | None, chosen: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """The preset's layers, and with ``equal_budget`` FADRM's stages for this dataset and IPC
        (a single-stage method then runs their total at full size)."""
        layers = super().preset_layers(dataset, method, ipc, chosen)
        if merged(cls, *layers, chosen).get("equal_budget"):
            fadrm = merged(cls, *super().preset_layers(dataset, "fadrm", ipc, chosen))
            layers.append(
                {"synthesis": {k: v for k, v in fadrm.get("synthesis", {}).items() if k in ("sizes", "budgets")}}
            )
        return layers

    def check(self) -> None:
        """The rules between options that need no method's strategies (those:
        :meth:`fadrm.synthesis.methods.Method.problem`, checked before distilling)."""
        spec = get_dataset_spec(self.dataset)
        sizes, budgets = self.synthesis.sizes, self.synthesis.budgets
        if len(sizes) != len(budgets) or not sizes:
            raise FadrmError(
                f"--sizes and --budgets need one value per stage; got {len(sizes)} sizes and {len(budgets)} budgets"
            )
        if sizes[-1] != spec.image_size:
            raise FadrmError(
                f"the last stage must be at full resolution ({spec.image_size} px for {spec.name}), got {sizes[-1]}"
            )
        if spec.image_size % self.patches.factor:
            raise FadrmError(f"--factor must divide the image size {spec.image_size}")
        if not self.teachers:
            raise FadrmError("give at least one --teacher")
