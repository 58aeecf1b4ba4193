"""RandAugment as torchvision defines it, every draw from the batch's own generator (EDC's students).

14 operations, 2 per image at magnitude 9 of 31 bins. Per operation: its magnitude at that bin
for an image of side ``size`` (0 for those without one), whether its sign is drawn, and how it
changes a uint8 image (:data:`AUGMENT_OPS`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torchvision.transforms import v2

from .registry import Registry

# RandAugment as torchvision defines it (14 operations, 2 per image at magnitude 9 of 31 bins), each
# draw from the batch's own generator. Per operation: its magnitude at that bin for an image of side
# ``size`` (0 for those without one), whether its sign is drawn, and how it changes a uint8 image.
RAND_AUGMENT_OPS = 2
RAND_AUGMENT_MAGNITUDE = 9 / 30  # bin 9 of 0..30, as a fraction of each operation's range


@dataclass(frozen=True)
class AugmentOp:
    """One RandAugment operation: ``magnitude(size)`` at the fixed bin, signed or not, and ``apply``."""

    magnitude: Callable[[int], float]
    signed: bool
    apply: Callable[[torch.Tensor, float], torch.Tensor]


def _affine(
    image: torch.Tensor,
    translate: tuple[float, float] = (0, 0),
    shear: tuple[float, float] = (0.0, 0.0),
    centre: list[int] | None = None,
) -> torch.Tensor:
    return v2.functional.affine(
        image,
        angle=0.0,
        translate=[int(translate[0]), int(translate[1])],
        scale=1.0,
        shear=list(shear),
        interpolation=v2.InterpolationMode.NEAREST,
        center=centre,
    )


def _shear_degrees(magnitude: float) -> float:
    return math.degrees(math.atan(magnitude))


AUGMENT_OPS: Registry[AugmentOp] = Registry("augmentation")
AUGMENT_OPS.add("identity", AugmentOp(lambda size: 0.0, False, lambda image, m: image))
AUGMENT_OPS.add(
    "shear-x",
    AugmentOp(
        lambda size: 0.3 * RAND_AUGMENT_MAGNITUDE,
        True,
        lambda image, m: _affine(image, shear=(_shear_degrees(m), 0.0), centre=[0, 0]),
    ),
)
AUGMENT_OPS.add(
    "shear-y",
    AugmentOp(
        lambda size: 0.3 * RAND_AUGMENT_MAGNITUDE,
        True,
        lambda image, m: _affine(image, shear=(0.0, _shear_degrees(m)), centre=[0, 0]),
    ),
)
AUGMENT_OPS.add(
    "translate-x",
    AugmentOp(
        lambda size: 150 / 331 * size * RAND_AUGMENT_MAGNITUDE, True, lambda image, m: _affine(image, translate=(m, 0))
    ),
)
AUGMENT_OPS.add(
    "translate-y",
    AugmentOp(
        lambda size: 150 / 331 * size * RAND_AUGMENT_MAGNITUDE, True, lambda image, m: _affine(image, translate=(0, m))
    ),
)
AUGMENT_OPS.add(
    "rotate",
    AugmentOp(
        lambda size: 30.0 * RAND_AUGMENT_MAGNITUDE,
        True,
        lambda image, m: v2.functional.rotate(image, m, v2.InterpolationMode.NEAREST),
    ),
)
AUGMENT_OPS.add(
    "brightness",
    AugmentOp(
        lambda size: 0.9 * RAND_AUGMENT_MAGNITUDE, True, lambda image, m: v2.functional.adjust_brightness(image, 1 + m)
    ),
)
AUGMENT_OPS.add(
    "color",
    AugmentOp(
        lambda size: 0.9 * RAND_AUGMENT_MAGNITUDE, True, lambda image, m: v2.functional.adjust_saturation(image, 1 + m)
    ),
)
AUGMENT_OPS.add(
    "contrast",
    AugmentOp(
        lambda size: 0.9 * RAND_AUGMENT_MAGNITUDE, True, lambda image, m: v2.functional.adjust_contrast(image, 1 + m)
    ),
)
AUGMENT_OPS.add(
    "sharpness",
    AugmentOp(
        lambda size: 0.9 * RAND_AUGMENT_MAGNITUDE, True, lambda image, m: v2.functional.adjust_sharpness(image, 1 + m)
    ),
)
# torchvision's bins: 8 - round(bin / 7.5) bits, 7 at bin 9.
AUGMENT_OPS.add(
    "posterize",
    AugmentOp(
        lambda size: 8 - round(RAND_AUGMENT_MAGNITUDE * 30 / 7.5),
        False,
        lambda image, m: v2.functional.posterize(image, int(m)),
    ),
)
AUGMENT_OPS.add(
    "solarize",
    AugmentOp(
        lambda size: 255.0 * (1 - RAND_AUGMENT_MAGNITUDE), False, lambda image, m: v2.functional.solarize(image, m)
    ),
)
AUGMENT_OPS.add("autocontrast", AugmentOp(lambda size: 0.0, False, lambda image, m: v2.functional.autocontrast(image)))
AUGMENT_OPS.add("equalize", AugmentOp(lambda size: 0.0, False, lambda image, m: v2.functional.equalize(image)))


def draw_rand_augment(gen: torch.Generator, size: int) -> tuple[tuple[str, float], ...]:
    """One image's RandAugment: two operations drawn uniformly with replacement, each with its
    magnitude and, for signed ones, a random sign (torchvision's draws, from ``gen``)."""
    names = AUGMENT_OPS.names()
    ops = []
    for _ in range(RAND_AUGMENT_OPS):
        name = names[int(torch.randint(len(names), (), generator=gen))]
        op = AUGMENT_OPS.get(name)
        magnitude = op.magnitude(size)
        if op.signed and int(torch.randint(2, (), generator=gen)):
            magnitude = -magnitude
        ops.append((name, magnitude))
    return tuple(ops)


def apply_rand_augment(image: torch.Tensor, ops: Sequence[tuple[str, float]]) -> torch.Tensor:
    """A uint8 image (C, H, W) with its drawn operations applied in order."""
    for name, magnitude in ops:
        image = AUGMENT_OPS.get(name).apply(image, magnitude)
    return image
