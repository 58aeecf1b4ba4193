"""Like-for-like baselines: the registry and the random real subset."""

from __future__ import annotations

import pytest
import torch

from fadrm.baselines import BASELINES, TrainingSet, random_real_subset
from fadrm.data import get_dataset_spec, load_split
from fadrm.errors import FadrmError

SPEC = get_dataset_spec("fashion-mnist")


@pytest.mark.parametrize("name", BASELINES.names())
def test_every_baseline_gives_ipc_images_per_class(name, fmnist_root):
    train = load_split(SPEC, "train", fmnist_root)
    subset = BASELINES.get(name)(train, SPEC, 3, 0)
    assert isinstance(subset, TrainingSet) and subset.name == name
    assert subset.images.dtype == torch.uint8 and subset.images.shape == (30, 1, 28, 28)
    assert torch.equal(torch.bincount(subset.labels, minlength=10), torch.full((10,), 3))


def test_random_real_subset_depends_on_the_seed_only(fmnist_root):
    train = load_split(SPEC, "train", fmnist_root)
    a, b = random_real_subset(train, SPEC, 2, 0), random_real_subset(train, SPEC, 2, 0)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, random_real_subset(train, SPEC, 2, 1).images)
    with pytest.raises(FadrmError, match="fewer than IPC 17"):
        random_real_subset(train, SPEC, 17, 0)  # the fixture has 16 training images per class


def test_unknown_baseline_lists_the_choices():
    with pytest.raises(FadrmError, match="^unknown baseline 'herding'; choose one of: random-real$"):
        BASELINES.get("herding")
