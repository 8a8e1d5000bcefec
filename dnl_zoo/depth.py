"""Continuous-depth fields of a DNL network, depth transfer, and the regulariser.

A DNL block of depth N with step h = T / N samples two fields at the layer
times t_n = n h (docs/dnl.md):

- G(t): the slice of layer n's weights that reads the block input x_0, and every
  weight of layer n that reads no history (a bottleneck's norm, the transform
  after a bottleneck, biases): fields over t alone;
- K(t, s): the slice of layer n's weights (and of its norm of the history, with
  the running statistics) that reads source x_j, sampled at (t_n, t_j) on the
  triangle 0 < s < t <= T.

Transitions and the classifier read the whole history at t = T: their slices
for x_1..x_N are fields over s, their x_0 slice is kept as it is.

`transfer` builds a model of another depth M by piecewise-linear (bilinear on
the triangle) interpolation of these fields. Samples that fall exactly on the
old grid are copied bit for bit, so refining N -> 2N and restricting back
returns the original weights. Outside the sampled range (t < t_1, or the
diagonal s = t which no layer reads) a field is continued by its nearest
sample.

`regulariser` is R_N of docs/dnl.md: size and layer-to-layer change of K and G.
"""

import math
import os
from collections.abc import Sequence
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dnl_zoo.models import layers
from dnl_zoo.models.dnl import DNLBlock, DNLLayer, DNLNet

Params = dict[str, np.ndarray]  # dotted path -> array, for one module


def _flat(module: nnx.Module) -> Params:
    return {k: np.asarray(v[...]) for k, v in layers.named_weights(module).items()}


def _split(array: np.ndarray, axis: int, c0: int, k: int) -> list[np.ndarray]:
    """[x_0 slice, x_1 slice, ...] of an array whose `axis` runs over a history."""
    sources = (array.shape[axis] - c0) // k
    cuts = [c0 + j * k for j in range(sources)]
    return np.split(array, cuts, axis=axis)


def _interpolate(samples: Sequence[np.ndarray], position: Fraction) -> np.ndarray:
    """Piecewise-linear value at `position` of samples at 1, 2, ..., len."""
    position = min(max(position, Fraction(1)), Fraction(len(samples)))
    low = math.floor(position)
    weight = position - low
    if weight == 0:
        return samples[low - 1]
    w = float(weight)
    return (1 - w) * samples[low - 1] + w * samples[low]


def _triangle(parts: list[list[np.ndarray]], n: int, j: int) -> np.ndarray:
    """K(t_n, t_j) for integer n, j, continued by its nearest sample.

    parts[n - 1][j] is layer n's slice for source j (1 <= j < n <= N).
    """
    N = len(parts)
    j = min(max(j, 1), N - 1)
    n = min(max(n, j + 1), N)
    return parts[n - 1][j]


def _bilinear(parts: list[list[np.ndarray]], a: Fraction, b: Fraction) -> np.ndarray:
    """K at old-grid coordinates (a, b) by bilinear interpolation."""
    n0, j0 = math.floor(a), math.floor(b)
    wa, wb = a - n0, b - j0
    if wa == 0 and wb == 0:
        return _triangle(parts, n0, j0)
    wa, wb = float(wa), float(wb)
    return (
        (1 - wa) * (1 - wb) * _triangle(parts, n0, j0)
        + wa * (1 - wb) * _triangle(parts, n0 + 1, j0)
        + (1 - wa) * wb * _triangle(parts, n0, j0 + 1)
        + wa * wb * _triangle(parts, n0 + 1, j0 + 1)
    )


def _transfer_block(old: DNLBlock, new: DNLBlock) -> None:
    """Fills `new` (depth M) from the fields sampled by `old` (depth N)."""
    N, M = old.num_layers, new.num_layers
    if N < 2 and M > 1:
        raise ValueError(
            f"a block of depth {N} samples no field K(t, s); depth transfer "
            "needs at least 2 layers per block to start from"
        )
    c0, k = old.c0, old.growth_rate
    old_params = [_flat(layer) for layer in old.layers]
    axes = old.layers[-1].history_params
    split = {
        path: [_split(p[path], axis, c0, k) for p in old_params]
        for path, axis in axes.items()
    }
    for m, layer in enumerate(new.layers, start=1):
        a = Fraction(m * N, M)  # t'_m in units of the old step
        values = {}
        for path in old_params[0]:
            if path not in axes:
                values[path] = _interpolate([p[path] for p in old_params], a)
                continue
            parts = split[path]
            g = _interpolate([p[0] for p in parts], a)
            ks = [_bilinear(parts, a, Fraction(i * N, M)) for i in range(1, m)]
            values[path] = np.concatenate([g, *ks], axis=axes[path])
        layers.load_weights(layer, values)


def _history_readers(model: DNLNet, b: int) -> list[tuple[nnx.Module, dict[str, int]]]:
    """Modules after block b that read its whole history, with their axes."""
    stats = ("scale", "bias", "mean", "var")
    if b < len(model.transitions):
        reader = model.transitions[b]
        axes = {"conv.kernel": 0}
    else:
        reader, axes = model, {"classifier.kernel": 0}
    norm = reader.norm if reader is not model else model.norm_final
    prefix = "norm" if reader is not model else "norm_final"
    if norm.batch is not None:
        axes |= {f"{prefix}.batch.{s}": 0 for s in stats}
    return [(reader, axes)]


