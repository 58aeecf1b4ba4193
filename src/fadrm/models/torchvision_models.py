"""torchvision's ImageNet architectures, adapted to any class and channel count."""

from __future__ import annotations

import torchvision
from torch import nn

from .registry import register_model

# name -> smallest input side the architecture survives, never below the registry's floor
# of 8 (ResNets run down to 1 px, swin_t down to its 4 px patch).
TORCHVISION_MODELS = {
    "resnet18": 8,
    "resnet50": 8,
    "resnet101": 8,
    "wide_resnet50_2": 8,
    "densenet121": 29,
    "densenet169": 29,
    "densenet201": 29,
    "mobilenet_v2": 8,
    "shufflenet_v2_x0_5": 8,
    "shufflenet_v2_x1_0": 8,
    "efficientnet_b0": 8,
    "swin_t": 8,
    "alexnet": 63,
}


def replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """Swap the model's first Conv2d for one taking ``in_channels`` channels (same geometry).

    "First" is in module order, however deeply nested (swin_t's is ``features[0][0]``).
    """
    for name, conv in model.named_modules():
        if isinstance(conv, nn.Conv2d):
            if conv.in_channels != in_channels:
                parent_name, _, child_name = name.rpartition(".")
                setattr(
                    model.get_submodule(parent_name),
                    child_name,
                    nn.Conv2d(
                        in_channels,
                        conv.out_channels,
                        conv.kernel_size,
                        conv.stride,
                        conv.padding,
                        conv.dilation,
                        conv.groups,
                        conv.bias is not None,
                    ),
                )
            return


for _name, _min_size in TORCHVISION_MODELS.items():

    def _factory(num_classes: int, in_channels: int, image_size: int, _n=_name) -> nn.Module:
        model = torchvision.models.get_model(_n, weights=None, num_classes=num_classes)
        replace_first_conv(model, in_channels)
        return model

    _factory.__doc__ = f"torchvision {_name}."
    register_model(_name, min_size=_min_size)(_factory)
