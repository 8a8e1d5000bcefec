"""Parameter and compute counts of a model, without running it.

Multiply-accumulates (MACs) are read off the traced program (jaxpr) of one eval
forward pass: every convolution and matrix product contributes
(output elements) x (contraction size). Norms, activations and pooling are left
out, as in the tables of the DenseNet paper and of torchvision, so a DenseNet-121
at 224x224 costs about 2.9 GMACs. FLOPs here are 2 x MACs.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.extend import core as jax_core


def count_params(model: nnx.Module) -> int:
    """Trainable parameters (nnx.Param), excluding BatchNorm running statistics."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def count_macs(model: nnx.Module, input_shape: tuple[int, ...]) -> int:
    """MACs of one eval forward pass on a single image.

    Args:
      model: a module (concrete or abstract, from nnx.eval_shape).
      input_shape: (height, width, channels) of one image.
    """
    graphdef, state = nnx.split(model)

    def forward(state, x):
        module = nnx.merge(graphdef, state)
        module.eval()
        return module(x)

    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    jaxpr = jax.make_jaxpr(forward)(state, x)
    return _jaxpr_macs(jaxpr.jaxpr)


def _jaxpr_macs(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            total += _conv_macs(eqn)
        elif name == "dot_general":
            total += _dot_macs(eqn)
        repeats = eqn.params.get("length", 1) if name == "scan" else 1
        for sub in jax_core.jaxprs_in_params(eqn.params):
            total += repeats * _jaxpr_macs(sub)
    return total


def _conv_macs(eqn) -> int:
    rhs = eqn.invars[1].aval
    out = eqn.outvars[0].aval
    dims = eqn.params["dimension_numbers"]
    kernel_in = rhs.shape[dims.rhs_spec[1]]
    kernel_space = math.prod(rhs.shape[i] for i in dims.rhs_spec[2:])
    return math.prod(out.shape) * kernel_in * kernel_space


def _dot_macs(eqn) -> int:
    lhs = eqn.invars[0].aval
    out = eqn.outvars[0].aval
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    return math.prod(out.shape) * math.prod(lhs.shape[i] for i in lhs_contract)
