"""DenseNet (Huang et al., 2017) in Flax NNX, NHWC.

A dense block builds a history x_0, x_1, ..., x_N in which every new feature map
reads all earlier ones:

    x_n = H_n([x_0, x_1, ..., x_{n-1}])

with H_n = Conv3x3(ReLU(BN(.))) for the original layer, and
H_n = Conv3x3(ReLU(BN(Conv1x1(ReLU(BN(.)))))) for the bottleneck (B) layer. Each
x_n has k channels (the growth rate). Transitions between blocks apply
BN-ReLU-Conv1x1 and 2x2 average pooling; with compression (C) they keep
floor(theta * C) of C channels. This is the h = 1, local-transform case of the
dense non-local (DNL) equation in docs/dnl.md.

Two stems cover the published networks: 'cifar' (one 3x3 convolution, for 28x28
or 32x32 input) and 'imagenet' (7x7 stride-2 convolution, BN, ReLU, 3x3 stride-2
max pooling).
"""

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dnl_zoo.models import layers

Array = jax.Array


def _conv(a: Array, kernel: Array) -> Array:
    """A dense layer's first convolution: 1x1 as (in, out), or 3x3 HWIO, NHWC."""
    if kernel.ndim == 2:
        return jnp.dot(a, kernel)
    dims = ("NHWC", "HWIO", "NHWC")
    return jax.lax.conv_general_dilated(
        a, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dims
    )


def _conv_in_loop(a: Array, kernel: Array) -> Array:
    """`_conv` for the body of a scan: a 3x3 kernel goes through `_conv3x3_in_loop`."""
    return _conv(a, kernel) if kernel.ndim == 2 else _conv3x3_in_loop(a, kernel)


@jax.custom_vjp
def _conv3x3_in_loop(a: Array, kernel: Array) -> Array:
    """A 3x3 convolution (batch, H, W, C) -> (batch, H, W, k) whose backward pass
    is a forward convolution (input gradient) and nine matrix products (kernel).

    Inside a loop body XLA's CPU backend runs the transposed convolutions of the
    usual gradient about 20x slower than outside one; these run at full speed
    there (a scanned block's backward pass, `scanned_block`).
    """
    return _conv(a, kernel)


def _conv3x3_forward(a, kernel):
    return _conv(a, kernel), (a, kernel)


def _conv3x3_backward(saved, dy):
    a, kernel = saved
    # The input gradient: the same convolution with the kernel turned by 180
    # degrees and its channel axes swapped.
    da = _conv(dy, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2))
    padded = jnp.pad(a, ((0, 0), (1, 1), (1, 1), (0, 0)))
    height, width = a.shape[1], a.shape[2]
    dkernel = jnp.stack(
        [
            jnp.einsum("bhwc,bhwo->co", padded[:, i : i + height, j : j + width], dy)
            for i in range(3)
            for j in range(3)
        ]
    )
    return da, dkernel.reshape(kernel.shape).astype(kernel.dtype)


