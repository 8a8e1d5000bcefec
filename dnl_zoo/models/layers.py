"""Small parts shared by the DenseNet and dense non-local (DNL) models.

Every layer of a densely connected network applies a norm, an activation and a
linear transform to (part of) its history. This module holds those pieces, the
initialisers, and the input checks that give users readable errors.
"""

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array
Shape = Sequence[int]

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
    "identity": lambda x: x,
}


def get_activation(name: str) -> Callable[[Array], Array]:
    """Returns the activation called `name`, or says which names exist."""
    if name not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}"
        )
    return ACTIVATIONS[name]


# ---------------------------------------------------------------------------
# Initialisers.
# ---------------------------------------------------------------------------
# NOTE: weights are drawn with numpy on the host, seeded from the JAX key, not
# with jax.random. Eager jax.random compiles one XLA program per weight shape
# (about 0.3 s each on a 2-core CPU), so a DenseNet-40 took 40 s to build; on the
# host it takes well under a second. Inside jit the same numbers come through
# jax.pure_callback, so a model built under jit equals one built eagerly.


def _key_words(key: Array) -> Array:
    """The raw uint32 words of a typed or legacy PRNG key."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key


def _host_sample(key: Array, shape: Shape, dtype, draw) -> Array:
    """`draw(generator, shape)` on the host, seeded by `key`, as a JAX array."""
    shape, dtype = tuple(shape), dtype or jnp.float32

    def sample(words) -> np.ndarray:
        generator = np.random.default_rng(np.asarray(words).ravel().tolist())
        return np.asarray(draw(generator, shape), dtype=dtype)

    words = _key_words(key)
    if isinstance(words, jax.core.Tracer):
        result = jax.ShapeDtypeStruct(shape, dtype)
        return jax.pure_callback(sample, result, words)
    return jnp.asarray(sample(words))


def _fan_in_normal(key: Array, shape: Shape, dtype, gain: float) -> Array:
    """N(0, gain / fan_in) with fan_in = prod(shape[:-1])."""
    std = math.sqrt(gain / max(1, math.prod(shape[:-1])))
    return _host_sample(key, shape, dtype, lambda g, s: std * g.standard_normal(s))


def he_normal(key: Array, shape: Shape, dtype=None) -> Array:
    """N(0, 2 / fan_in): kernels that feed ReLUs.

    The original DenseNet code and torchvision initialise convolutions this way.
    """
    return _fan_in_normal(key, shape, dtype, 2.0)


def lecun_normal(key: Array, shape: Shape, dtype=None) -> Array:
    """N(0, 1 / fan_in): the classifier, whose outputs feed no activation."""
    return _fan_in_normal(key, shape, dtype, 1.0)


def zeros(key: Array | None, shape: Shape, dtype=None) -> Array:
    """Zeros, built on the host (no XLA program per shape)."""
    return jnp.asarray(np.zeros(tuple(shape), dtype=dtype or jnp.float32))


def ones(key: Array | None, shape: Shape, dtype=None) -> Array:
    """Ones, built on the host (no XLA program per shape)."""
    return jnp.asarray(np.ones(tuple(shape), dtype=dtype or jnp.float32))


# ---------------------------------------------------------------------------
# Norm and linear transforms.
# ---------------------------------------------------------------------------


class BatchNorm(nnx.Module):
    """Per-channel batch normalisation of NHWC (or (batch, C)) input.

    Statistics are taken over every axis but the last, in float32 whatever the
    compute dtype. `axis_name` names a pmap axis to average them over, so that
    data-parallel replicas normalise with the statistics of the global batch.
    `train()` and `eval()` switch between batch and running statistics.
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-5,
        momentum: float = 0.9,
        dtype=None,
        axis_name: str | None = None,
        use_running_average: bool = False,
        rngs: nnx.Rngs | None = None,
    ):
        del rngs  # deterministic initial values; kept for a uniform signature
        self.num_features = num_features
        self.epsilon = epsilon
        self.momentum = momentum
        self.dtype = dtype
        self.axis_name = axis_name
        self.use_running_average = use_running_average
        self.scale = nnx.Param(ones(None, (num_features,)))
        self.bias = nnx.Param(zeros(None, (num_features,)))
        self.mean = nnx.BatchStat(zeros(None, (num_features,)))
        self.var = nnx.BatchStat(ones(None, (num_features,)))

    def moments(self, x: Array) -> tuple[Array, Array]:
        """Mean and biased variance per channel of x: (..., C) -> (C,), (C,)."""
        return batch_moments(x, self.axis_name)

    def statistics(self, x: Array, moments: tuple[Array, Array] | None = None):
        """(mean, var) to normalise x with; in train mode updates the running ones.

        `moments`, when given, are x's batch moments computed elsewhere (a dense
        block computes each source's once and shares them between layers).
        """
        if self.use_running_average:
            return self.mean[...], self.var[...]
        mean, var = self.moments(x) if moments is None else moments
        # NOTE: set_value (not `var[...] = v`) keeps tracing linear in depth;
        # the indexed form asks each traced value for its sharding, which
        # walks the whole program so far on this JAX version.
        keep = self.momentum
        old_mean, old_var = self.mean[...], self.var[...]
        self.mean.set_value(keep * old_mean + (1 - keep) * jax.lax.stop_gradient(mean))
        self.var.set_value(keep * old_var + (1 - keep) * jax.lax.stop_gradient(var))
        return mean, var

    def affine(self, mean: Array, var: Array, dtype) -> tuple[Array, Array]:
        """(gain, shift) per channel such that normalised x = x * gain + shift."""
        gain = self.scale[...] * jax.lax.rsqrt(var + self.epsilon)
        shift = self.bias[...] - mean * gain
        dtype = self.dtype or dtype
        return gain.astype(dtype), shift.astype(dtype)

    def __call__(self, x: Array, moments: tuple[Array, Array] | None = None) -> Array:
        """Maps (..., C) to (..., C), normalised per channel (`moments`: as in
        `statistics`)."""
        gain, shift = self.affine(*self.statistics(x, moments), x.dtype)
        return x * gain + shift


