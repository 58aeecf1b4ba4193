"""Every registered model builds for any channel/class count and trains (forward + backward)."""

from __future__ import annotations

import pytest
import torch

from fadrm.errors import FadrmError
from fadrm.models import MODELS, build_model, list_models


@pytest.mark.parametrize("name", list_models())
def test_forward_backward(name):
    size = max(32, MODELS.get(name).min_size)
    model = build_model(name, num_classes=7, in_channels=1, image_size=size)
    x = torch.randn(2, 1, size, size, requires_grad=True)
    logits = model(x)
    assert logits.shape == (2, 7)
    logits.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_unknown_model_lists_valid_names():
    with pytest.raises(FadrmError, match="choose one of: .*cifar_resnet18"):
        build_model("resnet1800", 10)


def test_too_small_input_is_a_clear_error():
    with pytest.raises(FadrmError, match="at least 63 px"):
        build_model("alexnet", 10, 3, 32)


def test_convnet_options_and_bad_options():
    model = build_model("convnet", 10, 3, 32, width=16, depth=2)
    assert model.classifier.in_features == 16 * 8 * 8
    with pytest.raises(FadrmError, match="bad options"):
        build_model("convnet", 10, 3, 32, widht=16)


def test_cifar_resnet_keeps_resolution():
    model = build_model("cifar_resnet18", 100, 3, 32)
    assert model.conv1.stride == (1, 1) and isinstance(model.maxpool, torch.nn.Identity)


def test_timm_without_timm_is_a_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "timm" else real(name, *a))
    with pytest.raises(FadrmError, match="needs timm"):
        build_model("timm:resnet18", 10)
