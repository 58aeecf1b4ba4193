"""Every stage's typed configuration, defined once; presets; one resolver; the resolved config on disk.

Each stage has one dataclass (:class:`TeacherConfig`, :class:`DistillConfig` with its
:class:`SynthesisConfig` and :class:`PatchConfig` parts, :class:`EvalConfig`, :class:`StatsConfig`,
:class:`PriorsConfig`, and :class:`RunConfig` for the whole pipeline). Each field is declared once with :func:`option`:
its default, its help text, whether it *defines* the result (and so the identity a resume
checks) or only how the work is executed, its valid values, and its command-line flag. The
CLI flags, the validation and the identities are all generated from these declarations.

One resolver, :func:`resolve`, builds any stage's config from layers, later wins:

1. the dataclass defaults;
2. what the method itself brings (:attr:`fadrm.synthesis.methods.Method.defaults`);
3. the dataset's preset (``presets/<dataset>.yaml``), its section for the stage, then that
   section's ``overrides.<method>`` and ``overrides.<method>@<ipc>``;
4. a config file given by the user (``--config``), e.g. a ``config.yaml`` a run wrote;
5. the options given on the command line or to the Python API.

Presets, config files and the API name an option by its *key*: the field's name, or the name
it declares to stay unique within the stage (``patch_crop_scale`` for ``patches.crop_scale``).
Its flag is the key with dashes (``--patch-crop-scale``) unless it declares another
(``--teacher`` for ``teachers``, ``--student-lr`` for the student ``lr``). Files may nest
keys under their part (``patches: {crop_scale: ...}``), as written configs do, or give them flat.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping, NoReturn, Sequence

import yaml

from .errors import FadrmError
from .registry import registry
from .runtime import AMP_MODES, CUDA_AUTO_AMP

# ------------------------------------------------------------------ options
Check = Callable[[Any], "str | None"]


def option(
    default: Any = MISSING,
    *,
    help: str,
    defines: bool = True,
    key: str | None = None,
    flag: str | None = None,
    check: Check | Sequence[Check] = (),
    choices: Callable[[], Sequence[str]] | Sequence[str] | None = None,
    inert: Callable[[dict[str, Any]], bool] | None = None,
    repeat: bool = False,
    nargs: int | None = None,
    positional: bool = False,
    unset: Any = None,
    persist: bool = True,
) -> Any:
    """Declare one config field.

    Args:
        default: the package default (a list or dict is copied for each instance);
            none makes the field required.
        help: one line for ``--help`` and the docs.
        defines: whether the field changes the result. Fields that do are the run's
            identity: a resume with another value is refused; the others (devices,
            paths, batching) may change between resumes.
        key: the name in flat files and the identity, when not the field's name.
        flag: the command-line flag, when not ``--`` + the key with dashes.
        check: rules the value must pass (:func:`at_least`, :func:`in_range`, ...).
        choices: the valid names, or a function returning them (a registry's names).
        inert: a predicate on the flat identity; when true the field is left out of the
            identity, so results made before the field existed (or where it has no effect)
            keep theirs.
        repeat: a list given by repeating the flag (``--teacher a --teacher b``).
        nargs: a list of exactly this many values.
        positional: a positional argument rather than a flag.
        unset: a value that, given on the command line or in a file, counts as not given
            (``--amp auto`` keeps the preset's precision).
        persist: False for a one-shot instruction (``--overwrite``): a written config holds
            its default, so replaying the file never repeats it.
    """
    metadata = {
        "help": help,
        "defines": defines,
        "key": key,
        "flag": flag,
        "inert": inert,
        "repeat": repeat,
        "nargs": nargs,
        "check": tuple(check) if isinstance(check, (list, tuple)) else (check,),
        "choices": choices,
        "positional": positional,
        "unset": unset,
        "persist": persist,
    }
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# ------------------------------------------------------------------- rules
# A rule returns why a value is wrong, or None. Each carries ``invalid``: values it refuses,
# which the tests try on every option that declares it.


def _rule(check: Callable[[Any], str | None], *invalid: Any) -> Check:
    check.invalid = invalid  # type: ignore[attr-defined]
    return check


def at_least(low: float) -> Check:
    """Rule: a number >= ``low``."""
    return _rule(lambda v: None if v >= low else f"must be at least {low:g}", low - 1)


def positive(value: Any) -> str | None:
    """Rule: a finite number > 0."""
    return None if math.isfinite(value) and value > 0 else "must be a positive number"


def non_negative(value: Any) -> str | None:
    """Rule: a finite number >= 0."""
    return None if math.isfinite(value) and value >= 0 else "must be a non-negative number"


_rule(positive, 0.0, -1.0)
_rule(non_negative, -1.0)


def in_range(low: float, high: float) -> Check:
    """Rule: a number in [low, high]."""
    return _rule(lambda v: None if low <= v <= high else f"must be in [{low:g}, {high:g}]", low - 1, high + 1)


def each(rule: Check) -> Check:
    """Rule: ``rule`` holds for every element of a list."""
    return _rule(
        lambda values: next((rule(v) for v in values if rule(v)), None), *([v] for v in getattr(rule, "invalid", ()))
    )


def scale_pair(value: Sequence[float]) -> str | None:
    """Rule: an area range (low, high) with 0 < low <= high <= 1."""
    return None if 0 < value[0] <= value[1] <= 1 else "must be two numbers with 0 < low <= high <= 1"


_rule(scale_pair, [0.0, 1.0], [0.9, 0.1], [0.5, 2.0])


def registered(kind: str) -> Callable[[], list[str]]:
    """Choices: the names in the package's registry of ``kind``, read when first needed."""
    return lambda: registry(kind).names()


DIFFICULTIES = ("easy", "medium", "hard")


def difficulty_band(value: str | float) -> str | None:
    """Rule: a named band of the patch ranking, or a quantile in [0, 1] where the band starts."""
    if value in DIFFICULTIES:
        return None
    try:
        quantile = float(value)
    except (TypeError, ValueError):
        quantile = math.nan
    return None if 0.0 <= quantile <= 1.0 else "must be easy, medium, hard or a number in [0, 1]"


_rule(difficulty_band, "harder", "1.5")


def device_name(value: str) -> str | None:
    """Rule: auto, cpu, cuda or cuda:N."""
    return None if re.fullmatch(r"auto|cpu|cuda(:\d+)?", value) else "must be auto, cpu, cuda or cuda:N"


_rule(device_name, "gpu", "cuda:x")


def model_name(value: str) -> str | None:
    """Rule: a registered model, or ``timm:<name>``."""
    known = value in registry("model") or value.startswith("timm:")
    return None if known else "must be a registered model (fadrm list models) or timm:<name>"


_rule(model_name, "resnet9000")


def teacher_source(value: str) -> str | None:
    """Rule: an existing checkpoint file, or torchvision weights named ``arch:WEIGHTS`` (checked when loaded)."""
    path = Path(value)
    if path.is_file() or (":" in value and not path.exists()):
        return None
    given = "a folder was given" if path.is_dir() else "no such file"
    return f"must be a checkpoint file, or torchvision weights arch:WEIGHTS ({given})"


_rule(teacher_source, "missing-teacher.pt", ".")


def model_or_weights(value: str) -> str | None:
    """Rule: an architecture to train (:func:`model_name`), or torchvision weights ``arch:WEIGHTS``."""
    return None if ":" in value and not value.startswith("timm:") else model_name(value)


_rule(model_or_weights, "resnet9000")


def existing_folder(value: str) -> str | None:
    """Rule: a folder that exists."""
    return None if Path(value).is_dir() else "must be an existing folder"


_rule(existing_folder, "missing-folder")


def existing_file(value: str) -> str | None:
    """Rule: a file that exists."""
    return None if Path(value).is_file() else "must be an existing file"


_rule(existing_file, "missing-file.json")


def not_a_folder(value: str) -> str | None:
    """Rule: a file name, not an existing folder."""
    return "must be a file name, not a folder" if Path(value).is_dir() else None


def not_a_file(value: str) -> str | None:
    """Rule: a folder name, not an existing file."""
    return "must be a folder, not a file" if Path(value).is_file() else None


_rule(not_a_folder, ".")
_rule(not_a_file, __file__)  # a file that always exists: this one


_DEVICE_HELP = "auto (CUDA when present), cpu, cuda or cuda:N"
# Synthesis images per forward pass when --groups-per-batch is not given, by device type: a GPU
# is filled (ImageNet-1k: ten groups of 100 classes), the CPU kept near its cache.
DEFAULT_BATCH_IMAGES = {"cpu": 100, "cuda": 1000}


# ------------------------------------------------------------------- stages
@dataclass
class Options:
    """Behaviour shared by every group of declared options (a stage's config or one of its parts)."""

    def identity(self) -> dict[str, Any]:
        """The fields that define the result, by key (used to refuse resuming into a different run)."""
        return defining_settings(type(self), self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """The config as nested plain data (what ``config.yaml`` holds)."""
        return asdict(self)

    def leaves(self) -> Iterator[tuple[tuple[str, ...], dataclasses.Field, Any]]:
        """(path, field, value) of every option, parts included."""
        for path, f in option_fields(type(self)):
            value: Any = self
            for name in path:
                value = getattr(value, name)
            yield path, f, value

    def check(self) -> None:
        """Rules between fields (each stage adds its own); field rules come from the declarations."""


@dataclass
class StageConfig(Options):
    """A stage's whole config: what the resolver builds and a run writes as ``config.yaml``."""

    # The preset section this stage reads.
    SECTION: ClassVar[str] = ""

    @classmethod
    def protocol_method(cls, method: str | None, chosen: dict[str, Any]) -> str | None:
        """The method whose defaults and preset overrides this stage takes (its own, unless a stage says otherwise)."""
        return method

    @classmethod
    def preset_layers(
        cls, dataset: str, method: str | None, ipc: int | None, chosen: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """The preset's layers for this stage: its section, then its ``overrides.<method>`` and
        ``overrides.<method>@<ipc>``, each read on its own (flat or nested keys alike)."""
        return [nest(cls, values, where) for where, values in preset_parts(dataset, cls.SECTION, method, ipc)]


@dataclass
class TeacherConfig(StageConfig):
    """How ``fadrm train-teacher`` trains a teacher on a whole dataset."""

    SECTION: ClassVar[str] = "teacher"

    dataset: str = option(help="registered dataset name (fadrm list datasets)", choices=registered("dataset"))
    model: str = option(
        help="registered model name (fadrm list models) or timm:<name>; default: the preset's", check=model_name
    )
    out: str = option(help="checkpoint file to write", defines=False, check=not_a_folder)
    data_root: str | None = option(
        None, help="dataset folder (default: the dataset's usual place)", defines=False, check=existing_folder
    )
    model_args: dict[str, Any] = option({}, help="architecture option, e.g. width=64", flag="--model-arg", repeat=True)
    epochs: int = option(10, help="training epochs", check=at_least(1))
    batch_size: int = option(256, help="images per optimiser step", check=at_least(1))
    lr: float = option(0.1, help="peak learning rate of the one-cycle cosine schedule", check=positive)
    momentum: float = option(0.9, help="SGD (Nesterov) momentum", check=in_range(0.0, 1.0))
    weight_decay: float = option(5e-4, help="SGD weight decay", check=non_negative)
    seed: int = option(0, help="random seed (initialisation, batches, augmentation)")
    holdout: int = option(
        0, help="hold out the last N training images per class as the validation set", check=at_least(0)
    )
    workers: int | None = option(
        None, help="data-loading processes (default: 0 on <= 2 cores)", defines=False, check=at_least(0)
    )
    device: str = option("auto", help=_DEVICE_HELP, defines=False, check=device_name)
    amp: str = option(
        "auto",
        help=f"mixed precision (auto: {CUDA_AUTO_AMP['teacher']} on CUDA, fp16 where bf16 is "
        "unsupported; off on the CPU)",
        defines=False,
        choices=AMP_MODES,
        unset="auto",
    )
    overwrite: bool = option(
        False, help="discard an existing checkpoint or unfinished run", defines=False, persist=False
    )


def _inert_at(key: str, value: Any) -> Callable[[dict[str, Any]], bool]:
    """An ``inert`` rule: the option is left out of the identity while it holds ``value``."""
    return lambda flat: flat.get(key, value) == value


@dataclass
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
    # Added in fadrm 0.3 for G-VBSM, EDC and CV-DD; each is out of the identity at the value that
    # leaves every earlier method's maths as it was.
    stat_ema: float = option(
        0.0,
        check=in_range(0.0, 1.0),
        inert=_inert_at("stat_ema", 0.0),
        help="EMA coefficient a of each matched statistic: the distance is taken at "
        "a * previous + (1 - a) * current, the gradient goes to the current one (G-VBSM, "
        "EDC); 0: the current statistic",
    )
    conv_drop: float = option(
        0.0,
        check=in_range(0.0, 1.0),
        inert=_inert_at("conv_drop", 0.0),
        help="probability that a convolution's statistics term is left out of an "
        "iteration, drawn per group (G-VBSM's beta_dr)",
    )
    dd_weight: float = option(
        0.0,
        check=non_negative,
        inert=_inert_at("dd_weight", 0.0),
        help="weight of G-VBSM's data-densification term on the eigenvalue spectrum of each "
        "class's images in a group (needs several images of a class per group)",
    )
    group_images: int | None = option(
        None,
        check=at_least(1),
        inert=_inert_at("group_images", None),
        help="images per group of a class-major method: whole classes with their "
        "IPC slots (or --group-slots) each, which must divide it",
    )
    group_slots: int | None = option(
        None,
        check=at_least(1),
        inert=_inert_at("group_slots", None),
        help="IPC slots of each class in a class-major group (default: all; must divide --ipc)",
    )
    committee_size: int = option(
        1,
        check=at_least(1),
        inert=_inert_at("committee_size", 1),
        help="teachers in the committee of a committee method (CV-DD: 2)",
    )
    fixed_committee: list[int] | None = option(
        None,
        check=each(at_least(0)),
        inert=_inert_at("fixed_committee", None),
        help="positions (0: the first --teacher) of one committee used at "
        "every IPC index (default: a committee per IPC index)",
    )
    priors: list[float] | None = option(
        None,
        flag="--prior",
        repeat=True,
        inert=_inert_at("priors", None),
        help="a committee method's prior per teacher, in --teacher order; member "
        "k is weighted softmax(prior / 5)_k (default: equal weights)",
    )

    @property
    def total_budget(self) -> int:
        return sum(self.budgets)


@dataclass
class PatchConfig(Options):
    """Realistic patch selection (the initial images and ARC's residual source)."""

    mipc: int = option(300, help="candidate real images per class for patch selection", check=at_least(1))
    num_crop: int = option(5, help="crops scored per candidate image", check=at_least(1))
    factor: int = option(1, help="patches per side of a stitched image", check=at_least(1))
    difficulty: str | float = option("easy", help="easy, medium, hard, or a quantile in [0, 1]", check=difficulty_band)
    crop_scale: list[float] = option(
        [0.08, 1.0], help="area range of the patch crops", key="patch_crop_scale", nargs=2, check=scale_pair
    )
    # Identical at factor 1 (patches fill the image), where it stays out of the identity so
    # sets made before it existed resume.
    scoring: str = option(
        "pad",
        key="patch_scoring",
        choices=registered("patch scoring"),
        inert=lambda flat: flat.get("factor", 1) == 1,
        help="score a patch smaller than the image (factor > 1) zero-padded into the full "
        "canvas (pad, RDED's) or upsampled to it (resize)",
    )


@dataclass
class DistillConfig(StageConfig):
    """Everything ``fadrm distill`` needs."""

    SECTION: ClassVar[str] = "distill"

    dataset: str = option(help="registered dataset name (fadrm list datasets)", choices=registered("dataset"))
    # Teachers are identified by their files' hashes, not their paths. Their files are checked
    # when loaded, not here: `fadrm run` resolves this config before it trains them.
    teachers: list[str] = option(
        help="teacher checkpoint, .safetensors, or torchvision weights arch:WEIGHTS; repeat for several",
        flag="--teacher",
        repeat=True,
        defines=False,
    )
    out: str = option(help="output folder", defines=False, check=not_a_file)
    method: str = option("fadrm", help="the method (fadrm list methods)", choices=registered("method"))
    ipc: int = option(10, help="images per class", check=at_least(1))
    seed: int = option(0, help="random seed")
    holdout: int = option(
        0, help="validate on the last N training images per class, not the test set", check=at_least(0)
    )
    data_root: str | None = option(
        None, help="dataset folder (default: the dataset's usual place)", defines=False, check=existing_folder
    )
    teacher_arch: str | None = option(None, help="architecture of a plain state-dict teacher", check=model_name)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    patches: PatchConfig = field(default_factory=PatchConfig)
    init_from: str | None = option(
        None,
        check=existing_folder,
        inert=_inert_at("init_from", None),
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
    workers: int | None = option(
        None,
        help="processes decoding the real images of patch selection (default: one "
        "per available core for image files on more than 2 cores, else none)",
        defines=False,
        check=at_least(0),
    )
    device: str = option("auto", help=_DEVICE_HELP, defines=False, check=device_name)
    amp: str = option(
        "auto",
        help=f"mixed precision (auto: the preset's, else {CUDA_AUTO_AMP['synthesis']} on CUDA; off on the CPU)",
        defines=False,
        choices=AMP_MODES,
        unset="auto",
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
    overwrite: bool = option(False, help="replace a different run already in --out", defines=False, persist=False)

    @classmethod
    def preset_layers(
        cls, dataset: str, method: str | None, ipc: int | None, chosen: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """The preset's layers, and with ``equal_budget`` FADRM's stages for this dataset and IPC
        (a single-stage method then runs their total at full size)."""
        layers = super().preset_layers(dataset, method, ipc, chosen)
        if _merged(cls, *layers, chosen).get("equal_budget"):
            fadrm = _merged(cls, *super().preset_layers(dataset, "fadrm", ipc, chosen))
            layers.append(
                {"synthesis": {k: v for k, v in fadrm.get("synthesis", {}).items() if k in ("sizes", "budgets")}}
            )
        return layers

    def check(self) -> None:
        from .data import get_dataset_spec

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
        method = registry("method").get(self.method)
        if method.max_teachers is not None and len(self.teachers) > method.max_teachers:
            raise FadrmError(
                f"method {method.name} uses at most {method.max_teachers} teacher(s), got "
                f"{len(self.teachers)}; use fadrm+ for several"
            )
        problem = (
            registry("unit plan").get(method.units).problem(self.ipc, self.synthesis)
            or registry("teacher policy").get(method.teacher_policy).problem(len(self.teachers), self.synthesis)
            or registry("initialiser").get(method.initialiser).problem(self)
        )
        if problem:
            raise FadrmError(f"{method.name}: {problem}")


# The student protocols, with what each means in the results.
PROTOCOL_WORDS = {
    "own": "each method's published relabelling and student settings",
    "common": "FADRM's reference relabelling and student settings, whatever the method",
}
# The method whose protocol ``common`` gives every set.
COMMON_PROTOCOL_METHOD = "fadrm"


def protocol_option() -> Any:
    """``--protocol``, shared by ``fadrm evaluate`` and ``fadrm run``. Not defining: it acts through the
    settings it resolves, which are the identity."""
    return option(
        "own",
        defines=False,
        choices=tuple(PROTOCOL_WORDS),
        help="how students train: own (the method's published relabelling and student protocol) or common "
        "(FADRM's reference protocol for every method, so that a table compares the data alone)",
    )


@dataclass
class EvalConfig(StageConfig):
    """Student training on a distilled set (``fadrm evaluate``)."""

    SECTION: ClassVar[str] = "evaluate"

    distilled: str = option(
        help="folder written by fadrm distill, or an ImageFolder made by another tool (with --dataset and --teacher)",
        positional=True,
    )
    # Not defining: a set's id pins its dataset (our manifest names it; a foreign set's id includes it).
    dataset: str | None = option(
        None,
        defines=False,
        choices=registered("dataset"),
        help="the set's dataset: required for a folder without manifest.json (an ImageFolder "
        "made by another tool); with a manifest it must agree",
    )
    out: str | None = option(None, help="results folder (default: <distilled>/eval)", defines=False, check=not_a_file)
    teachers: list[str] | None = option(
        None,
        help="relabelling teacher (default: the set's own); repeat for several",
        flag="--teacher",
        repeat=True,
        check=each(teacher_source),
    )
    students: list[str] | None = option(
        None,
        defines=False,
        flag="--student",
        repeat=True,
        check=each(model_name),
        help="student model (default: the teacher's architecture); repeat for a cross-architecture table",
    )
    protocol: str = protocol_option()
    epochs: int = option(300, help="training epochs", check=at_least(1))
    batch_size: int = option(16, help="loader batch: one view draw and one optimiser step each", check=at_least(1))
    accumulation: int = option(
        2,
        check=at_least(1),
        help="micro-batches each loader batch is forwarded in, gradients summed (2: the "
        "student's BatchNorm sees 8 of 16)",
    )
    optimizer: str = option("adamw", help="student optimiser", choices=registered("optimizer"))
    # Both new in fadrm 0.3: out of the identity at their only former behaviour.
    schedule: str = option(
        "stretched-cosine",
        help="learning-rate schedule over the epochs",
        choices=registered("schedule"),
        inert=lambda flat: flat.get("schedule") == "stretched-cosine",
    )
    loss: str = option(
        "kl",
        help="the student's loss on soft labels: kl (the distributions at --temperature) or "
        "mse-ce (raw logits' MSE + --ce-weight x cross-entropy, G-VBSM and EDC)",
        choices=registered("loss"),
        inert=lambda flat: flat.get("loss") == "kl",
    )
    # New for the students of G-VBSM, EDC and CV-DD: out of the identity at its former value, and wherever
    # the optimiser has no momentum.
    momentum: float = option(
        0.9,
        help="SGD's momentum (--optimizer sgd only; EDC's CIFAR-100 student: 0.875)",
        check=in_range(0.0, 1.0),
        inert=lambda flat: flat.get("momentum") == 0.9 or flat.get("optimizer") != "sgd",
    )
    ce_weight: float = option(
        0.1,
        check=non_negative,
        inert=lambda flat: flat.get("loss") != "mse-ce",
        help="weight of the cross-entropy with each image's own class in --loss mse-ce "
        "(G-VBSM: 0.15 on CIFAR, 0.1 on Tiny-ImageNet and ImageNet; EDC: 0.025)",
    )
    lr: float | None = option(
        None,
        flag="--student-lr",
        check=positive,
        help="default: the published value for the dataset, student and IPC (the preset's students table)",
    )
    weight_decay: float = option(0.01, help="on multi-dimensional weights only", check=non_negative)
    eta: float | None = option(
        None, check=positive, help="cosine stretch: lr factor 0.5(1 + cos(pi e / (eta E))); default as --student-lr"
    )
    temperature: float = option(20.0, help="softmax temperature of the soft labels and the student", check=positive)
    ema_decay: float = option(
        0.0,
        check=in_range(0.0, 1.0),
        inert=lambda flat: not flat.get("ema_decay"),
        help="validate an exponential moving average of the student's parameters, updated "
        "after every optimiser step with this decay (0: off; EDC: 0.99)",
    )
    mix: str = option("cutmix", help="mixing of each loader batch", choices=registered("mix"))
    mix_alpha: float = option(
        1.0,
        check=positive,
        help="mixing weight ~ Beta(a, a): 1 as published for CutMix; the reference's MixUp uses 0.8",
    )
    crop_scale: list[float] = option(
        [0.08, 1.0], help="area range of the students' random-resized crops", nargs=2, check=scale_pair
    )
    # New in fadrm 0.4: out of the identity at its only former behaviour.
    augment: bool = option(
        True,
        inert=lambda flat: flat.get("augment") is True,
        help="the students' augmentation: random-resized crops, flips and mixing (--no-augment: "
        "whole images, as they are)",
    )
    rand_augment: bool = option(
        False,
        inert=lambda flat: not flat.get("rand_augment"),
        help="RandAugment (two operations at magnitude 9, as torchvision's) on each image "
        "before its crop, drawn from the batch's seed (EDC's CIFAR and Tiny students)",
    )
    labels: str = option(
        "live", help="teacher in the loop, or labels stored once and reused", choices=("live", "stored")
    )
    labels_dir: str | None = option(
        None, defines=False, help="where stored labels live (default: <out>/labels; repeat r > 0 uses <dir>-repeat<r>)"
    )
    topk: int | None = option(None, help="store only the top-k probabilities per view", check=at_least(1))
    bssl: bool = option(
        True,
        help="batch-specific soft labels: teachers' BatchNorm on each half of the loader "
        "batch (the published default; --no-bssl: eval-mode teachers)",
    )
    teacher_weights: list[float] | None = option(
        None, help="weight of each relabelling teacher", flag="--teacher-weight", repeat=True, check=each(non_negative)
    )
    # The relabelling of G-VBSM and CV-DD; out of the identity when off, as every run before them.
    teacher_priors: list[float] | None = option(
        None,
        flag="--teacher-prior",
        repeat=True,
        inert=lambda flat: not flat.get("teacher_priors"),
        help="CV-DD's committee relabelling: one score per relabelling teacher "
        "(its prior); the teachers' logits are weighted by softmax(prior / "
        "--prior-temperature)",
    )
    prior_temperature: float = option(
        10.0,
        check=positive,
        inert=lambda flat: not flat.get("teacher_priors"),
        help="temperature of the priors' softmax (CV-DD relabels at 10)",
    )
    balance_teachers: bool = option(
        False,
        inert=lambda flat: not flat.get("balance_teachers"),
        help="rescale each teacher's logits for a batch to the teachers' mean Frobenius "
        "norm before averaging (G-VBSM on ImageNet)",
    )
    eval_every: int = option(
        10,
        defines=False,
        check=at_least(0),
        help="validate after epochs 1, 1+k, 1+2k, ... and the last (published: 10; 0: the last "
        "only); the best of these is reported beside the last epoch's",
    )
    eval_at: list[int] = option([], help="also validate after these epochs", defines=False, check=each(at_least(1)))
    baselines: list[str] = option(
        [],
        defines=False,
        flag="--baseline",
        repeat=True,
        choices=registered("baseline"),
        help="also train these arms: random-real (a random real subset of the same "
        "IPC, soft and hard labels), hard-labels (the set with hard labels), full-data (the "
        "whole training split, hard labels, by the teacher recipe; cached), "
        "no-augmentation (set and subset, soft labels, no augmentation)",
    )
    robustness: bool = option(
        False,
        defines=False,
        help="add every baseline the robustness scores need and report HLR, IOR, LRS and ARS "
        "(DD-Ranking's scores, on accuracies as fractions)",
    )
    full_data_dir: str | None = option(
        None,
        defines=False,
        check=not_a_file,
        help="where full-data students are kept and reused (default: "
        "$FADRM_CACHE/full-data, else ~/.cache/fadrm/full-data)",
    )
    seed: int = option(0, help="random seed (student initialisation, views, random real subset)")
    # Each run's identity holds its own seed, so finished runs survive a larger --repeats.
    repeats: int = option(
        1,
        defines=False,
        check=at_least(1),
        help="repeat each comparison with seeds seed, seed+1, ... and report mean ± std",
    )
    holdout: int | None = option(
        None, help="validate on the last N training images per class (default: the set's)", check=at_least(0)
    )
    data_root: str | None = option(
        None, help="dataset folder (default: the dataset's usual place)", defines=False, check=existing_folder
    )
    device: str = option("auto", help=_DEVICE_HELP, defines=False, check=device_name)
    amp: str = option(
        "auto",
        help=f"mixed precision (auto: {CUDA_AUTO_AMP['evaluate']} on CUDA, as published; off on the CPU)",
        defines=False,
        choices=AMP_MODES,
        unset="auto",
    )
    workers: int | None = option(None, help="data-loading processes", defines=False, check=at_least(0))
    # One save measured 8 ms for the demo's ConvNet student, 4% of its epoch (benchmarks/student_checkpoint.py).
    checkpoint_every: int = option(
        1,
        defines=False,
        check=at_least(1),
        help="save each student's state every N epochs, to resume from after a crash (<out>/runs/<run>.partial.pt)",
    )

    @classmethod
    def protocol_method(cls, method: str | None, chosen: dict[str, Any]) -> str | None:
        """The set's own method under ``--protocol own``; FADRM's under ``common``."""
        return COMMON_PROTOCOL_METHOD if chosen.get("protocol") == "common" else method

    def check(self) -> None:
        if self.batch_size % self.accumulation:
            raise FadrmError(
                f"--accumulation {self.accumulation} must divide --batch-size {self.batch_size} "
                "(each loader batch is split into equal micro-batches)"
            )
        if self.labels == "stored" and self.topk is not None and registry("loss").get(self.loss).needs_logits:
            raise FadrmError(
                f"--loss {self.loss} needs the teachers' logits; --topk {self.topk} stores probabilities "
                "only: leave --topk out"
            )
        if self.teacher_priors and self.teacher_weights:
            raise FadrmError("give --teacher-weight or --teacher-prior, not both (priors make the weights)")
        if self.teacher_priors and self.teachers and len(self.teacher_priors) != len(self.teachers):
            raise FadrmError(
                f"{len(self.teacher_priors)} teacher priors for {len(self.teachers)} teachers: give one "
                "--teacher-prior per --teacher"
            )
        late = [e for e in self.eval_at if not 1 <= e <= self.epochs]
        if late:
            raise FadrmError(f"--eval-at {late[0]} is outside the {self.epochs} training epochs")

    def view_sampler(self, size: int) -> Any:
        """The views of this run's students at ``size`` px (the same for live and stored labels)."""
        from .augment import ViewSampler

        return ViewSampler(
            self.seed,
            size,
            (self.crop_scale[0], self.crop_scale[1]),
            self.mix,
            self.mix_alpha,
            self.augment,
            self.rand_augment,
        )

    def evaluation_epochs(self) -> list[int]:
        """The epochs (1-based) after which the student is validated; always ends with the last."""
        cadence = range(1, self.epochs + 1, self.eval_every) if self.eval_every > 0 else []
        return sorted({*cadence, *(e for e in self.eval_at if 1 <= e <= self.epochs), self.epochs})


@dataclass
class RunConfig(StageConfig):
    """``fadrm run``: the whole pipeline; each stage's other options come from its preset.

    A preset's ``priors`` and ``fixed_committee`` (CV-DD's published values) describe its own
    ``teacher_models`` by position, so they apply only while the run trains or loads exactly that
    list; with other teachers a committee method's priors are computed (:mod:`fadrm.priors`).
    """

    SECTION: ClassVar[str] = "run"

    dataset: str = option(help="registered dataset name (fadrm list datasets)", choices=registered("dataset"))
    out: str = option(
        help="folder for the teachers, the distilled set and its evaluation", defines=False, check=not_a_file
    )
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
    data_root: str | None = option(
        None, help="dataset folder (default: the dataset's usual place)", defines=False, check=existing_folder
    )
    seed: int = option(0, help="random seed of every stage")
    holdout: int = option(0, help="validate on the last N training images per class", check=at_least(0))
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
    device: str = option("auto", help=_DEVICE_HELP, defines=False, check=device_name)
    amp: str = option(
        "auto",
        defines=False,
        choices=AMP_MODES,
        unset="auto",
        help="mixed precision (auto: each stage's published precision on CUDA: "
        + ", ".join(f"{stage} {amp}" for stage, amp in CUDA_AUTO_AMP.items())
        + "; off on the CPU)",
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
        own_models = _merged(cls, *layers).get("teacher_models")
        if chosen.get("teachers") or chosen.get("teacher_models", own_models) != own_models:
            layers = [{k: v for k, v in layer.items() if k not in cls.TEACHER_BOUND} for layer in layers]
        return layers


@dataclass
class PriorsConfig(StageConfig):
    """A committee method's priors (``fadrm priors``): per teacher, the last-epoch top-1 of one fixed
    student trained on an SRe2L++ set distilled from that teacher alone."""

    SECTION: ClassVar[str] = "priors"

    dataset: str = option(help="registered dataset name (fadrm list datasets)", choices=registered("dataset"))
    # Identified by their files' hashes, as for distill; checked when loaded, not here: `fadrm run`
    # resolves this config before it trains them.
    teachers: list[str] = option(
        help="teacher checkpoint, .safetensors, or torchvision weights arch:WEIGHTS; repeat for several",
        flag="--teacher",
        repeat=True,
        defines=False,
    )
    out: str = option(help="folder for each teacher's SRe2L++ set and priors.json", defines=False, check=not_a_file)
    ipc: int = option(10, help="images per class of each teacher's set (the IPC the priors are for)", check=at_least(1))
    student: str | None = option(
        None,
        check=model_name,
        help="the one student trained on every teacher's set (default: the first teacher's architecture)",
    )
    seed: int = option(0, help="random seed of the sets and the students")
    holdout: int = option(
        0, help="validate on the last N training images per class, not the test set", check=at_least(0)
    )
    data_root: str | None = option(
        None, help="dataset folder (default: the dataset's usual place)", defines=False, check=existing_folder
    )
    device: str = option("auto", help=_DEVICE_HELP, defines=False, check=device_name)
    amp: str = option(
        "auto",
        defines=False,
        choices=AMP_MODES,
        unset="auto",
        help="mixed precision (auto: the presets' precision of SRe2L++ and of the students)",
    )

    def check(self) -> None:
        if not self.teachers:
            raise FadrmError("give at least one --teacher")


@dataclass
class StatsConfig(StageConfig):
    """The statistics pass (``fadrm stats``) of G-VBSM and EDC: per teacher, the training set's
    statistics at the input of every convolution and BatchNorm layer, globally and per class."""

    SECTION: ClassVar[str] = "stats"

    dataset: str = option(help="registered dataset name (fadrm list datasets)", choices=registered("dataset"))
    # Identified by their files' hashes, as for distill.
    teachers: list[str] = option(
        help="teacher checkpoint, .safetensors, or torchvision weights arch:WEIGHTS; repeat for several",
        flag="--teacher",
        repeat=True,
        defines=False,
        check=each(teacher_source),
    )
    holdout: int = option(
        0, help="leave out the last N training images per class, as the distillation does", check=at_least(0)
    )
    data_root: str | None = option(
        None, help="dataset folder (default: the dataset's usual place)", defines=False, check=existing_folder
    )
    teacher_arch: str | None = option(None, help="architecture of a plain state-dict teacher", check=model_name)
    batch_size: int = option(
        64, help="images per forward pass; the targets are the mean of per-batch statistics", check=at_least(1)
    )
    seed: int = option(0, help="random seed of the image order and the augmentation")
    stats_dir: str | None = option(
        None, defines=False, check=not_a_file, help="where to write the statistics files (default: beside each teacher)"
    )
    workers: int | None = option(
        None, help="data-loading processes (default: 0 on <= 2 cores)", defines=False, check=at_least(0)
    )
    device: str = option("auto", help=_DEVICE_HELP, defines=False, check=device_name)
    overwrite: bool = option(False, help="compute again a file made with other settings", defines=False, persist=False)

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


# ------------------------------------------------------------ declarations
def _is_part(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, Options)


@functools.cache
def _parts(cls: type[Options]) -> frozenset[str]:
    hints = typing.get_type_hints(cls)
    return frozenset(f.name for f in fields(cls) if _is_part(hints[f.name]))


@functools.cache
def option_fields(cls: type[StageConfig]) -> list[tuple[tuple[str, ...], dataclasses.Field]]:
    """(path, field) of every option of a stage, parts' options included, in declaration order."""
    hints = typing.get_type_hints(cls)
    out: list[tuple[tuple[str, ...], dataclasses.Field]] = []
    for f in fields(cls):
        if _is_part(hints[f.name]):
            out += [((f.name, *path), sub) for path, sub in option_fields(hints[f.name])]
        else:
            out.append(((f.name,), f))
    return out


def key_of(f: dataclasses.Field) -> str:
    """A field's key: its name in flat files, identities and (with dashes) its flag."""
    return f.metadata["key"] or f.name


def flatten(cls: type[StageConfig], values: Mapping[str, Any]) -> dict[str, Any]:
    """Nested (or already flat) ``values`` of ``cls`` by key; keys it does not declare are kept."""
    flat: dict[str, Any] = {}
    for name, value in values.items():
        if name in _parts(cls) and isinstance(value, Mapping):
            keys = {f.name: key_of(f) for f in fields(typing.get_type_hints(cls)[name])}
            flat.update({keys.get(k, k): v for k, v in value.items()})
        else:
            flat[name] = value
    return flat


def defining_settings(cls: type[StageConfig], values: Mapping[str, Any]) -> dict[str, Any]:
    """The settings among ``values`` (a config as a dict, nested or flat) that define the result.

    Options declared with ``defines=False`` are left out, and so is an option whose ``inert``
    rule holds; keys the stage does not declare (written by another version) are kept, so
    they keep distinguishing results.
    """
    declared = {key_of(f): f for _, f in option_fields(cls)}
    kept = {k: v for k, v in flatten(cls, values).items() if k not in declared or declared[k].metadata["defines"]}
    return {
        k: v
        for k, v in kept.items()
        if not (k in declared and declared[k].metadata["inert"] and declared[k].metadata["inert"](kept))
    }


@functools.cache
def _annotation(cls: type[Options], path: tuple[str, ...]) -> Any:
    """The annotation of the option at ``path`` as declared (``int | None`` included)."""
    owner: Any = cls
    for name in path[:-1]:
        owner = typing.get_type_hints(owner)[name]
    return typing.get_type_hints(owner)[path[-1]]


@functools.cache
def option_type(cls: type[StageConfig], path: tuple[str, ...]) -> Any:
    """The declared type of the option at ``path`` without None (``int | None`` -> int;
    ``list[int]`` and ``str | float`` kept)."""
    hint = _annotation(cls, path)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        members = tuple(a for a in typing.get_args(hint) if a is not type(None))
        hint = members[0] if len(members) == 1 else typing.Union[members]
    return hint


def flag_of(f: dataclasses.Field) -> str:
    """The command-line flag of a field."""
    return f.metadata["flag"] or "--" + key_of(f).replace("_", "-")


def choices_of(f: dataclasses.Field) -> list[str] | None:
    choices = f.metadata["choices"]
    return list(choices() if callable(choices) else choices) if choices is not None else None


# --------------------------------------------------------------- validation
def _type_error(value: Any, hint: Any, optional: bool) -> str | None:
    """Why ``value`` is not of the declared type, or None."""
    if value is None:
        return None if optional else "must be given"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        problems = [_type_error(value, member, False) for member in typing.get_args(hint)]
        if None in problems:
            return None
        return "must be " + " or ".join(str(p).removeprefix("must be ") for p in problems)
    if origin is list:
        if not isinstance(value, list):
            return "must be a list"
        (item,) = typing.get_args(hint)
        return next((e for v in value if (e := _type_error(v, item, False))), None)
    if origin is dict or hint is dict:
        return None if isinstance(value, dict) else "must be a mapping of key=value"
    if hint is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "must be a whole number"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok else "must be a finite number"
    if hint is str:
        return None if isinstance(value, str) and value else "must be non-empty text"
    return None


def option_problem(cls: type[Options], path: tuple[str, ...], f: dataclasses.Field, value: Any) -> str | None:
    """Why ``value`` is not valid for the option at ``path`` of ``cls`` (its type, count, choices
    and rules, in that order), or None."""
    optional = type(None) in typing.get_args(_annotation(cls, path))
    problem = _type_error(value, option_type(cls, path), optional)
    if problem is not None or value is None:
        return problem
    nargs, choices = f.metadata["nargs"], choices_of(f)
    if nargs is not None and len(value) != nargs:
        return f"needs exactly {nargs} values"
    if choices is not None and any(v not in choices for v in (value if isinstance(value, list) else [value])):
        return f"must be one of {', '.join(choices)}"
    return next((p for rule in f.metadata["check"] if (p := rule(value))), None)


def _refuse(f: dataclasses.Field, problem: str, value: Any) -> NoReturn:
    raise FadrmError(f"{flag_of(f)} {problem}, got {value!r}")


def check_option(cls: type[StageConfig], key: str, value: Any) -> None:
    """Refuse ``value`` for the option ``key`` of ``cls`` as :func:`validate` would, before the rest
    of the config exists (the options that choose the preset).

    Raises:
        FadrmError: one line naming the flag, what it must be and the value given.
    """
    path, f = next((path, f) for path, f in option_fields(cls) if key_of(f) == key)
    problem = option_problem(cls, path, f, value)
    if problem:
        _refuse(f, problem, value)


def validate(config: StageConfig) -> None:
    """Check every option against its declaration, then the stage's rules between options.

    Raises:
        FadrmError: one line naming the flag, what it must be and the value given.
    """
    for path, f, value in config.leaves():
        problem = option_problem(type(config), path, f, value)
        if problem:
            _refuse(f, problem, value)
    config.check()


# ------------------------------------------------------------------ presets
def preset_names() -> list[str]:
    """Datasets that ship a preset."""
    folder = resources.files("fadrm") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


# The sections a preset may hold: one per stage, and the student recipe table.
PRESET_SECTIONS = ("teacher", "distill", "evaluate", "run", "stats", "priors", "students")


def _read_preset(dataset: str) -> dict[str, Any]:
    path = resources.files("fadrm") / "presets" / f"{dataset}.yaml"
    if not path.is_file():
        return {}
    try:
        preset = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise FadrmError(f"preset {dataset}.yaml is not valid YAML ({str(exc).splitlines()[0]})") from None
    unknown = set(preset) - set(PRESET_SECTIONS) if isinstance(preset, dict) else {"(not a mapping)"}
    if unknown:
        raise FadrmError(
            f"preset {dataset}.yaml has unknown sections {sorted(unknown)}; "
            f"its sections are {', '.join(PRESET_SECTIONS)}"
        )
    return preset


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise FadrmError(f"{where} is not a mapping of options")
    return dict(value)


def preset_parts(
    dataset: str, section: str, method: str | None = None, ipc: int | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """(where, values) of one preset section, then of its ``overrides.<method>`` and
    ``overrides.<method>@<ipc>`` (when a method, and an IPC, are given), in that order."""
    where = f"preset {dataset}.yaml ({section}"
    values = _mapping(_read_preset(dataset).get(section), where + ")")
    overrides = _mapping(values.pop("overrides", None), where + ".overrides)")
    names = ([method] if method else []) + ([f"{method}@{ipc}"] if method and ipc is not None else [])
    return [(where + ")", values)] + [
        (f"{where}.overrides.{name})", _mapping(overrides.get(name), f"{where}.overrides.{name})")) for name in names
    ]


def load_preset_section(
    dataset: str, section: str, method: str | None = None, ipc: int | None = None
) -> dict[str, Any]:
    """One section of a dataset's preset ("distill", "teacher", "evaluate", "run", "students") as
    written, with ``overrides.<method>`` and ``overrides.<method>@<ipc>`` applied; {} if absent."""
    values: dict[str, Any] = {}
    for _, part in preset_parts(dataset, section, method, ipc):
        values.update(part)
    return values


# The student recipe for architectures the published scripts never trained (they train only
# ResNet-18/50/101): their most common setting, AdamW lr 1e-3 with the cosine stretched by 2.
DEFAULT_STUDENT_RECIPE = {"lr": 1e-3, "eta": 2.0}


def student_recipe(dataset: str, student: str, ipc: int) -> dict[str, Any]:
    """Learning rate and cosine stretch for training ``student`` on an IPC-``ipc`` set of ``dataset``.

    From the preset's ``students`` table (the reference's values per dataset, student and IPC).
    An IPC the table lacks takes the largest listed IPC below it (the smallest listed one if
    none is below); a student the table does not name takes :data:`DEFAULT_STUDENT_RECIPE`.
    The returned ``source`` says which applied.
    """
    table = load_preset_section(dataset, "students").get(student)
    if not table:
        return {**DEFAULT_STUDENT_RECIPE, "source": f"default: no published recipe for {student} on {dataset}"}
    entries = {int(k): v for k, v in table.items()}
    chosen = max((i for i in entries if i <= ipc), default=min(entries))
    entry = entries[chosen]
    source = f"{dataset} preset, {student} at IPC {chosen}" + (f" ({entry['note']})" if "note" in entry else "")
    return {"lr": float(entry["lr"]), "eta": float(entry["eta"]), "source": source}


# ----------------------------------------------------------------- resolver
def _merged(cls: type[Options], *layers: Mapping[str, Any]) -> dict[str, Any]:
    """Nested layers of ``cls``, later over earlier: a part merged option by option, any other
    value (a list, a key=value mapping such as ``model_args``) replaced whole."""
    parts = _parts(cls)
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            out[key] = {**out.get(key, {}), **value} if key in parts else value
    return out


def _plain(value: Any) -> Any:
    """Paths as text and tuples as lists, as they are written to YAML and JSON."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def nest(cls: type[StageConfig], values: Mapping[str, Any], source: str, drop_unset: bool = False) -> dict[str, Any]:
    """Flat or nested ``values`` as the nested form of ``cls``; unknown keys fail naming ``source``.

    With ``drop_unset``, None and each field's ``unset`` value count as not given. A single
    value for an option given by repeating its flag (``teachers: t.pt``) is a list of one.
    """
    if not isinstance(values, Mapping):
        raise FadrmError(f"{source} is not a mapping of options")
    by_key = {key_of(f): (path, f) for path, f in option_fields(cls)}
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in _parts(cls):
            if not isinstance(value, Mapping):
                raise FadrmError(f"{source}: {key} must be a mapping of its options, got {value!r}")
            items = []
            for sub_key, sub_value in value.items():
                # Inside a part, a field's own name is accepted as well as its key.
                sub = next((f for f in fields(hints[key]) if sub_key in (f.name, key_of(f))), None)
                if sub is None:
                    raise FadrmError(f"{source} sets unknown option {key}.{sub_key}")
                items.append(((key, sub.name), sub, sub_value))
        elif key in by_key:
            items = [(*by_key[key], value)]
        else:
            raise FadrmError(f"{source} sets unknown option {key!r}")
        for path, f, given in items:
            given = _plain(given)
            if drop_unset and (given is None or (f.metadata["unset"] is not None and given == f.metadata["unset"])):
                continue
            if f.metadata["repeat"] and isinstance(given, str):
                given = [given]
            target = out
            for name in path[:-1]:
                target = target.setdefault(name, {})
            target[path[-1]] = given
    return out


def build(cls: type[StageConfig], values: Mapping[str, Any]) -> StageConfig:
    """A stage config from nested values; required options that are missing fail with their flag."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if _is_part(hints[f.name]):
            kwargs[f.name] = build(hints[f.name], values.get(f.name, {}))
        elif f.name in values:
            kwargs[f.name] = values[f.name]
        elif f.default is MISSING and f.default_factory is MISSING:
            raise FadrmError(f"give {flag_of(f) if not f.metadata['positional'] else f.name.upper()}")
    return cls(**kwargs)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A config file's values (YAML mapping), as written next to every output."""
    path = Path(path)
    if not path.is_file():
        raise FadrmError(f"config file {path} not found")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise FadrmError(f"config file {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise FadrmError(f"config file {path} does not hold a mapping of options")
    return values


def resolve(
    cls: type[StageConfig],
    given: Mapping[str, Any] | None = None,
    config_file: str | Path | None = None,
    dataset: str | None = None,
    method: str | None = None,
    ipc: int | None = None,
) -> Any:
    """Build and validate a stage's config from its layers (see the module docstring).

    Args:
        cls: the stage's config class.
        given: options by key (None: not given), from the command line or the API.
        config_file: a YAML file of options (a written ``config.yaml`` replays exactly).
        dataset, method, ipc: which preset applies, when the stage has no such option
            (evaluation takes them from the distilled set); otherwise read from the options.
    """
    given_values = nest(cls, given or {}, "the options given", drop_unset=True)
    file_values = (
        nest(cls, read_config_file(config_file), f"config file {config_file}", drop_unset=True) if config_file else {}
    )
    chosen = _merged(cls, file_values, given_values)
    # Which preset applies: the stage's own options where it has them and they are set (checked
    # before the preset is read), else what the caller says (evaluation: the set's dataset).
    context = {"dataset": dataset, "method": method, "ipc": ipc}
    for path, f in option_fields(cls):
        if path[0] in context and (value := chosen.get(f.name, f.default)) not in (MISSING, None):
            check_option(cls, key_of(f), value)
            context[f.name] = value
    if context["dataset"] is None:
        raise FadrmError("give --dataset")
    layers: list[dict[str, Any]] = []
    method = cls.protocol_method(None if context["method"] is MISSING else context["method"], chosen)
    if method is not None:
        method_defaults = registry("method").get(method).defaults.get(cls.SECTION, {})
        layers.append(nest(cls, method_defaults, f"method {method}"))
    layers += cls.preset_layers(context["dataset"], method, context["ipc"], chosen)
    config = build(cls, _merged(cls, *layers, chosen))
    validate(config)
    return config


def write_config(path: str | Path, config: StageConfig) -> None:
    """Write the resolved config as YAML (atomically); ``--config`` reads it back."""
    from .io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(dump_config(config))


def written_form(config: StageConfig) -> dict[str, Any]:
    """The config as a file holds it: one-shot options (``overwrite``) at their default."""
    values = config.to_dict()
    for path, f, _ in config.leaves():
        if not f.metadata["persist"]:
            target = values
            for name in path[:-1]:
                target = target[name]
            target[path[-1]] = f.default
    return values


class _ConfigDumper(yaml.SafeDumper):
    """Mappings as blocks, lists of plain values on one line (``sizes: [24, 28]``)."""


_ConfigDumper.add_representer(
    list,
    lambda dumper, values: dumper.represent_sequence(
        "tag:yaml.org,2002:seq", values, flow_style=not any(isinstance(v, (list, dict)) for v in values)
    ),
)


def dump_yaml(values: Any) -> str:
    """YAML as fadrm writes configs: in declaration order, lists of plain values on one line."""
    return yaml.dump(values, Dumper=_ConfigDumper, sort_keys=False, default_flow_style=False)


def dump_config(config: StageConfig) -> str:
    """The config as the YAML that ``--config`` replays (see :func:`written_form`)."""
    return dump_yaml(written_form(config))
