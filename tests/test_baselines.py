"""Like-for-like baselines: the arms, the random real subset, and the full-data student."""

from __future__ import annotations

import pytest
import torch

import fadrm
from fadrm.baselines import (
    BASELINES,
    REAL_SUBSETS,
    ROBUSTNESS_BASELINES,
    Arm,
    TrainingSet,
    comparison_arms,
    full_data_config,
    full_data_student,
    random_real_subset,
)
from fadrm.config import EvalConfig
from fadrm.data import get_dataset_spec, load_split
from fadrm.errors import FadrmError

SPEC = get_dataset_spec("fashion-mnist")


@pytest.mark.parametrize("name", REAL_SUBSETS.names())
def test_every_real_subset_gives_ipc_images_per_class(name, fmnist_root):
    train = load_split(SPEC, "train", fmnist_root)
    subset = REAL_SUBSETS.get(name)(train, SPEC, 3, 0)
    assert isinstance(subset, TrainingSet) and subset.name == name
    assert subset.images.dtype == torch.uint8 and subset.images.shape == (30, 1, 28, 28)
    assert torch.equal(torch.bincount(subset.labels, minlength=10), torch.full((10,), 3))


@pytest.mark.parametrize("name", BASELINES.names())
def test_every_baseline_names_arms_the_evaluation_can_train(name):
    for arm in BASELINES.get(name).arms:
        assert arm.train_set in ("distilled", "full-data", *REAL_SUBSETS.names()) and arm.labels in ("soft", "hard")


def test_random_real_subset_depends_on_the_seed_only(fmnist_root):
    train = load_split(SPEC, "train", fmnist_root)
    a, b = random_real_subset(train, SPEC, 2, 0), random_real_subset(train, SPEC, 2, 0)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, random_real_subset(train, SPEC, 2, 1).images)
    with pytest.raises(FadrmError, match="fewer than IPC 17"):
        random_real_subset(train, SPEC, 17, 0)  # the fixture has 16 training images per class


def test_comparison_arms_start_with_the_distilled_set_and_keep_each_arm_once():
    arms = comparison_arms(["random-real", *ROBUSTNESS_BASELINES])
    assert arms == [
        Arm("distilled", "soft"),
        Arm("random-real", "soft"),
        Arm("random-real", "hard"),
        Arm("distilled", "hard"),
        Arm("full-data", "hard"),
        Arm("distilled", "soft", augment=False),
        Arm("random-real", "soft", augment=False),
    ]
    assert [arm.key("convnet") for arm in arms[-2:]] == [
        "distilled-convnet-soft-noaug",
        "random-real-convnet-soft-noaug",
    ]


def test_unknown_baseline_lists_the_choices():
    with pytest.raises(
        FadrmError,
        match="^unknown baseline 'herding'; choose one of: full-data, hard-labels, no-augmentation, random-real$",
    ):
        BASELINES.get("herding")


def test_full_data_uses_the_teacher_recipe_and_reuses_a_teacher_trained_with_it(teacher_ckpt, tmp_path):
    config = EvalConfig(distilled="x", seed=3, holdout=2, full_data_dir=str(tmp_path / "cache"))
    recipe = full_data_config(config, "fashion-mnist", "convnet-small", {"width": 8})
    # The dataset's teacher preset, at the evaluation's seed and held-out split, in a file named by its identity.
    assert (recipe.model, recipe.epochs, recipe.seed, recipe.holdout) == ("convnet-small", 7, 3, 2)
    assert recipe.out.startswith(str(tmp_path / "cache" / "fashion-mnist-convnet-small-"))
    assert full_data_config(config, "fashion-mnist", "convnet-small", {"width": 6}).out != recipe.out
    teacher = fadrm.load_teacher(teacher_ckpt)
    teacher.train_config = recipe.identity()
    lines: list[str] = []
    found, _ = full_data_student(config, "fashion-mnist", "convnet-small", {"width": 8}, [teacher], lines.append)
    assert found is teacher and "reusing it" in lines[0] and not (tmp_path / "cache").exists()
