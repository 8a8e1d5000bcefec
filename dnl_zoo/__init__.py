"""dnl_zoo: DenseNet and dense non-local (DNL) networks in Flax NNX."""

from dnl_zoo import convert
from dnl_zoo.models import (
    DenseNet,
    create_model,
    get_spec,
    list_models,
    model_info,
)
from dnl_zoo.pretrained import PretrainedUnavailableError

__version__ = "0.1.0"

__all__ = [
    "DenseNet",
    "PretrainedUnavailableError",
    "convert",
    "create_model",
    "get_spec",
    "list_models",
    "model_info",
]