def batch_moments(x: Array, axis_name: str | None = None) -> tuple[Array, Array]:
    """Mean and biased variance per channel of x: (..., C) -> (C,), (C,), float32.

    With `axis_name` (a pmap axis) they are averaged over the replicas.
    """
    axes = tuple(range(x.ndim - 1))
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axes)
    if axis_name is None:
        return mean, jnp.mean(jnp.square(x - mean), axes)
    # Across replicas the two moments travel in one collective.
    mean, mean_sq = jax.lax.pmean((mean, jnp.mean(jnp.square(x), axes)), axis_name)
    return mean, jnp.maximum(mean_sq - jnp.square(mean), 0.0)


def joined_moments(per_source) -> tuple[Array, Array]:
    """[(mean_j, var_j)] of sources x_0, x_1, ... -> the (C,) mean and variance
    of their channel concatenation (the moments are per channel)."""
    return tuple(jnp.concatenate(m) for m in zip(*per_source, strict=True))


def after(weights, dy: Array):
    """`weights` plus a zero that XLA can only know after `dy` exists.

    A recomputation in the backward pass must not be merged with the forward
    computation it repeats (which would keep the forward's activations alive,
    the memory it exists to save) nor run before the gradient arrives. XLA's
    CPU pipeline drops `optimization_barrier` before it schedules, so the
    recomputation reads weights that depend on one element of `dy` instead:
    x * 0 is not folded for floats, and the values are unchanged (a non-finite
    gradient is non-finite either way).
    """
    zero = dy.reshape(-1)[0] * 0
    return jax.tree.map(lambda w: w + zero.astype(w.dtype), weights)


def with_moment_grads(x: Array, dx: Array, dmoments: tuple, axis_name=None) -> Array:
    """dx plus the gradient that reaches source x (batch, H, W, c) through its
    own batch moments, whose gradients `dmoments` ((c,), (c,)) every later
    layer has added to (a recomputing block's backward pass)."""
    _, moments_vjp = jax.vjp(lambda x: batch_moments(x, axis_name), x)
    return dx + moments_vjp(dmoments)[0].astype(dx.dtype)


