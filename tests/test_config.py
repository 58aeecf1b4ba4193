"""Presets: every shipped preset resolves for every method; flags override; the published values
(synthesis and student recipe)."""

from __future__ import annotations

import pytest

from fadrm.config import load_preset_section, preset_names, resolve_distill_config
from fadrm.data import get_dataset_spec
from fadrm.evaluate import EvalConfig
from fadrm.synthesis.methods import METHODS


@pytest.mark.parametrize("dataset", preset_names())
@pytest.mark.parametrize("method", METHODS.names())
def test_presets_resolve(dataset, method):
    config = resolve_distill_config(dataset, ["t.pt"], "out", method=method, ipc=10)
    assert len(config.sizes) == len(config.budgets)
    assert config.sizes[-1] == get_dataset_spec(dataset).image_size
    for section in ("teacher", "evaluate"):
        load_preset_section(dataset, section)  # parses


def test_published_values_and_overrides():
    imagenet = resolve_distill_config("imagenet-1k", ["t"], "o", method="fadrm", ipc=10)
    assert imagenet.sizes == [200, 224, 200, 224] and imagenet.budgets == [500] * 4 and imagenet.jitter == 32
    assert imagenet.factor == 2 and imagenet.classes_per_group == 100 and imagenet.lr == 0.25
    assert resolve_distill_config("imagenette", ["t"], "o", method="fadrm", ipc=10).lr == 0.05
    assert resolve_distill_config("imagenette", ["t"], "o", method="fadrm+", ipc=10).lr == 0.25
    tiny50 = resolve_distill_config("tiny-imagenet", ["t"], "o", method="fadrm", ipc=50)
    assert tiny50.sizes == [64, 64] and tiny50.lr == 0.01
    assert resolve_distill_config("cifar100", ["t"], "o", method="fadrm", ipc=10, lr=0.1, alpha=None).lr == 0.1


@pytest.mark.parametrize("dataset", preset_names())
def test_student_recipe_is_the_published_one(dataset):
    recipe = EvalConfig(distilled="set", **load_preset_section(dataset, "evaluate"))
    assert (recipe.batch_size, recipe.accumulation) == (16, 2)
    assert (recipe.optimizer, recipe.lr, recipe.weight_decay, recipe.temperature) == ("adamw", 0.001, 0.01, 20.0)
    assert recipe.mix == "cutmix" and recipe.crop_scale == [0.08, 1.0]
    assert recipe.epochs == (1000 if dataset == "cifar100" else 300)
