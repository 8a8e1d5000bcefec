"""Weights from other DenseNet implementations, mapped onto dnl_zoo's DenseNet.

Two sources are understood:

- Keras applications (Keras 3, any backend): `keras.applications.DenseNet121`,
  `DenseNet169` and `DenseNet201`, read layer by layer through `get_weights()`.
- torchvision state dicts (`torchvision.models.densenet121(...).state_dict()`,
  also -161, -169, -201), including the old key spelling `norm.1` of early
  checkpoints. Values may be torch tensors or numpy arrays; torch itself is not
  imported here.

Both build the matching `DenseNet` when no model is given, reading the block
layout, growth rate, stem width, input channels, classes and the norm epsilon
off the source, so `from_keras(keras.applications.DenseNet121())` is all a user
with internet needs to bring the published ImageNet weights into dnl_zoo.
Every tensor of the source must land somewhere and every parameter of the model
must be filled; anything else is an error that names the tensor.
"""

import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dnl_zoo.models.densenet import DenseLayer, DenseNet
from dnl_zoo.models.layers import BatchNorm

# One module of ours and the names the two sources give it.
Slot = tuple[nnx.Module, str, str]  # (module, torchvision prefix, Keras layer)


class ConversionError(ValueError):
    """Raised when a source's tensors do not fit the model they are mapped onto."""


def _slots(model: DenseNet) -> Iterator[Slot]:
    """Walks `model` in source order, naming each module as both sources do."""
    if model.stem.kind != "imagenet":
        raise ConversionError(
            "Keras and torchvision DenseNets have the ImageNet stem (7x7/2 "
            f"convolution, BN, max pool); this model has the {model.stem.kind!r} "
            "stem. Build it with stem='imagenet'."
        )
    if any(block.implementation == "scan" for block in model.blocks):
        raise ConversionError(
            "this model's blocks store stacked weights (implementation='scan'); "
            "convert into a model of another implementation, then copy with "
            "layers.load_weights(scanned, layers.weight_values(converted))"
        )
    yield model.stem.conv, "features.conv0", "conv1_conv"
    yield model.stem.norm, "features.norm0", "conv1_bn"
    for b, block in enumerate(model.blocks):
        for i, layer in enumerate(block.layers):
            _check_bottleneck(layer, b, i)
            torch_name = f"features.denseblock{b + 1}.denselayer{i + 1}"
            keras_name = f"conv{b + 2}_block{i + 1}"
            yield layer.norm1, f"{torch_name}.norm1", f"{keras_name}_0_bn"
            yield layer.conv1, f"{torch_name}.conv1", f"{keras_name}_1_conv"
            yield layer.norm2, f"{torch_name}.norm2", f"{keras_name}_1_bn"
            yield layer.conv2, f"{torch_name}.conv2", f"{keras_name}_2_conv"
        if b < len(model.transitions):
            transition = model.transitions[b]
            torch_name = f"features.transition{b + 1}"
            yield transition.norm, f"{torch_name}.norm", f"pool{b + 2}_bn"
            yield transition.conv, f"{torch_name}.conv", f"pool{b + 2}_conv"
    yield model.norm_final, f"features.norm{len(model.blocks) + 1}", "bn"
    yield model.classifier, "classifier", "predictions"


def _check_bottleneck(layer: DenseLayer, block: int, index: int) -> None:
    if not layer.bottleneck:
        raise ConversionError(
            f"blocks.{block}.layers.{index} has no bottleneck; Keras and "
            "torchvision DenseNets are DenseNet-BC (bottleneck=True)"
        )


def _assign(variable: nnx.Variable, value: np.ndarray, name: str) -> None:
    expected = tuple(variable[...].shape)
    if tuple(value.shape) != expected:
        raise ConversionError(
            f"{name}: expected shape {expected} for this model, got "
            f"{tuple(value.shape)}; the source is a different DenseNet (build the "
            "model from the source by passing model=None)"
        )
    variable.set_value(jnp.asarray(value, dtype=variable[...].dtype))


