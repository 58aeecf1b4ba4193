"""Small-image teachers of the FADRM+ reference on CIFAR-100 and Tiny-ImageNet.

The reference (github.com/Jiacheng8/FADRM, ``models/densenet.py``,
``models/shufflenetv2.py``, ``models/mobilenetv2.py``) trains the
pytorch-cifar versions of these networks. What differs from the ImageNet
variants, and why: a 32 or 64 px image would be down-sampled 4x by an ImageNet
stem (strided conv + max-pool) before the first block, so every variant here
starts with a 3x3 stride-1 conv and no max-pool, and so down-samples only 3
times in total. The layer shapes, and hence the BatchNorm layers whose
statistics synthesis matches, are the reference's:

* ``cifar_densenet121``: torchvision's DenseNet-121 (growth 32, blocks
  6/12/24/16, bottleneck 4x, transitions halve the width) with the stem
  reduced to the bare 3x3 conv of 64 channels; the reference has no
  BatchNorm, ReLU or pool after it. (torchvision concatenates the new
  features after the old ones and the reference before them: a channel
  permutation, identical shapes.)
* ``cifar_shufflenet_v2_x0_5``: torchvision's ShuffleNetV2 0.5x (widths
  24/48/96/192/1024, 4/8/4 blocks) with a stride-1 first conv, no max-pool.
* ``cifar_mobilenet_v2``: written here, as torchvision's structure differs from
  the reference beyond the strides: the reference block always has the 1x1
  expansion conv (also at expansion 1), adds the input back at every stride-1
  block through a 1x1 conv + BatchNorm projection where the width changes, uses
  ReLU rather than ReLU6 and has no dropout. Its first conv and its second
  stage have stride 1 instead of 2.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models import densenet, shufflenetv2

from .registry import register_model


@register_model("cifar_densenet121")
def cifar_densenet121(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """CIFAR-style DenseNet-121: 3x3 stride-1 stem conv only, then the four dense blocks."""
    model = densenet.densenet121(weights=None, num_classes=num_classes)
    features = model.features
    features.conv0 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    for name in ("norm0", "relu0", "pool0"):
        setattr(features, name, nn.Identity())
    return model


@register_model("cifar_shufflenet_v2_x0_5")
def cifar_shufflenet_v2_x0_5(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """CIFAR-style ShuffleNetV2 0.5x: 24-channel 3x3 stride-1 first conv, no max-pool."""
    model = shufflenetv2.shufflenet_v2_x0_5(weights=None, num_classes=num_classes)
    model.conv1[0] = nn.Conv2d(in_channels, 24, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _conv_bn(in_planes: int, out_planes: int, kernel_size: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    conv = nn.Conv2d(in_planes, out_planes, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(out_planes)]


class CifarInvertedResidual(nn.Module):
    """1x1 expansion -> 3x3 depthwise (carries the stride) -> 1x1 projection, each with BatchNorm."""

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int) -> None:
        super().__init__()
        hidden = expansion * in_planes
        self.body = nn.Sequential(
            *_conv_bn(in_planes, hidden, 1),
            nn.ReLU(inplace=True),
            *_conv_bn(hidden, hidden, 3, stride, groups=hidden),
            nn.ReLU(inplace=True),
            *_conv_bn(hidden, out_planes, 1),
        )
        # As in the reference, every stride-1 block is residual; a width change gets a projection.
        self.shortcut: nn.Module | None = None
        if stride == 1 and in_planes == out_planes:
            self.shortcut = nn.Identity()
        elif stride == 1:
            self.shortcut = nn.Sequential(*_conv_bn(in_planes, out_planes, 1))

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)
        return out if self.shortcut is None else out + self.shortcut(x)


class CifarMobileNetV2(nn.Module):
    """MobileNetV2 with the reference's small-image strides and blocks (see the module docstring)."""

    # (expansion, output channels, blocks, stride of the first block) per stage; the
    # ImageNet network has stride 2 in the second stage.
    STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [*_conv_bn(in_channels, 32, 3), nn.ReLU(inplace=True)]
        planes = 32
        for expansion, out_planes, blocks, stride in self.STAGES:
            for index in range(blocks):
                layers.append(CifarInvertedResidual(planes, out_planes, expansion, stride if index == 0 else 1))
                planes = out_planes
        layers += [*_conv_bn(planes, 1280, 1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@register_model("cifar_mobilenet_v2")
def cifar_mobilenet_v2(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """CIFAR-style MobileNetV2: stride-1 first conv and second stage."""
    return CifarMobileNetV2(num_classes, in_channels)
