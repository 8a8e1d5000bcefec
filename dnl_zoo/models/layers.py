"""Small parts shared by the DenseNet and dense non-local (DNL) models.

Every layer of a densely connected network applies a norm, an activation and a
linear transform to (part of) its history. This module holds those pieces and the
input checks that give users readable errors.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
    "identity": lambda x: x,
}

# He initialisation, as in the original DenseNet code: the convolutions feed ReLUs.
conv_init = nnx.initializers.kaiming_normal()


def get_activation(name: str) -> Callable[[Array], Array]:
    """Returns the activation called `name`, or says which names exist."""
    if name not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}"
        )
    return ACTIVATIONS[name]


def batch_norm(
    num_features: int,
    *,
    epsilon: float,
    momentum: float,
    dtype,
    rngs: nnx.Rngs,
) -> nnx.BatchNorm:
    """A per-channel BatchNorm over the last (channel) axis of NHWC input."""
    return nnx.BatchNorm(
        num_features,
        epsilon=epsilon,
        momentum=momentum,
        dtype=dtype,
        rngs=rngs,
    )


def pointwise(
    in_features: int,
    out_features: int,
    *,
    dtype,
    rngs: nnx.Rngs,
    use_bias: bool = False,
) -> nnx.Linear:
    """A 1x1 convolution written as a matrix product over the channel axis.

    XLA on CPU runs a 1x1 convolution about 3x faster as `dot_general` than as
    `conv_general_dilated`, so 1x1 kernels are stored as (in, out) matrices.
    """
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        kernel_init=conv_init,
        dtype=dtype,
        rngs=rngs,
    )


def conv3x3(
    in_features: int,
    out_features: int,
    *,
    dtype,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """A bias-free 3x3 convolution with stride 1 and zero padding of 1."""
    return nnx.Conv(
        in_features,
        out_features,
        kernel_size=(3, 3),
        padding=((1, 1), (1, 1)),
        use_bias=False,
        kernel_init=conv_init,
        dtype=dtype,
        rngs=rngs,
    )


def check_images(x, *, in_channels: int, min_size: int, model: str) -> None:
    """Raises a readable error unless `x` is a float batch the model accepts.

    Args:
      x: expected (batch, height, width, in_channels), floating point.
      in_channels: channels the model was built for.
      min_size: smallest height and width that survive the model's downsampling.
      model: the model's name, for the message.
    """
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is None or dtype is None:
        raise TypeError(
            f"{model} expects an array of shape (batch, height, width, "
            f"{in_channels}), got an object of type {type(x).__name__}"
        )
    if len(shape) != 4:
        hint = "; add a batch axis with x[None]" if len(shape) == 3 else ""
        raise ValueError(
            f"{model} expects images of shape (batch, height, width, "
            f"{in_channels}) (NHWC), got shape {tuple(shape)}{hint}"
        )
    if shape[-1] != in_channels:
        hint = ""
        if shape[1] == in_channels:
            hint = "; the input looks channels-first (NCHW), transpose to NHWC"
        raise ValueError(
            f"{model} expects {in_channels} input channels in the last axis "
            f"(NHWC), got shape {tuple(shape)}{hint}"
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{model} expects floating-point images, got dtype {dtype}; convert "
            "with x.astype(jnp.float32) / 255.0 and normalise per channel"
        )
    if shape[1] < min_size or shape[2] < min_size:
        raise ValueError(
            f"{model} needs height and width of at least {min_size} to survive "
            f"its downsampling, got {shape[1]}x{shape[2]}"
        )