def _fill(module: nnx.Module, weights: Mapping[str, np.ndarray], name: str) -> None:
    """Copies NHWC-layout `weights` (scale/bias/mean/var or kernel/bias) in."""
    for field, value in weights.items():
        _assign(getattr(module, field), value, f"{name}.{field}")


def _refuse_unused(unused: set[str], what: str) -> None:
    """Every piece of the source must land in the model: a larger source fails."""
    if unused:
        raise ConversionError(
            f"{len(unused)} {what} have no place in this model, e.g. "
            f"{sorted(unused)[:3]}; the source is a larger DenseNet"
        )


def _load(model: DenseNet, read: Callable[[nnx.Module, str, str], dict]) -> None:
    for module, torch_name, keras_name in _slots(model):
        weights = read(module, torch_name, keras_name)
        _fill(module, weights, f"{torch_name} / {keras_name}")


# ---------------------------------------------------------------------------
# Keras applications.
# ---------------------------------------------------------------------------


def _keras_layers(keras_model) -> dict[str, Any]:
    return {layer.name: layer for layer in keras_model.layers}


def _keras_weights(layers: dict[str, Any], module, keras_name: str) -> dict:
    if keras_name not in layers:
        raise ConversionError(
            f"the Keras model has no layer {keras_name!r}, which this model needs; "
            "expected a keras.applications DenseNet (with include_top=True for "
            "the classifier)"
        )
    values = [np.asarray(w) for w in layers[keras_name].get_weights()]
    if isinstance(module, BatchNorm):
        return dict(zip(("scale", "bias", "mean", "var"), values, strict=True))
    kernel = values[0]
    if isinstance(module, nnx.Linear) and kernel.ndim == 4:
        kernel = kernel[0, 0]  # our 1x1 convolutions are (in, out) matrices
    return {"kernel": kernel, **({"bias": values[1]} if len(values) > 1 else {})}


def keras_architecture(keras_model) -> dict[str, Any]:
    """DenseNet constructor arguments that reproduce a Keras applications model."""
    layers = _keras_layers(keras_model)
    block_config = []
    for stage in range(2, 6):
        pattern = re.compile(rf"conv{stage}_block(\d+)_0_bn$")
        count = sum(1 for name in layers if pattern.match(name))
        if count:
            block_config.append(count)
    if "conv1_conv" not in layers or not block_config:
        raise ConversionError(
            "expected a keras.applications DenseNet (layers conv1_conv, "
            f"conv2_block1_0_bn, ...), got a model with layers {list(layers)[:5]}..."
        )
    stem = layers["conv1_conv"].get_weights()[0]
    growth = layers["conv2_block1_2_conv"].get_weights()[0]
    classes = layers["predictions"].get_weights()[1] if "predictions" in layers else []
    return dict(
        block_config=tuple(block_config),
        growth_rate=int(growth.shape[-1]),
        num_init_features=int(stem.shape[-1]),
        in_channels=int(stem.shape[2]),
        num_classes=int(len(classes)) or 1000,
        norm_epsilon=float(layers["conv1_bn"].epsilon),
        stem="imagenet",
        bottleneck=True,
        compression=0.5,
    )


def from_keras(keras_model, model: DenseNet | None = None) -> DenseNet:
    """Copies a Keras applications DenseNet's weights into a dnl_zoo DenseNet.

    Args:
      keras_model: e.g. `keras.applications.DenseNet121(weights="imagenet")`,
        built with `classifier_activation=None` if you want logits to match.
        With `include_top=False` the classifier keeps its fresh initial values.
      model: the DenseNet to fill in place; built from the Keras model if None.

    Returns:
      The filled model, in eval mode.
    """
    if model is None:
        model = DenseNet(**keras_architecture(keras_model), rngs=nnx.Rngs(0))
    layers = _keras_layers(keras_model)
    has_top = "predictions" in layers
    used: set[str] = set()

    def read(module, torch_name, keras_name):
        if module is model.classifier and not has_top:
            return {}
        used.add(keras_name)
        return _keras_weights(layers, module, keras_name)

    _load(model, read)
    with_weights = {name for name, layer in layers.items() if layer.weights}
    _refuse_unused(with_weights - used, "Keras layers with weights")
    model.eval()
    return model


