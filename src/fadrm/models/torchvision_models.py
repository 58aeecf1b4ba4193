"""torchvision's ImageNet architectures, adapted to any class and channel count."""

from __future__ import annotations

import torchvision
from torch import nn

from .registry import register_model

# name -> smallest input side the architecture survives
TORCHVISION_MODELS = {
    "resnet18": 8,
    "resnet50": 8,
    "resnet101": 8,
    "densenet121": 29,
    "mobilenet_v2": 8,
    "shufflenet_v2_x0_5": 8,
    "shufflenet_v2_x1_0": 8,
    "efficientnet_b0": 8,
    "alexnet": 63,
}


def replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """Swap the model's first Conv2d for one taking ``in_channels`` channels (same geometry)."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels != in_channels:
                    setattr(parent, child_name, nn.Conv2d(
                        in_channels, child.out_channels, child.kernel_size, child.stride,
                        child.padding, child.dilation, child.groups, child.bias is not None,
                    ))  # fmt: skip
                return


for _name, _min_size in TORCHVISION_MODELS.items():

    def _factory(num_classes: int, in_channels: int, image_size: int, _n=_name) -> nn.Module:
        model = torchvision.models.get_model(_n, weights=None, num_classes=num_classes)
        replace_first_conv(model, in_channels)
        return model

    _factory.__doc__ = f"torchvision {_name}."
    register_model(_name, min_size=_min_size)(_factory)