_conv3x3_in_loop.defvjp(_conv3x3_forward, _conv3x3_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def lean_read(activation: str, sources, gain, shift, kernel) -> Array:
    """conv(act(concat(sources) * gain + shift), kernel), keeping only its inputs.

    Maps sources [(batch, H, W, c_j)], per-channel gain and shift (C,) with
    C = sum c_j, and a kernel (C, out) or (3, 3, C, out) to (batch, H, W, out).
    The backward pass recomputes the concatenation, norm and activation from
    the sources (which the block keeps anyway): what the memory-efficient
    DenseNets do, so that a layer's backward state does not grow with C.
    """
    x = jnp.concatenate(sources, axis=-1)
    return _conv(layers.get_activation(activation)(x * gain + shift), kernel)


def _lean_read_forward(activation, sources, gain, shift, kernel):
    y = lean_read(activation, sources, gain, shift, kernel)
    return y, (sources, gain, shift, kernel)


def _lean_read_backward(activation, saved, dy):
    sources, (gain, shift, kernel) = saved[0], layers.after(saved[1:], dy)
    x = jnp.concatenate(sources, axis=-1)
    a, activation_vjp = jax.vjp(layers.get_activation(activation), x * gain + shift)
    (da,) = jax.linear_transpose(lambda a: _conv(a, kernel), a)(dy)
    (dkernel,) = jax.linear_transpose(lambda k: _conv(a, k), kernel)(dy)
    (dz,) = activation_vjp(da)
    axes = tuple(range(dz.ndim - 1))
    ends = np.cumsum([s.shape[-1] for s in sources])[:-1]
    dsources = jnp.split(dz * gain, ends, axis=-1)
    return list(dsources), jnp.sum(dz * x, axes), jnp.sum(dz, axes), dkernel


lean_read.defvjp(_lean_read_forward, _lean_read_backward)


@dataclasses.dataclass(frozen=True)
class _LayerSpec:
    """What a dense layer computes besides its weights (hashable, for jit)."""

    activation: str
    bottleneck: bool
    epsilon: float
    growth_rate: int
    dtype: str
    axis_name: str | None


def _normalise(x, w, prefix, epsilon, moments, dtype):
    mean, var = moments
    gain = w[f"{prefix}.scale"] * jax.lax.rsqrt(var + epsilon)
    shift = w[f"{prefix}.bias"] - mean * gain
    return x * gain.astype(dtype) + shift.astype(dtype)


def _layer(spec: _LayerSpec, w: dict, x: Array, moments=None, conv=_conv):
    """A dense layer in train mode as a function of its weights and input.

    Maps w (norm1/norm2 scale and bias, conv1/conv2 kernels) and x (batch, H,
    W, C) to (y (batch, H, W, k), the batch statistics it normalised with).
    `moments` are x's, when known; otherwise they are taken here. `conv` is
    `_conv`, or `_conv_in_loop` inside a scan that differentiates the layer.
    """
    act, dtype = layers.get_activation(spec.activation), jnp.dtype(spec.dtype)
    first = moments or layers.batch_moments(x, spec.axis_name)
    a = act(_normalise(x.astype(dtype), w, "norm1", spec.epsilon, first, dtype))
    y = conv(a, w["conv1.kernel"].astype(dtype))
    if not spec.bottleneck:
        return y, (first,)
    second = layers.batch_moments(y, spec.axis_name)
    a = act(_normalise(y, w, "norm2", spec.epsilon, second, dtype))
    return conv(a, w["conv2.kernel"].astype(dtype)), (first, second)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def lean_block(spec: _LayerSpec, x0: Array, weights: tuple[dict, ...]):
    """A dense block in train mode whose backward pass keeps only its history.

    Maps x0 (batch, H, W, c_0) and each layer's weights to the history (batch,
    H, W, c_0 + N k) and the batch statistics every layer used (for the
    running averages). The backward pass walks the layers in reverse,
    recomputes each layer from its slice of the history, and adds the
    gradient it sends to its sources into one gradient buffer of the
    history's width: memory linear in depth, one extra forward in compute.
    """
    return _lean_block_forward(spec, x0, weights)[0]


def _lean_block_forward(spec, x0, weights):
    sources, moments, used = [x0], [layers.batch_moments(x0, spec.axis_name)], []
    for w in weights:
        shared = layers.joined_moments(moments)
        y, stats = _layer(spec, w, jnp.concatenate(sources, axis=-1), shared)
        used.append(stats)
        sources.append(y)
        moments.append(layers.batch_moments(y, spec.axis_name))
    history = jnp.concatenate(sources, axis=-1)
    return (history, tuple(used)), (history, weights, layers.joined_moments(moments))


def _lean_block_backward(spec, saved, cotangents):
    history, weights, moments = saved
    grad = cotangents[0]  # the statistics only feed running averages
    c0 = history.shape[-1] - len(weights) * spec.growth_rate

    def layer_vjp(n, x, w, m, dy):
        _, vjp = jax.vjp(lambda x, w, m: _layer(spec, w, x, m)[0], x, w, m)
        return vjp(dy)

    return layers.recomputed_backward(
        history,
        grad,
        moments,
        weights,
        c0,
        spec.growth_rate,
        layer_vjp,
        spec.axis_name,
    )


lean_block.defvjp(_lean_block_forward, _lean_block_backward)


class DenseLayer(nnx.Module):
    """One dense layer: k new channels from the concatenated history."""

    def __init__(
        self,
        in_channels: int,
        growth_rate: int,  # k
        *,
        bottleneck: bool,
        bottleneck_width: int = 4,
        dropout_rate: float = 0.0,
        activation: str = "relu",
        norm_epsilon: float = 1e-5,
        norm_momentum: float = 0.9,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        norm = dict(epsilon=norm_epsilon, momentum=norm_momentum, dtype=dtype)
        self.bottleneck = bottleneck
        self.activation = activation
        self.norm1 = layers.batch_norm(in_channels, **norm, rngs=rngs)
        if bottleneck:
            width = bottleneck_width * growth_rate
            self.conv1 = layers.pointwise(in_channels, width, dtype=dtype, rngs=rngs)
            self.norm2 = layers.batch_norm(width, **norm, rngs=rngs)
            self.conv2 = layers.conv3x3(width, growth_rate, dtype=dtype, rngs=rngs)
        else:
            self.conv1 = layers.conv3x3(
                in_channels, growth_rate, dtype=dtype, rngs=rngs
            )
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

    def __call__(
        self,
        history: Array | list[Array],
        moments: list[tuple[Array, Array]] | None = None,
        *,
        lean: bool = False,
    ) -> Array:
        """Maps the history (batch, H, W, c_0 + (n-1) k) to (batch, H, W, k).

        `history` is one array, or its sources [x_0, ..., x_{n-1}], which the
        layer concatenates only inside its first read (norm, activation,
        convolution: one fusion). In train mode sources come with their batch
        `moments` [(mean, var), ...], computed once per source by the block.
        `lean` keeps only the sources for the backward pass of that read and
        recomputes the rest there (see `lean_read`).
        """
        act = layers.get_activation(self.activation)
        sources = history if isinstance(history, list) else [history]
        shared = None if moments is None else layers.joined_moments(moments)
        mean, var = self.norm1.statistics(history, shared)
        gain, shift = self.norm1.affine(mean, var, sources[0].dtype)

        if lean:
            kernel = self.conv1.kernel[...].astype(gain.dtype)
            y = lean_read(self.activation, sources, gain, shift, kernel)
        else:
            y = self.conv1(act(jnp.concatenate(sources, axis=-1) * gain + shift))
        y = self.dropout(y)
        if self.bottleneck:
            y = self.dropout(self.conv2(act(self.norm2(y))))
        return y


IMPLEMENTATIONS = ("plain", "shared", "lean", "scan")


class DenseBlock(nnx.Module):
    """N dense layers; returns the whole history [x_0, x_1, ..., x_N].

    `implementation` chooses how, never what (same weights, same outputs and
    gradients to float32 rounding):
      'plain'   the reference: concatenate after every layer, and every layer
                takes the BatchNorm statistics of its whole input;
      'shared'  statistics once per source x_j, shared by every later layer
                (linear instead of quadratic in depth), and no concatenated
                history between layers;
      'lean'    in training, the whole block is one custom VJP (`lean_block`)
                that keeps only the history x_0..x_N and recomputes each layer
                in the backward pass, adding its sources' gradients into one
                buffer (memory-efficient DenseNet): activation memory linear in
                depth for one extra forward pass. With dropout, each layer's
                concatenate-norm-activation-conv read is recomputed instead
                (`lean_read`);
      'scan'    one compiled layer for the whole block (`jax.lax.scan`) over
                weights stored stacked on a layer axis (`StackedLayers`), so
                compile time does not grow with depth, and in training one
                custom VJP (`scanned_block`) that, like 'lean', keeps only the
                history and recomputes each layer backwards: memory linear in
                depth. Checkpoints and `layers.load_weights` still name every
                weight per layer. The price: the history lives in a buffer of
                the block's final width that every layer reads whole (about
                twice the first read's FLOPs), plus lean's extra forward pass.
                No dropout.
    """

    def __init__(
        self,
        in_channels: int,
        num_layers: int,  # N
        growth_rate: int,  # k
        *,
        implementation: str = "plain",
        rngs: nnx.Rngs,
        **layer_kwargs,
    ):
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"implementation must be one of {IMPLEMENTATIONS}, got "
                f"{implementation!r}"
            )
        if implementation == "scan" and layer_kwargs.get("dropout_rate", 0.0) > 0:
            raise ValueError(
                "implementation='scan' runs without dropout; use 'shared' or "
                "'lean' with dropout_rate > 0"
            )
        self.implementation = implementation
        self.growth_rate = growth_rate
        per_layer = [
            DenseLayer(
                in_channels + n * growth_rate, growth_rate, rngs=rngs, **layer_kwargs
            )
            for n in range(num_layers)
        ]
        if implementation == "scan":
            self.layers = StackedLayers(per_layer, growth_rate)
        else:
            self.layers = nnx.List(per_layer)

    def __call__(self, x0: Array) -> Array:
        """Maps (batch, H, W, c_0) to (batch, H, W, c_0 + N k)."""
        if self.implementation == "plain":
            history = x0
            for layer in self.layers:
                history = jnp.concatenate([history, layer(history)], axis=-1)
            return history
        if self.implementation == "scan":
            return self.layers(x0)
        norm = self.layers[0].norm1  # any norm: each reduces over the same axes
        train = not norm.use_running_average
        if self.implementation == "lean" and train and self._no_dropout():
            return self._lean(x0)
        sources, moments = [x0], [norm.moments(x0)] if train else None
        lean = self.implementation == "lean"
        for layer in self.layers:
            y = layer(list(sources), moments, lean=lean)
            sources.append(y)
            if train:
                moments.append(norm.moments(y))
        return jnp.concatenate(sources, axis=-1)

    def _no_dropout(self) -> bool:
        return all(layer.dropout.rate == 0 for layer in self.layers)

    def _lean(self, x0: Array) -> Array:
        """Train mode through `lean_block`; updates the running statistics."""
        first = self.layers[0]
        spec = _LayerSpec(
            activation=first.activation,
            bottleneck=first.bottleneck,
            epsilon=first.norm1.epsilon,
            growth_rate=self.growth_rate,
            dtype=jnp.dtype(first.conv1.dtype or x0.dtype).name,
            axis_name=first.norm1.axis_name,
        )
        weights = tuple(
            {
                name: variable[...]
                for name, variable in layers.named_weights(layer).items()
                if not name.endswith((".mean", ".var"))
            }
            for layer in self.layers
        )
        history, used = lean_block(spec, x0, weights)
        for layer, stats in zip(self.layers, used, strict=True):
            norms = (layer.norm1, layer.norm2) if layer.bottleneck else (layer.norm1,)
            for norm, moments in zip(norms, stats, strict=True):
                norm.statistics(None, moments)
        return history


def _pad_axis(x: Array, axis: int, size: int, fill: float) -> Array:
    """x padded at the end of `axis` to `size` with `fill`."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=fill)


@dataclasses.dataclass(frozen=True)
class _ScanSpec:
    """A scanned block's shape besides its weights (hashable, for jit)."""

    layer: _LayerSpec
    in_channels: int  # c_0
    num_layers: int  # N

    @property
    def width(self) -> int:
        return self.in_channels + self.num_layers * self.layer.growth_rate

    def channels(self, n):
        """c_0 + n k: what layer n reads, where it writes x_{n+1}."""
        return self.in_channels + n * self.layer.growth_rate


_HISTORY_READERS = ("norm1.scale", "norm1.bias", "conv1.kernel")


def _masked(spec: _ScanSpec, n, w: dict) -> dict:
    """Layer n's stacked-slice weights with the history's padding zeroed."""
    mask = jnp.arange(spec.width) < spec.channels(n)
    return w | {
        name: w[name] * (mask[:, None] if name == "conv1.kernel" else mask)
        for name in _HISTORY_READERS
        if name in w
    }


def _write(spec: _ScanSpec, n, buffer: Array, y: Array, moments: tuple):
    """The buffer with x_{n+1} = y written in, and its moments with y's."""
    offset = spec.channels(n)
    buffer = jax.lax.dynamic_update_slice_in_dim(
        buffer, y.astype(buffer.dtype), offset, axis=3
    )
    if moments is not None:
        new = layers.batch_moments(y, spec.layer.axis_name)
        moments = tuple(
            jax.lax.dynamic_update_slice_in_dim(m, v, offset, 0)
            for m, v in zip(moments, new, strict=True)
        )
    return buffer, moments


def _padded_buffer(spec: _ScanSpec, x0: Array) -> Array:
    pad = spec.width - spec.in_channels
    return jnp.pad(x0, ((0, 0), (0, 0), (0, 0), (0, pad)))


def _scan_eval(spec: _ScanSpec, x0: Array, weights: dict) -> Array:
    """A scanned block with running statistics: (batch, H, W, c_0) -> history."""
    act, dtype = layers.get_activation(spec.layer.activation), spec.layer.dtype
    epsilon = spec.layer.epsilon

    def step(buffer, inputs):
        n, w = inputs
        w = _masked(spec, n, w)
        running = (w["norm1.mean"], w["norm1.var"])
        a = act(_normalise(buffer.astype(dtype), w, "norm1", epsilon, running, dtype))
        y = _conv(a, w["conv1.kernel"].astype(dtype))
        if spec.layer.bottleneck:
            running = (w["norm2.mean"], w["norm2.var"])
            a = act(_normalise(y, w, "norm2", epsilon, running, dtype))
            y = _conv(a, w["conv2.kernel"].astype(dtype))
        return _write(spec, n, buffer, y, None)[0], None

    steps = (jnp.arange(spec.num_layers), weights)
    return jax.lax.scan(step, _padded_buffer(spec, x0), steps)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def scanned_block(spec: _ScanSpec, x0: Array, weights: dict):
    """A scanned dense block in train mode, memory linear in depth.

    Maps x0 (batch, H, W, c_0) and the stacked weights {name: (N, ...)} to the
    history (batch, H, W, W) and the batch statistics every layer used,
    stacked ((N, W) means and variances of norm1, (N, 4k) of norm2). Like
    `lean_block`, but both passes are one scan: the backward pass keeps only
    the history and walks the layers in reverse, recomputing layer n from the
    whole history (its masked weights ignore what it did not read) and adding
    its gradient into one buffer.
    """
    return _scanned_forward(spec, x0, weights)[0]


def _scanned_forward(spec, x0, weights):
    mean0, var0 = layers.batch_moments(x0, spec.layer.axis_name)
    pad = spec.width - spec.in_channels
    moments = (jnp.pad(mean0, (0, pad)), jnp.pad(var0, (0, pad), constant_values=1))

    def step(carry, inputs):
        buffer, moments = carry
        n, w = inputs
        y, used = _layer(spec.layer, _masked(spec, n, w), buffer, moments)
        return _write(spec, n, buffer, y, moments), used

    carry = (_padded_buffer(spec, x0), moments)
    (history, moments), used = jax.lax.scan(
        step, carry, (jnp.arange(spec.num_layers), weights)
    )
    return (history, used), (history, weights, moments)


def _scanned_backward(spec, saved, cotangents):
    history, weights, moments = saved
    dtype, k = jnp.dtype(spec.layer.dtype), spec.layer.growth_rate

    def step(carry, inputs):
        grad, dmoments = carry
        n, w = inputs

        def new(a, axis):  # x_{n+1}'s channels of a
            return jax.lax.dynamic_slice_in_dim(a, spec.channels(n), k, axis)

        part = tuple(new(d, 0) for d in dmoments)
        dy = layers.with_moment_grads(
            new(history, 3), new(grad, 3), part, spec.layer.axis_name
        )

        def layer(x, w, m):
            w = _masked(spec, n, w)
            return _layer(spec.layer, w, x, m, conv=_conv_in_loop)[0]

        _, layer_vjp = jax.vjp(layer, history, w, moments)
        dx, dw, dm = layer_vjp(dy.astype(dtype))
        dmoments = tuple(d + e for d, e in zip(dmoments, dm, strict=True))
        return (grad + dx.astype(grad.dtype), dmoments), dw

    steps = (jnp.arange(spec.num_layers), weights)
    carry = (cotangents[0], tuple(jnp.zeros_like(m) for m in moments))
    (grad, dmoments), dweights = jax.lax.scan(step, carry, steps, reverse=True)
    c0 = spec.in_channels
    part = tuple(d[:c0] for d in dmoments)
    dx0 = layers.with_moment_grads(
        history[..., :c0], grad[..., :c0], part, spec.layer.axis_name
    )
    return dx0, dweights


scanned_block.defvjp(_scanned_forward, _scanned_backward)


class StackedLayers(layers.Stacked):
    """A dense block's N layers with every weight stacked on a layer axis.

    Each weight is stored once for the block, e.g. norm1.scale (N, W) and
    conv1.kernel (N, W, 4k) for W = c_0 + N k: what reads the history (norm1,
    conv1's input axis) is zero-padded from layer n's c_0 + n k channels to W,
    and the padding is masked when the layer runs, so it neither contributes
    nor receives gradient. Per-layer names and shapes ('3.norm1.scale' of shape
    (c_0 + 3k,)) come out of `unstack` and go in through `stack`.
    """

    def __init__(self, per_layer: Sequence[DenseLayer], growth_rate: int):
        first = per_layer[0]
        self.num_layers = len(per_layer)
        self.growth_rate = growth_rate
        self.in_channels = first.norm1.num_features
        self.width = self.in_channels + self.num_layers * growth_rate
        # Plain attributes, not one stored _LayerSpec: train()/eval() and the
        # trainer's pmap axis set use_running_average and axis_name on every
        # module that has them; _spec() packs the current values per call.
        self.bottleneck, self.activation = first.bottleneck, first.activation
        self.epsilon, self.momentum = first.norm1.epsilon, first.norm1.momentum
        self.dtype = first.conv1.dtype
        self.axis_name = first.norm1.axis_name
        self.use_running_average = first.norm1.use_running_average
        kinds = {k: type(v) for k, v in layers.named_weights(first).items()}
        values = {
            f"{n}.{k}": v[...]
            for n, layer in enumerate(per_layer)
            for k, v in layers.named_weights(layer).items()
        }
        for name, value in self.stack(values).items():
            module, leaf = name.split(".")
            if not hasattr(self, module):
                setattr(self, module, _Weights())
            setattr(getattr(self, module), leaf, kinds[name](value))

    def __len__(self) -> int:
        return self.num_layers

    @staticmethod
    def _history_axis(name: str, ndim: int) -> int | None:
        """The axis of a per-layer weight that reads the history, if any."""
        if name.startswith("norm1."):
            return 0
        return ndim - 2 if name == "conv1.kernel" else None

    def stack(self, per_layer: dict) -> dict:
        """{'n.name': per-layer array} -> {'name': (N, ...) array}, zero-padded
        (variances with ones) on the history axis to the block's width."""
        stacked = {}
        for name in sorted({k.split(".", 1)[1] for k in per_layer}):
            values = [per_layer[f"{n}.{name}"] for n in range(self.num_layers)]
            axis = self._history_axis(name, jnp.ndim(values[0]))
            if axis is not None:
                fill = 1.0 if name == "norm1.var" else 0.0
                values = [_pad_axis(v, axis, self.width, fill) for v in values]
            stacked[name] = jnp.stack(values)
        return stacked

    def unstack(self, stored: dict) -> dict:
        """{'name': (N, ...) array} -> {'n.name': layer n's array, unpadded}."""
        out = {}
        for name, value in stored.items():
            axis = self._history_axis(name, jnp.ndim(value) - 1)
            for n in range(self.num_layers):
                part = value[n]
                if axis is not None:
                    index = [slice(None)] * part.ndim
                    index[axis] = slice(0, self.in_channels + n * self.growth_rate)
                    part = part[tuple(index)]
                out[f"{n}.{name}"] = part
        return out

    def _spec(self, dtype) -> "_ScanSpec":
        layer = _LayerSpec(
            activation=self.activation,
            bottleneck=self.bottleneck,
            epsilon=self.epsilon,
            growth_rate=self.growth_rate,
            dtype=jnp.dtype(self.dtype or dtype).name,
            axis_name=self.axis_name,
        )
        return _ScanSpec(layer, self.in_channels, self.num_layers)

    def __call__(self, x0: Array) -> Array:
        """Maps (batch, H, W, c_0) to the history (batch, H, W, c_0 + N k)."""
        spec = self._spec(x0.dtype)
        weights = {k: v[...] for k, v in layers.named_weights(self).items()}
        if self.use_running_average:
            return _scan_eval(spec, x0, weights)
        params = {k: v for k, v in weights.items() if not k.endswith((".mean", ".var"))}
        history, used = scanned_block(spec, x0, params)
        self._update_running(used)
        return history

    def _update_running(self, used: tuple) -> None:
        """Every layer's running statistics from the batch statistics it used,
        in one update per stacked statistic (padding keeps mean 0, var 1)."""
        keep = self.momentum
        for prefix, (mean, var) in zip(("norm1", "norm2"), used, strict=False):
            norm = getattr(self, prefix)
            for stat, batch in ((norm.mean, mean), (norm.var, var)):
                batch = jax.lax.stop_gradient(batch)
                stat.set_value(keep * stat[...] + (1 - keep) * batch)


class _Weights(nnx.Module):
    """A namespace of stacked variables (StackedLayers' norm1, conv1, ...)."""


class Transition(nnx.Module):
    """BN-ReLU-Conv1x1 to `out_channels`, then 2x2 average pooling."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        activation: str = "relu",
        norm_epsilon: float = 1e-5,
        norm_momentum: float = 0.9,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        self.activation = activation
        self.norm = layers.batch_norm(
            in_channels,
            epsilon=norm_epsilon,
            momentum=norm_momentum,
            dtype=dtype,
            rngs=rngs,
        )
        self.conv = layers.pointwise(in_channels, out_channels, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        """Maps (batch, H, W, C) to (batch, H // 2, W // 2, out_channels)."""
        act = layers.get_activation(self.activation)
        y = self.conv(act(self.norm(x)))
        return nnx.avg_pool(y, window_shape=(2, 2), strides=(2, 2))


class Stem(nnx.Module):
    """The first convolution: 'cifar' (3x3) or 'imagenet' (7x7/2, BN, max pool)."""

    def __init__(
        self,
        kind: str,
        in_channels: int,
        out_channels: int,
        *,
        norm: bool = True,  # the ImageNet stem's BN; DNL nets with norm='none' drop it
        activation: str = "relu",
        norm_epsilon: float = 1e-5,
        norm_momentum: float = 0.9,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        if kind not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {kind!r}")
        self.kind = kind
        self.activation = activation
        if kind == "cifar":
            self.conv = layers.conv3x3(
                in_channels, out_channels, dtype=dtype, rngs=rngs
            )
            return
        self.conv = nnx.Conv(
            in_channels,
            out_channels,
            kernel_size=(7, 7),
            strides=(2, 2),
            padding=((3, 3), (3, 3)),
            use_bias=False,
            kernel_init=layers.he_normal,
            dtype=dtype,
            rngs=rngs,
        )
        self.norm = (
            layers.batch_norm(
                out_channels,
                epsilon=norm_epsilon,
                momentum=norm_momentum,
                dtype=dtype,
                rngs=rngs,
            )
            if norm
            else None
        )

    @property
    def downsampling(self) -> int:
        """How many times smaller the stem's output is than its input."""
        return 1 if self.kind == "cifar" else 4

    def __call__(self, x: Array) -> Array:
        """Maps (batch, H, W, in) to (batch, H / s, W / s, out), s = downsampling."""
        y = self.conv(x)
        if self.kind == "cifar":
            return y
        if self.norm is not None:
            y = self.norm(y)
        y = layers.get_activation(self.activation)(y)
        # Padding with -inf keeps the max exact; after ReLU, zero padding (as in
        # Keras) gives the same result.
        y = jnp.pad(y, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
        return nnx.max_pool(y, window_shape=(3, 3), strides=(2, 2))


class DenseNet(nnx.Module):
    """Stem, dense blocks joined by transitions, BN-ReLU, global pool, classifier.

    Args:
      block_config: layers per dense block, e.g. (6, 12, 24, 16).
      growth_rate: k, channels each layer adds.
      num_init_features: channels out of the stem (2k for CIFAR DenseNet-BC).
      bottleneck: use the B layer (1x1 to bottleneck_width * k, then 3x3).
      compression: theta; a transition keeps floor(theta * C) channels.
      stem: 'cifar' or 'imagenet'.
      in_channels: image channels (1 for Fashion-MNIST, 3 for RGB).
      num_classes: outputs of the classifier.
      implementation: how dense blocks run ('plain', 'shared', 'lean', 'scan';
        see DenseBlock). Weights by per-layer name (`layers.weight_values`) and
        shipped checkpoints are the same for every choice; 'scan' stores them
        stacked per block.
    """

    def __init__(
        self,
        *,
        block_config: Sequence[int],
        growth_rate: int,
        num_init_features: int,
        bottleneck: bool = True,
        bottleneck_width: int = 4,
        compression: float = 0.5,  # theta
        stem: str = "cifar",
        in_channels: int = 3,
        num_classes: int = 10,
        dropout_rate: float = 0.0,
        activation: str = "relu",
        norm_epsilon: float = 1e-5,
        norm_momentum: float = 0.9,
        dtype=None,
        implementation: str = "plain",
        rngs: nnx.Rngs,
    ):
        # The constructor arguments, so that a saved model can be rebuilt.
        self.config = {k: v for k, v in locals().items() if k not in ("self", "rngs")}
        self.config["block_config"] = tuple(block_config)
        _check_architecture(block_config, growth_rate, compression, num_classes)
        layers.get_activation(activation)
        common = dict(
            activation=activation,
            norm_epsilon=norm_epsilon,
            norm_momentum=norm_momentum,
            dtype=dtype,
        )
        self.in_channels = in_channels
        self.activation = activation
        self.stem = Stem(stem, in_channels, num_init_features, **common, rngs=rngs)

        blocks, transitions = [], []
        channels = num_init_features
        for b, num_layers in enumerate(block_config):
            blocks.append(
                DenseBlock(
                    channels,
                    num_layers,
                    growth_rate,
                    bottleneck=bottleneck,
                    bottleneck_width=bottleneck_width,
                    dropout_rate=dropout_rate,
                    implementation=implementation,
                    **common,
                    rngs=rngs,
                )
            )
            channels += num_layers * growth_rate
            if b < len(block_config) - 1:
                out = int(compression * channels)
                transitions.append(Transition(channels, out, **common, rngs=rngs))
                channels = out
        self.blocks = nnx.List(blocks)
        self.transitions = nnx.List(transitions)
        self.norm_final = layers.batch_norm(
            channels,
            epsilon=norm_epsilon,
            momentum=norm_momentum,
            dtype=dtype,
            rngs=rngs,
        )
        self.classifier = layers.classifier(
            channels, num_classes, dtype=dtype, rngs=rngs
        )
        self.num_features = channels

    @property
    def min_input_size(self) -> int:
        """Smallest height and width that every pooling stage can halve."""
        return self.stem.downsampling * 2 ** len(self.transitions)

    def features(self, x: Array) -> Array:
        """Maps images (batch, H, W, in) to pooled features (batch, num_features)."""
        layers.check_images(
            x,
            in_channels=self.in_channels,
            min_size=self.min_input_size,
            model=type(self).__name__,
        )
        y = self.stem(x)
        for b, block in enumerate(self.blocks):
            y = block(y)
            if b < len(self.transitions):
                y = self.transitions[b](y)
        y = layers.get_activation(self.activation)(self.norm_final(y))
        return jnp.mean(y, axis=(1, 2))

    def __call__(self, x: Array) -> Array:
        """Maps images (batch, H, W, in) to logits (batch, num_classes)."""
        return self.classifier(self.features(x))


def _check_architecture(block_config, growth_rate, compression, num_classes):
    if not block_config or any(int(n) < 1 for n in block_config):
        raise ValueError(
            f"block_config needs at least one block of at least one layer, "
            f"got {tuple(block_config)}"
        )
    if growth_rate < 1:
        raise ValueError(f"growth_rate must be positive, got {growth_rate}")
    if not 0.0 < compression <= 1.0:
        raise ValueError(f"compression (theta) must be in (0, 1], got {compression}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")


def cifar_block_config(depth: int, bottleneck: bool) -> tuple[int, int, int]:
    """Layers per block of the 3-block CIFAR DenseNet of total depth L.

    L counts the stem, the convolutions of every layer, the two transitions and
    the classifier: (L - 4) / 3 layers per block, halved for bottleneck layers,
    which hold two convolutions each.
    """
    per_block, rest = divmod(depth - 4, 6 if bottleneck else 3)
    if rest or per_block < 1:
        step = "6n + 4" if bottleneck else "3n + 4"
        raise ValueError(
            f"a CIFAR DenseNet{'-BC' if bottleneck else ''} needs depth L = {step} "
            f"for a whole number n >= 1 of layers per block, got L = {depth}"
        )
    return (per_block,) * 3


def cifar_densenet(
    depth: int,  # L
    growth_rate: int,  # k
    *,
    bottleneck: bool,
    compression: float,
    **kwargs,
) -> DenseNet:
    """The CIFAR DenseNet of the paper: 3 blocks, stem of 16 (or 2k for BC)."""
    defaults = dict(
        block_config=cifar_block_config(depth, bottleneck),
        growth_rate=growth_rate,
        num_init_features=2 * growth_rate if bottleneck else 16,
        bottleneck=bottleneck,
        compression=compression,
        stem="cifar",
    )
    return DenseNet(**(defaults | kwargs))
