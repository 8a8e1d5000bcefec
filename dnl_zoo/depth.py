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
from collections.abc import Callable, Sequence
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


def _reader_paths(model: DNLNet, b: int) -> dict[str, int]:
    """Paths after block b that read its whole history, with their axes."""
    last = b == len(model.transitions)
    prefix = "" if last else f"transitions.{b}."
    norm = model.norm_final if last else model.transitions[b].norm
    paths = {f"{prefix}{'classifier' if last else 'conv'}.kernel": 0}
    if norm.batch is not None:
        name = "norm_final" if last else "norm"
        paths |= {
            f"{prefix}{name}.batch.{s}": 0 for s in ("scale", "bias", "mean", "var")
        }
    return paths


def _transfer_readers(old: Params, model: DNLNet, new: DNLNet, b: int) -> Params:
    """Block b's readers with their x_1..x_N slices interpolated over s."""
    N, M = model.blocks[b].num_layers, new.blocks[b].num_layers
    c0, k = model.blocks[b].c0, model.blocks[b].growth_rate
    values = {}
    for path, axis in _reader_paths(model, b).items():
        g, *ks = _split(old[path], axis, c0, k)
        sampled = [_interpolate(ks, Fraction(i * N, M)) for i in range(1, M + 1)]
        values[path] = np.concatenate([g, *sampled], axis=axis)
    return values


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
    old = _flat(model)
    # Outside the blocks every weight is kept, but for the readers' slices.
    values = {p: v for p, v in old.items() if not p.startswith("blocks.")}
    for b in range(len(model.blocks)):
        values |= _transfer_readers(old, model, new, b)
        _transfer_block(model.blocks[b], new.blocks[b])
    layers.load_weights(new, values)
    return new


# ---------------------------------------------------------------------------
# Blocks that sample given fields: the continuous-limit experiments.
# ---------------------------------------------------------------------------

Fields = tuple[Callable[[float], np.ndarray], Callable[[float, float], np.ndarray]]


def linear_fields(c0: int, k: int, *, seed: int, size: float = 0.5) -> Fields:
    """Smooth fields G(t) = G0 + t G1 and K(t, s) = K0 + t K1 + s K2.

    Random 3x3 kernels, G: (3, 3, c0, k) and K: (3, 3, k, k), scaled by
    size / sqrt(9 max(c0, k)) so that the block's states stay of order one.
    """
    rng = np.random.default_rng(seed)
    scale = size / np.sqrt(9 * max(c0, k))
    g0, g1 = (scale * rng.normal(size=(3, 3, c0, k)) for _ in range(2))
    k0, k1, k2 = (scale * rng.normal(size=(3, 3, k, k)) for _ in range(3))
    return (lambda t: g0 + t * g1), (lambda t, s: k0 + t * k1 + s * k2)


def sampled_block(
    num_layers: int,
    fields: Fields,
    *,
    c0: int,
    k: int,
    horizon: float = 1.0,
    depth_scale: str = "step",
    activation: str = "tanh",
) -> DNLBlock:
    """A norm-free local DNL block whose 3x3 kernels sample `fields`.

    Layer n's kernel is [G(t_n), K(t_n, t_1), ..., K(t_n, t_{n-1})] along its
    input-channel axis, with t_n = n T / N whatever `depth_scale` says.
    """
    block = DNLBlock(
        c0,
        num_layers,
        k,
        horizon=horizon,
        depth_scale=depth_scale,
        norm="none",
        activation=activation,
        rngs=nnx.Rngs(0),
    )
    G, K = fields
    t = horizon / num_layers
    for n, layer in enumerate(block.layers, start=1):
        slices = [G(n * t)] + [K(n * t, j * t) for j in range(1, n)]
        kernel = np.concatenate(slices, axis=2).astype(np.float32)
        layer.transform.conv.kernel.set_value(jnp.asarray(kernel))
    return block


def state_norms(history: np.ndarray, c0: int, k: int) -> list[float]:
    """|x_n| (over batch and positions) of every state x_1..x_N of a history."""
    states = np.split(history[..., c0:], (history.shape[-1] - c0) // k, axis=-1)
    return [float(np.sqrt(np.sum(np.square(s)))) for s in states]


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


# ---------------------------------------------------------------------------
# Gradient descent on the fields: learning-rate factors per weight.
# ---------------------------------------------------------------------------


def _source_factors(
    shape: tuple[int, ...], axis: int, c0: int, first: float, rest: float
) -> np.ndarray:
    """Factors broadcastable to `shape`: `first` for the x_0 slice along `axis`,
    `rest` for the slices of x_1, x_2, ..."""
    factors = np.full(shape[axis], rest, np.float32)
    factors[:c0] = first
    broadcast = [1] * len(shape)
    broadcast[axis] = shape[axis]
    return factors.reshape(broadcast)


def field_metric_scales(model: DNLNet) -> dict[str, np.ndarray]:
    """Learning-rate factors that make SGD a gradient descent on the fields.

    The weights sample fields: K(t_n, t_j) with quadrature weight h^2 per
    sample, G(t_n) (and the weights of layer n that read no history) with
    weight h, and the readers' slices for x_1..x_N over s with weight h. In
    that inner product the gradient at a sample is the weight's gradient
    divided by its quadrature weight, so the factors are 1/h^2, 1/h and 1/h;
    the stem and the readers' x_0 slices keep 1. With h = 1 every factor is 1.
    Since every read of x_j carries h, plain SGD moves the function by
    O(h^2) per step in the h = T/N family: deeper networks learn slower. With
    these factors each step approximates the same gradient flow at every N.

    Returns:
      Dotted parameter path -> float32 factors broadcastable to its shape,
      for the paths that differ from 1.
    """
    scales = {}
    for b, block in enumerate(model.blocks):
        h, c0 = block.h, block.c0
        for n, layer in enumerate(block.layers):
            axes = layer.history_params
            for path, variable in layers.named_weights(layer).items():
                shape = np.shape(variable[...])
                factor = (
                    _source_factors(shape, axes[path], c0, 1 / h, 1 / h**2)
                    if path in axes
                    else np.full((1,) * len(shape), 1 / h, np.float32)
                )
                scales[f"blocks.{b}.layers.{n}.{path}"] = factor
        weights = layers.named_weights(model)
        for path, axis in _reader_paths(model, b).items():
            shape = np.shape(weights[path][...])
            scales[path] = _source_factors(shape, axis, c0, 1.0, 1 / h)
    return {p: f for p, f in scales.items() if np.any(f != 1.0)}
