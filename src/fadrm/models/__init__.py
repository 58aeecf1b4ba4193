"""Model registry: CIFAR-style ResNets and teachers, a BatchNorm ConvNet, torchvision and timm models."""

from .registry import MODELS, ModelEntry, build_model, list_models

# Importing the families registers them.
from . import convnet, cifar_models, cifar_resnet, torchvision_models  # noqa: F401,E402

__all__ = ["MODELS", "ModelEntry", "build_model", "list_models"]
