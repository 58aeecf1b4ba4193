"""The model registry and the one function that builds any model."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from ..errors import FadrmError
from ..registry import Registry

ModelFactory = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    """A registered architecture.

    Attributes:
        factory: ``(num_classes, in_channels, image_size, **kwargs) -> nn.Module``.
        min_size: smallest input side the architecture accepts.
    """

    factory: ModelFactory
    min_size: int = 8


MODELS: Registry[ModelEntry] = Registry("model")
TIMM_PREFIX = "timm:"


def register_model(name: str, min_size: int = 8) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator registering a model factory under ``name``."""

    def decorate(factory: ModelFactory) -> ModelFactory:
        MODELS.add(name, ModelEntry(factory, min_size))
        return factory

    return decorate


def list_models() -> list[str]:
    """Registered names; timm models are available as ``timm:<name>`` when timm is installed."""
    return MODELS.names()


def build_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 224, **kwargs: Any) -> nn.Module:
    """Build an untrained model adapted to the class count, channels and image size.

    Args:
        name: a registered name (see :func:`list_models`) or ``timm:<name>``.
        num_classes: output logits.
        in_channels: input channels (1 for grey images).
        image_size: input side, checked against the architecture's minimum.
        **kwargs: architecture options (e.g. ``width``/``depth`` for ``convnet``).
    """
    if name.startswith(TIMM_PREFIX):
        if importlib.util.find_spec("timm") is None:
            raise FadrmError(f"model {name!r} needs timm: pip install 'fadrm[timm]'")
        import timm

        timm_name = name[len(TIMM_PREFIX) :]
        if timm_name not in timm.list_models():
            raise FadrmError(f"timm has no model {timm_name!r}")
        return timm.create_model(timm_name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)
    entry = MODELS.get(name)
    if image_size < entry.min_size:
        raise FadrmError(f"model {name!r} needs images of at least {entry.min_size} px, got {image_size}")
    try:
        return entry.factory(num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)
    except TypeError as exc:
        raise FadrmError(f"bad options for model {name!r}: {exc}") from None
