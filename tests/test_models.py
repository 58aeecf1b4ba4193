"""Every registered model builds for any channel/class count and trains (forward + backward);
the CIFAR-style teachers have the reference's shapes."""

from __future__ import annotations

import pytest
import torch

from fadrm.errors import FadrmError
from fadrm.models import MODELS, build_model, list_models
from fadrm.models.torchvision_models import replace_first_conv
from fadrm.synthesis.targets import matched_layers


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


def test_replace_first_conv_finds_the_first_conv_however_nested():
    model = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), torch.nn.Conv2d(4, 4, 1))
    replace_first_conv(model, 1)
    assert model[0][0].in_channels == 1 and model[1].in_channels == 4
    swin = build_model("swin_t", 10, 1, 32)
    assert swin.features[0][0].in_channels == 1  # inside the patch embedding


CIFAR_TEACHERS = ["cifar_densenet121", "cifar_shufflenet_v2_x0_5", "cifar_mobilenet_v2"]


@pytest.mark.parametrize("name", CIFAR_TEACHERS)
def test_cifar_teachers_keep_resolution_in_the_stem(name):
    model = build_model(name, 100, 3, 32).eval()
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.stride == (1, 1) and first_conv.kernel_size == (3, 3)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    layers = [layer for _, layer in matched_layers(model, convolutions=False)]
    sides: list[int] = []  # input side of each BN layer, in call order
    for layer in layers:
        layer.register_forward_hook(lambda module, inputs, output: sides.append(inputs[0].shape[-1]))
    for size in (32, 64):
        sides.clear()
        with torch.no_grad():
            assert model(torch.randn(2, 3, size, size)).shape == (2, 100)
        # Full resolution at the first BN layer, three halvings by the last, as in the reference.
        assert sides[0] == size and sides[-1] == size // 8


# The expected sizes are computed from the definitions in Jiacheng8/FADRM models/*.py
# (kuangliu pytorch-cifar style), which FADRM+ trains as its CIFAR-100 / Tiny-ImageNet teachers.
def _reference_densenet121(in_channels: int, classes: int) -> tuple[int, int]:
    """models/densenet.py: DenseNet(Bottleneck, [6, 12, 24, 16], growth_rate=32, reduction=0.5)."""
    growth, planes = 32, 64
    params, bns = in_channels * planes * 9, 0  # conv1 3x3 stride 1, no BN after it
    for stage, blocks in enumerate((6, 12, 24, 16)):
        for _ in range(blocks):  # Bottleneck: bn1, 1x1 conv to 4g, bn2, 3x3 conv to g; concatenated
            params += 2 * planes + planes * 4 * growth + 2 * 4 * growth + 4 * growth * growth * 9
            bns += 2
            planes += growth
        if stage < 3:  # Transition: bn, 1x1 conv to floor(planes / 2), 2x2 average pool
            params += 2 * planes + planes * (planes // 2)
            bns += 1
            planes //= 2
    return params + 2 * planes + planes * classes + classes, bns + 1  # final bn, linear


def _reference_shufflenet_v2_x0_5(in_channels: int, classes: int) -> tuple[int, int]:
    """models/shufflenetv2.py: ShuffleNetV2(net_size=0.5), out_channels (48, 96, 192, 1024), blocks (3, 7, 3)."""
    params, bns, planes = in_channels * 24 * 9 + 2 * 24, 1, 24  # conv1 3x3 stride 1, bn1
    for out, blocks in ((48, 3), (96, 7), (192, 3)):
        mid = out // 2
        # DownBlock: left dw 3x3 + bn, 1x1 + bn; right 1x1 + bn, dw 3x3 + bn, 1x1 + bn
        params += planes * 9 + 2 * planes + 2 * planes * mid + mid * 9 + mid * mid + 4 * 2 * mid
        # BasicBlock on half the channels: 1x1 + bn, dw 3x3 + bn, 1x1 + bn
        params += blocks * (2 * mid * mid + mid * 9 + 3 * 2 * mid)
        bns += 5 + 3 * blocks
        planes = out
    return params + planes * 1024 + 2 * 1024 + 1024 * classes + classes, bns + 1  # conv2 + bn2, linear


def _reference_mobilenet_v2(in_channels: int, classes: int) -> tuple[int, int]:
    """models/mobilenetv2.py: MobileNetV2.cfg (expansion, out, blocks, stride), stride-1 conv1."""
    cfg = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    params, bns, planes = in_channels * 32 * 9 + 2 * 32, 1, 32  # conv1 3x3 stride 1, bn1
    for expansion, out, blocks, stride in cfg:
        for index in range(blocks):
            hidden = expansion * planes  # Block: 1x1 + bn, dw 3x3 + bn, 1x1 + bn
            params += planes * hidden + 2 * hidden + hidden * 9 + 2 * hidden + hidden * out + 2 * out
            bns += 3
            if (stride if index == 0 else 1) == 1 and planes != out:  # shortcut: 1x1 conv + bn
                params += planes * out + 2 * out
                bns += 1
            planes = out
    return params + 320 * 1280 + 2 * 1280 + 1280 * classes + classes, bns + 1  # conv2 + bn2, linear


@pytest.mark.parametrize(
    "name, reference",
    [
        ("cifar_densenet121", _reference_densenet121),
        ("cifar_shufflenet_v2_x0_5", _reference_shufflenet_v2_x0_5),
        ("cifar_mobilenet_v2", _reference_mobilenet_v2),
    ],
)
def test_cifar_teachers_match_the_reference_sizes(name, reference):
    model = build_model(name, 100, 3, 32)
    params, bns = reference(3, 100)
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(matched_layers(model, convolutions=False)) == bns
