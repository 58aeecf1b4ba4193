"""The configuration of ``fadrm evaluate``: how students train on a distilled set and what is reported."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import FadrmError
from ..runtime import CUDA_AUTO_AMP
from .fields import (
    amp_option,
    data_root_option,
    device_option,
    holdout_option,
    jobs_option,
    overwrite_option,
    seed_option,
    workers_option,
)
from .options import (
    at_least,
    each,
    in_range,
    model_name,
    non_negative,
    not_a_file,
    option,
    positive,
    registered,
    scale_pair,
    teacher_source,
)
from .resolver import StageConfig

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


@dataclass(frozen=True)
class EvalConfig(StageConfig):
    """Student training on a distilled set (``fadrm evaluate``)."""

    SECTION: ClassVar[str] = "evaluate"

    # Not defining: a set is identified by its content (its manifest's records and image digests, or a
    # foreign set's files), so a moved or copied set keeps its finished students.
    distilled: str = option(
        help="folder written by fadrm distill, or an ImageFolder made by another tool (with --dataset and --teacher)",
        positional=True,
        defines=False,
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
    # Not defining by path: the evaluation identifies given teachers by their files' hashes.
    teachers: list[str] | None = option(
        None,
        defines=False,
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
    schedule: str = option(
        "stretched-cosine",
        help="learning-rate schedule over the epochs",
        choices=registered("schedule"),
    )
    loss: str = option(
        "kl",
        help="the student's loss on soft labels: kl (the distributions at --temperature) or "
        "mse-ce (raw logits' MSE + --ce-weight x cross-entropy, G-VBSM and EDC)",
        choices=registered("loss"),
    )
    momentum: float = option(
        0.9,
        help="SGD's momentum (--optimizer sgd only; EDC's CIFAR-100 student: 0.875)",
        check=in_range(0.0, 1.0),
    )
    ce_weight: float = option(
        0.1,
        check=non_negative,
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
    augment: bool = option(
        True,
        help="the students' augmentation: random-resized crops, flips and mixing (--no-augment: "
        "whole images, as they are)",
    )
    rand_augment: bool = option(
        False,
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
    # The relabelling of G-VBSM and CV-DD.
    teacher_priors: list[float] | None = option(
        None,
        flag="--teacher-prior",
        repeat=True,
        help="CV-DD's committee relabelling: one score per relabelling teacher "
        "(its prior); the teachers' logits are weighted by softmax(prior / "
        "--prior-temperature)",
    )
    prior_temperature: float = option(
        10.0,
        check=positive,
        help="temperature of the priors' softmax (CV-DD relabels at 10)",
    )
    balance_teachers: bool = option(
        False,
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
    seed: int = seed_option("random seed (student initialisation, views, random real subset)")
    # Each run's identity holds its own seed, so finished runs survive a larger --repeats.
    repeats: int = option(
        1,
        defines=False,
        check=at_least(1),
        help="repeat each comparison with seeds seed, seed+1, ... and report mean ± std",
    )
    holdout: int | None = holdout_option("validate on the last N training images per class (default: the set's)", None)
    data_root: str | None = data_root_option()
    device: str = device_option()
    amp: str = amp_option(f"mixed precision (auto: {CUDA_AUTO_AMP['evaluate']} on CUDA, as published; off on the CPU)")
    workers: int | None = workers_option("data-loading processes")
    jobs: str = jobs_option()
    views: str = option(
        "auto",
        defines=False,
        choices=("auto", "device", "host"),
        help="where the students' views are rendered (the same pixels either way): auto is the device (CUDA: the "
        "batch at once); host renders them on the CPU and copies them over",
    )
    prefetch_views: str = option(
        "auto",
        defines=False,
        choices=("auto", "on", "off"),
        help="draw and render the next batch's views in a background thread while this one trains; auto: on "
        "where views are rendered on the host for a GPU",
    )
    fused_optimizer: str = option(
        "auto",
        defines=False,
        choices=("auto", "on", "off"),
        help="step the students with torch's fused optimiser (one operator, no scalar read per step; other "
        "rounding); auto: on for the CPU (AdamW 4.8x faster there for a ResNet-18), off on CUDA until timed on a GPU",
    )
    # One save measured 2.9 ms for the demo's ConvNet student, 3.5% of its epoch (benchmarks/student_checkpoint.py).
    checkpoint_every: int = option(
        1,
        defines=False,
        check=at_least(1),
        help="save each student's state every N epochs, to resume from after a crash (<out>/runs/<run>.partial.pt)",
    )
    overwrite: bool = overwrite_option(
        "replace the evaluation of another set in --out (only the files an evaluation writes are removed)"
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

    def evaluation_epochs(self) -> list[int]:
        """The epochs (1-based) after which the student is validated; always ends with the last."""
        cadence = range(1, self.epochs + 1, self.eval_every) if self.eval_every > 0 else []
        return sorted({*cadence, *(e for e in self.eval_at if 1 <= e <= self.epochs), self.epochs})
