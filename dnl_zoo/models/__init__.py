"""Models: the DenseNet family and the registry that names every preset."""

from dnl_zoo.models.densenet import DenseBlock, DenseLayer, DenseNet, Transition
from dnl_zoo.models.registry import (
    ModelSpec,
    Reference,
    create_model,
    get_spec,
    list_models,
    model_info,
    register,
)

__all__ = [
    "DenseBlock",
    "DenseLayer",
    "DenseNet",
    "ModelSpec",
    "Reference",
    "Transition",
    "create_model",
    "get_spec",
    "list_models",
    "model_info",
    "register",
]
