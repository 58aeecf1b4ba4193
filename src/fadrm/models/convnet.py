"""The ConvNet of the dataset-distillation literature, with BatchNorm.

Blocks of conv 3x3 -> BatchNorm -> ReLU -> 2x2 average pool; a linear head on
the flattened features. Small and fast enough to train on a laptop CPU.
"""

from __future__ import annotations

from torch import Tensor, nn

from .registry import register_model


class ConvNet(nn.Module):
    """``depth`` conv blocks of ``width`` channels and a linear classifier."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, width: int = 128, depth: int = 3) -> None:
        super().__init__()
        if depth < 1 or width < 1:
            raise TypeError("width and depth must be positive")
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for _ in range(depth):
            layers += [
                nn.Conv2d(channels, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.AvgPool2d(2),
            ]
            channels, size = width, size // 2
        if size < 1:
            raise TypeError(f"depth {depth} pools {image_size}px images down to nothing")
        self.features = nn.Sequential(*layers)
        # Identity at the training size; lets multi-resolution synthesis feed smaller or larger inputs.
        self.pool = nn.AdaptiveAvgPool2d(size)
        self.classifier = nn.Linear(width * size * size, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


@register_model("convnet", min_size=8)
def convnet(num_classes: int, in_channels: int, image_size: int, width: int = 128, depth: int = 3) -> nn.Module:
    """ConvNet-3 of width 128 by default; ``width``/``depth`` configurable."""
    return ConvNet(num_classes, in_channels, image_size, width=width, depth=depth)


@register_model("convnet-small", min_size=8)
def convnet_small(num_classes: int, in_channels: int, image_size: int, width: int = 32, depth: int = 3) -> nn.Module:
    """A narrow ConvNet (width 32): a teacher that trains in a few CPU minutes."""
    return ConvNet(num_classes, in_channels, image_size, width=width, depth=depth)