# ---------------------------------------------------------------------------
# torchvision state dicts.
# ---------------------------------------------------------------------------

_OLD_KEY = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.)")
_BATCH_COUNTERS = ".num_batches_tracked"


def _numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def normalise_torch_keys(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """numpy copies of a torchvision DenseNet state dict, with current key names.

    Early torchvision checkpoints spell `denselayer1.norm1` as `denselayer1.norm.1`;
    both are read. A `module.` prefix (from DataParallel) is dropped.
    """
    out = {}
    for key, value in state_dict.items():
        if key.endswith(_BATCH_COUNTERS):
            continue
        key = key.removeprefix("module.")
        key = _OLD_KEY.sub(lambda m: m.group(1) + m.group(2)[:-1] + ".", key)
        out[key] = _numpy(value)
    return out


def torch_architecture(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """DenseNet constructor arguments that reproduce a torchvision state dict."""
    return _torch_architecture(normalise_torch_keys(state_dict))


def _torch_architecture(tensors: dict[str, np.ndarray]) -> dict[str, Any]:
    layer_key = re.compile(r"features\.denseblock(\d+)\.denselayer(\d+)\.norm1\.weight")
    counts: dict[int, int] = {}
    for key in tensors:
        match = layer_key.fullmatch(key)
        if match:
            block, layer = int(match.group(1)), int(match.group(2))
            counts[block] = max(counts.get(block, 0), layer)
    if "features.conv0.weight" not in tensors or not counts:
        raise ConversionError(
            "expected a torchvision DenseNet state dict (keys features.conv0.weight, "
            f"features.denseblock1.denselayer1..., got keys {list(tensors)[:5]}..."
        )
    stem = tensors["features.conv0.weight"]  # (out, in, 7, 7)
    growth = tensors["features.denseblock1.denselayer1.conv2.weight"]
    return dict(
        block_config=tuple(counts[b] for b in sorted(counts)),
        growth_rate=int(growth.shape[0]),
        num_init_features=int(stem.shape[0]),
        in_channels=int(stem.shape[1]),
        num_classes=int(tensors["classifier.bias"].shape[0]),
        stem="imagenet",
        bottleneck=True,
        compression=0.5,
    )


def _torch_weights(tensors: dict, used: set, module, prefix: str) -> dict:
    def take(field: str) -> np.ndarray:
        key = f"{prefix}.{field}"
        if key not in tensors:
            raise ConversionError(
                f"the state dict has no {key!r}, which this model needs; expected a "
                "torchvision DenseNet state dict of the same architecture"
            )
        used.add(key)
        return tensors[key]

    if isinstance(module, BatchNorm):
        fields = ("weight", "bias", "running_mean", "running_var")
        return dict(
            zip(("scale", "bias", "mean", "var"), map(take, fields), strict=True)
        )
    weight = take("weight")
    if weight.ndim == 4:  # (out, in, h, w) -> (h, w, in, out)
        weight = weight.transpose(2, 3, 1, 0)
        if isinstance(module, nnx.Linear):
            weight = weight[0, 0]
    else:  # a linear layer: (out, in) -> (in, out)
        weight = weight.T
    if getattr(module, "bias", None) is not None:
        return {"kernel": weight, "bias": take("bias")}
    return {"kernel": weight}


def from_torch(
    state_dict: Mapping[str, Any], model: DenseNet | None = None
) -> DenseNet:
    """Copies a torchvision DenseNet state dict into a dnl_zoo DenseNet.

    Args:
      state_dict: e.g. `torchvision.models.densenet121(weights="DEFAULT")
        .state_dict()`; torch tensors or numpy arrays.
      model: the DenseNet to fill in place; built from the state dict if None.

    Returns:
      The filled model, in eval mode.
    """
    tensors = normalise_torch_keys(state_dict)  # once: it copies every tensor
    if model is None:
        model = DenseNet(**_torch_architecture(tensors), rngs=nnx.Rngs(0))
    used: set[str] = set()
    _load(model, lambda module, name, _: _torch_weights(tensors, used, module, name))
    _refuse_unused(set(tensors) - used, "tensors of the state dict")
    model.eval()
    return model
