"""Detection models: torchvision architectures by name, sized for your classes, with weights from anywhere."""

from detforge.models.build import MODELS, ModelSpec, build_model, get_spec, is_torchvision_weight_name
from detforge.models.weights import (
    WeightsReport,
    load_backbone_weights,
    load_weights,
    resolve_weights,
    torchvision_weight_url,
)

__all__ = [
    "MODELS",
    "ModelSpec",
    "WeightsReport",
    "build_model",
    "get_spec",
    "is_torchvision_weight_name",
    "load_backbone_weights",
    "load_weights",
    "resolve_weights",
    "torchvision_weight_url",
]
