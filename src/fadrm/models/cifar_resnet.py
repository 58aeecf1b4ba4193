"""ResNets for small images: 3x3 stride-1 stem and no max-pool (the CIFAR variant)."""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet

from .registry import register_model


def _cifar_resnet(builder, num_classes: int, in_channels: int) -> nn.Module:
    model = builder(weights=None, num_classes=num_classes)
    # Full resolution through the first stage: small inputs would otherwise be
    # down-sampled 4x before any residual block sees them.
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


for _depth, _builder in ((18, resnet.resnet18), (50, resnet.resnet50), (101, resnet.resnet101)):

    def _factory(num_classes: int, in_channels: int, image_size: int, _b=_builder) -> nn.Module:
        return _cifar_resnet(_b, num_classes, in_channels)

    _factory.__doc__ = f"CIFAR-style ResNet-{_depth}."
    register_model(f"cifar_resnet{_depth}")(_factory)