def recomputed_backward(history, grad, moments, weights, c0, k, layer_vjp, axis_name):
    """The backward pass of a dense block that kept only its history.

    Walks the layers in reverse; layer n is recomputed from its input, the
    history's first c0 + n k channels, by `layer_vjp(n, x, w, m, dy)` ->
    (dx, dw, dm) (gradients of its input, weights `weights[n]` and input's
    batch moments m, or None without BatchNorm), and the gradient it sends
    to its sources is added into one buffer of the history's width.

    Args:
      history: (batch, H, W, c0 + N k), x_0..x_N.
      grad: the history's gradient, same shape.
      moments: ((C,), (C,)) batch moments of the history per channel, or None.

    Returns:
      (x_0's gradient (batch, H, W, c0), each layer's weight gradients).
    """
    # Each source's moments are one function of it, shared by every later
    # layer: their gradients add up here, and reach the source once, when its
    # own layer is reached (linear in depth, as the forward's statistics).
    dmoments = moments and tuple(jnp.zeros_like(m) for m in moments)
    dweights = [None] * len(weights)
    for n in reversed(range(len(weights))):
        width = c0 + n * k
        dy = grad[..., width : width + k]
        if dmoments:
            part = tuple(d[width : width + k] for d in dmoments)
            x_new = history[..., width : width + k]
            dy = with_moment_grads(x_new, dy, part, axis_name)
        # A slice at a start XLA cannot see (zero, from dy): a static slice of
        # the history would be folded into the forward's own concatenation of
        # x_0..x_{n-1}, keeping that alive instead.
        start = after(jnp.zeros((), jnp.int32), dy)
        x = jax.lax.dynamic_slice_in_dim(history, start, width, axis=3)
        m = moments and tuple(m[:width] for m in moments)
        w, m = after((weights[n], m), dy)
        dx, dweights[n], dm = layer_vjp(n, x, w, m, dy)
        grad = grad.at[..., :width].add(dx.astype(grad.dtype))
        if dmoments:
            dmoments = tuple(
                d.at[:width].add(e) for d, e in zip(dmoments, dm, strict=True)
            )
    dx0 = grad[..., :c0]
    if dmoments:
        part = tuple(d[:c0] for d in dmoments)
        dx0 = with_moment_grads(history[..., :c0], dx0, part, axis_name)
    return dx0, tuple(dweights)


def batch_norm(
    num_features: int,
    *,
    epsilon: float,
    momentum: float,
    dtype,
    rngs: nnx.Rngs | None = None,
) -> BatchNorm:
    """A per-channel BatchNorm over the last (channel) axis of NHWC input."""
    return BatchNorm(num_features, epsilon=epsilon, momentum=momentum, dtype=dtype)


def pointwise(
    in_features: int,
    out_features: int,
    *,
    dtype,
    rngs: nnx.Rngs,
    use_bias: bool = False,
) -> nnx.Linear:
    """A 1x1 convolution written as a matrix product over the channel axis.

    XLA on CPU runs a 1x1 convolution several times faster as `dot_general` than
    as `conv_general_dilated` (`python -m benchmarks.run` times both), so 1x1
    kernels are stored as (in, out) matrices.
    """
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        kernel_init=he_normal,
        bias_init=zeros,
        dtype=dtype,
        rngs=rngs,
    )


def classifier(in_features: int, num_classes: int, *, dtype, rngs) -> nnx.Linear:
    """The final linear layer: LeCun-normal weights, zero bias."""
    return nnx.Linear(
        in_features,
        num_classes,
        kernel_init=lecun_normal,
        bias_init=zeros,
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
        kernel_init=he_normal,
        bias_init=zeros,
        dtype=dtype,
        rngs=rngs,
    )


# ---------------------------------------------------------------------------
# Weights by name.
# ---------------------------------------------------------------------------

# What a saved or transferred model holds: parameters and BatchNorm statistics,
# not RNG state.
WEIGHTS = nnx.Any(nnx.Param, nnx.BatchStat)


def dotted_path(path: tuple) -> str:
    """A JAX key path as the dotted name named_weights uses, e.g. 'head.kernel'.

    The key paths of an nnx.State (or an optax update tree over one) end in the
    Variable's '.value'; that suffix is dropped.
    """
    name = jax.tree_util.keystr(path, simple=True, separator=".")
    return name.removesuffix(".value")