def _transfer_readers(old: DNLNet, new: DNLNet, b: int) -> None:
    """Interpolates the x_1..x_N slices of the readers of block b over s."""
    N, M = old.blocks[b].num_layers, new.blocks[b].num_layers
    c0, k = old.blocks[b].c0, old.blocks[b].growth_rate
    for (old_reader, axes), (new_reader, _) in zip(
        _history_readers(old, b), _history_readers(new, b), strict=True
    ):
        old_params, new_params = _flat(old_reader), _flat(new_reader)
        for path, axis in axes.items():
            g, *ks = _split(old_params[path], axis, c0, k)
            sampled = [_interpolate(ks, Fraction(i * N, M)) for i in range(1, M + 1)]
            new_params[path] = np.concatenate([g, *sampled], axis=axis)
        layers.load_weights(new_reader, new_params)


def transfer(model: DNLNet, block_config: int | Sequence[int]) -> DNLNet:
    """A DNL network of another depth, sampled from `model`'s fields.

    Args:
      model: a (trained) DNLNet; it is not changed.
      block_config: layers per block of the new model (an int for every block).

    Returns:
      A new DNLNet with the same horizon, widths and transform, in train mode.
      With depth_scale='none' (h = 1) the fields have no depth limit, so the
      new model's sums are not comparable to the old ones; use 'step'.
    """
    if isinstance(block_config, int):
        block_config = (block_config,) * len(model.blocks)
    block_config = tuple(block_config)
    if len(block_config) != len(model.blocks):
        raise ValueError(
            f"expected {len(model.blocks)} block depths, got {block_config}"
        )
    new = DNLNet(**(model.config | {"block_config": block_config}), rngs=nnx.Rngs(0))
    widths = [b.c0 for b in model.blocks], [b.c0 for b in new.blocks]
    if widths[0] != widths[1]:
        raise ValueError(
            f"the blocks of this model start with {widths[0]} channels, those of "
            f"depth {block_config} would start with {widths[1]}: the transitions' "
            "width depends on depth. Build the model with transition_features=C "
            "to give every transition a fixed width."
        )
    new_flat, old_flat = _flat(new), _flat(model)
    for path in new_flat:  # the stem and anything outside blocks and readers
        if not path.startswith(
            ("blocks.", "transitions.", "norm_final.", "classifier.")
        ):
            new_flat[path] = old_flat[path]
    new_flat["classifier.bias"] = old_flat["classifier.bias"]
    layers.load_weights(new, new_flat)
    for b in range(len(model.blocks)):
        _transfer_block(model.blocks[b], new.blocks[b])
        _transfer_readers(model, new, b)
    return new


# ---------------------------------------------------------------------------
# The regulariser R_N.
# ---------------------------------------------------------------------------


def _kernel_paths(layer: DNLLayer) -> dict[str, int]:
    """The history-reading weights of a layer (not its norm): K and G."""
    return {p: a for p, a in layer.history_params.items() if ".batch." not in p}


def _layer_parts(layer: DNLLayer, path: str, axis: int) -> list[jax.Array]:
    variable = layer
    for name in path.split("."):
        variable = getattr(variable, name)
    array = variable[...]
    c0, k = layer.c0, layer.growth_rate
    return jnp.split(array, [c0 + j * k for j in range(layer.index - 1)], axis=axis)


def _sq(x: jax.Array) -> jax.Array:
    return jnp.sum(jnp.square(x))


def block_regulariser(block: DNLBlock, alpha: float, beta: float) -> jax.Array:
    """R_N of one block (a scalar), differentiable in its weights."""
    h = block.h
    total = jnp.zeros(())
    for path, axis in _kernel_paths(block.layers[0]).items():
        parts = [_layer_parts(layer, path, axis) for layer in block.layers]
        g = [p[0] for p in parts]
        total += alpha * h * sum(_sq(x) for x in g)
        total += beta / h * sum(_sq(b - a) for a, b in zip(g, g[1:], strict=False))
        K = {
            (n, j): parts[n - 1][j]
            for n in range(1, len(parts) + 1)
            for j in range(1, n)
        }
        total += alpha * h**2 * sum(_sq(x) for x in K.values())
        for (n, j), x in K.items():
            if (n + 1, j) in K:
                total += beta * _sq(K[(n + 1, j)] - x)
            if (n, j + 1) in K:
                total += beta * _sq(K[(n, j + 1)] - x)
    return total


def regulariser(model: DNLNet, alpha: float, beta: float) -> jax.Array:
    """R_N summed over the blocks of `model`: alpha (size) and beta (change)."""
    if alpha == 0 and beta == 0:
        return jnp.zeros(())
    return sum(block_regulariser(b, alpha, beta) for b in model.blocks)


def transfer_checkpoint(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    block_config: int | Sequence[int],
) -> DNLNet:
    """`transfer` between model directories (dnl_zoo.checkpoint's format).

    Reads the DNLNet saved in `source`, samples it at `block_config` and saves
    the new model to `destination`; returns the new model.
    """
    from dnl_zoo import checkpoint

    model = checkpoint.load_model(source)
    if not isinstance(model, DNLNet):
        raise ValueError(
            f"{source} holds a {type(model).__name__}; depth transfer needs a DNLNet "
            "(a DenseNet is the h = 1 case: copy it into a DNLNet with "
            "dnl_zoo.models.dnl.from_densenet and transition_features set)"
        )
    new = transfer(model, block_config)
    checkpoint.save_model(destination, new)
    return new