def named_weights(module: nnx.Module) -> dict[str, nnx.Variable]:
    """The module's weight variables by stored dotted path, e.g. 'classifier.bias'.

    Paths as the module holds them: 'blocks.0.layers.1.conv1.kernel', and for a
    `Stacked` module its layers' weights on a layer axis ('blocks.0.layers.
    conv1.kernel'); `weight_values` names every weight per layer.
    """
    return {
        ".".join(map(str, path)): variable
        for path, variable in nnx.to_flat_state(nnx.state(module, WEIGHTS))
    }


class Stacked(nnx.Module):
    """A module that stores several layers' weights stacked on a layer axis.

    Checkpoints, conversions and `load_weights` name weights per layer
    ('3.norm1.scale'), whatever the storage ('norm1.scale' of shape (N, ...)).
    Subclasses convert between the two spellings of their own weights, in dotted
    names relative to themselves.
    """

    def unstack(self, stored: dict) -> dict:
        """Stored-layout arrays (weights or their gradients) by per-layer name."""
        raise NotImplementedError

    def stack(self, per_layer: dict) -> dict:
        """The stored-layout arrays of a complete set of per-layer arrays."""
        raise NotImplementedError


def _stacked_modules(module: nnx.Module) -> list[tuple[str, Stacked]]:
    """(dotted prefix with its trailing '.', module) of every Stacked inside."""
    return [
        ("".join(f"{key}." for key in path), sub)
        for path, sub in nnx.iter_modules(module)
        if isinstance(sub, Stacked)
    ]


def _take(flat: dict, prefix: str) -> dict:
    """Removes and returns the entries of `flat` under `prefix`, prefix dropped."""
    return {k[len(prefix) :]: flat.pop(k) for k in list(flat) if k.startswith(prefix)}


def per_layer(module: nnx.Module, stored: dict) -> dict:
    """`stored` (the module's weights or gradients by stored dotted path) by
    per-layer path: every Stacked module's entries unstacked."""
    out = dict(stored)
    for prefix, sub in _stacked_modules(module):
        out |= {prefix + k: v for k, v in sub.unstack(_take(out, prefix)).items()}
    return out


def weight_values(module: nnx.Module) -> dict[str, np.ndarray]:
    """The module's weights by per-layer dotted path, as checkpoints name them.

    The same names and shapes for every dense-block implementation.
    """
    stored = {k: np.asarray(v[...]) for k, v in named_weights(module).items()}
    return per_layer(module, stored)


def _check_names_and_shapes(module: nnx.Module, values: dict, expected: dict) -> None:
    unknown = sorted(set(values) - set(expected))
    if unknown:
        raise KeyError(f"{type(module).__name__} has no weights {unknown[:3]}")
    for name, value in values.items():
        if tuple(np.shape(value)) != tuple(expected[name]):
            raise ValueError(
                f"{name}: expected shape {tuple(expected[name])}, got "
                f"{tuple(np.shape(value))}"
            )


def load_weights(module: nnx.Module, values: dict) -> None:
    """Sets the weights named in `values` (per-layer dotted paths) to those arrays.

    Each array takes the dtype of the weight it replaces; a name the module
    lacks, or a shape that differs, is an error.
    """
    flat = nnx.to_flat_state(nnx.state(module, WEIGHTS))
    expected = {".".join(map(str, p)): v[...].shape for p, v in flat}
    stored = dict(values)
    for prefix, sub in _stacked_modules(module):
        given = _take(stored, prefix)
        if not given:
            continue
        current = per_layer(sub, {k: v[...] for k, v in named_weights(sub).items()})
        _check_names_and_shapes(
            module,
            {prefix + k: v for k, v in given.items()},
            {prefix + k: v.shape for k, v in current.items()},
        )
        stored |= {prefix + k: v for k, v in sub.stack(current | given).items()}
    _check_names_and_shapes(module, stored, expected)
    updates = []
    for path, variable in flat:
        name = ".".join(map(str, path))
        if name in stored:
            value = jnp.asarray(stored[name], variable[...].dtype)
            updates.append((path, variable.replace(value)))
    nnx.update(module, nnx.from_flat_state(updates))


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
