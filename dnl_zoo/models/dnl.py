"""Dense non-local (DNL) networks in Flax NNX, NHWC.

A DNL block builds the history x_0, x_1, ..., x_N (depth N, horizon T, step
h = T / N, growth rate k) by the equation (DNL) of docs/dnl.md:

    x_n = G_n[ sigma(norm(x_0)) ] + h * sum_{j=1}^{n-1} K_{n,j}[ sigma(norm(x_j)) ]

The input term G_n is not scaled. Because a linear transform of a channel
concatenation is the sum of per-source transforms, the right-hand side is ONE
transform of the concatenated, normalised, activated history whose channels of
x_1..x_{n-1} are multiplied by h: DenseNet's computation with a channel scale.
`depth_scale='none'` gives h = 1, and with the local 3x3 transform and
BatchNorm the block is exactly a DenseNet block.

The transform K is 'local' (3x3 convolution), a non-local kernel of
`non_local.KERNELS`, or 'local+<kernel>' (their sum). Bottleneck layers put a
1x1 aggregation A first: x_n = K_n[sigma(norm(A_n[h-weighted history]))].
Transitions and the classifier read the whole history with the same weighting.
"""

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dnl_zoo.models import layers
from dnl_zoo.models.densenet import Stem
from dnl_zoo.models.non_local import KERNELS, NonLocal

Array = jax.Array
DEPTH_SCALES = ("step", "none")
NORMS = ("batch", "none")


def step_size(horizon: float, num_layers: int, depth_scale: str) -> float:
    """h = T / N for depth_scale 'step', 1 for 'none'."""
    if depth_scale not in DEPTH_SCALES:
        raise ValueError(
            f"depth_scale must be one of {DEPTH_SCALES}, got {depth_scale!r}"
        )
    return horizon / num_layers if depth_scale == "step" else 1.0


def history_scale(c0: int, num_sources: int, growth_rate: int, h: float) -> np.ndarray:
    """Per-channel weights of a history [x_0, x_1..x_m]: 1 for x_0, h after.

    A numpy constant: it folds into the traced program, and eager calls build
    no XLA program for it.

    Returns:
      (c0 + num_sources * growth_rate,) float32.
    """
    scale = np.full(c0 + num_sources * growth_rate, h, np.float32)
    scale[:c0] = 1.0
    return scale


class Norm(nnx.Module):
    """BatchNorm for norm='batch'; the identity (no parameters) for 'none'."""

    def __init__(self, num_features: int, *, norm: str, **batch_norm_kwargs):
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.batch = (
            layers.BatchNorm(num_features, **batch_norm_kwargs)
            if norm == "batch"
            else None
        )

    def __call__(self, x: Array, moments: tuple | None = None) -> Array:
        """Maps (..., C) to (..., C); `moments` as in `layers.BatchNorm`."""
        return x if self.batch is None else self.batch(x, moments)


def parse_transform(transform: str) -> tuple[bool, str | None]:
    """'local' -> (True, None); 'dot_product' -> (False, 'dot_product'); and
    'local+dot_product' -> (True, 'dot_product'). Unknown names are an error."""
    parts = transform.split("+")
    local = parts[0] == "local"
    kernel = parts[-1] if parts[-1] != "local" else None
    valid = (
        (parts == ["local"])
        or (len(parts) == 1 and kernel in KERNELS)
        or (len(parts) == 2 and local and kernel in KERNELS)
    )
    if not valid:
        raise ValueError(
            f"unknown transform {transform!r}; expected 'local', one of {KERNELS}, "
            "or 'local+<kernel>'"
        )
    return local, kernel


class Transform(nnx.Module):
    """The feature transformation K: local 3x3, non-local, or their sum."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        transform: str = "local",
        embed_features: int | None = None,
        num_heads: int = 1,
        pool: int = 1,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        local, kernel = parse_transform(transform)
        self.conv = (
            layers.conv3x3(in_features, out_features, dtype=dtype, rngs=rngs)
            if local
            else None
        )
        self.non_local = (
            NonLocal(
                in_features,
                out_features,
                kernel=kernel,
                # NOTE: a width fixed across layers (k by default), not a share
                # of the growing input, so that the weights form fields in depth.
                embed_features=embed_features or out_features,
                num_heads=num_heads,
                pool=pool,
                dtype=dtype,
                rngs=rngs,
            )
            if kernel is not None
            else None
        )

    @property
    def history_params(self) -> dict[str, int]:
        """Param paths whose given axis runs over the input channels."""
        axes = {"conv.kernel": 2} if self.conv is not None else {}
        if self.non_local is not None:
            axes |= {f"non_local.{p}": 0 for p in self.non_local.history_params}
        return axes

    def __call__(self, u: Array) -> Array:
        """Maps (batch, H, W, in) to (batch, H, W, out)."""
        y = 0.0
        if self.conv is not None:
            y = self.conv(u)
        if self.non_local is not None:
            y = y + self.non_local(u)
        return y


class DNLLayer(nnx.Module):
    """Layer n of a DNL block: k channels from the h-weighted history x_0..x_{n-1}.

    Args:
      c0: channels of the block input x_0.
      index: n, from 1; the layer reads n - 1 earlier layers besides x_0.
      growth_rate: k.
      h: the step (1 for the unscaled family).
    """

    def __init__(
        self,
        c0: int,
        index: int,
        growth_rate: int,  # k
        h: float,
        *,
        bottleneck: bool = False,
        bottleneck_width: int = 4,
        norm: str = "batch",
        activation: str = "relu",
        dropout_rate: float = 0.0,
        norm_epsilon: float = 1e-5,
        norm_momentum: float = 0.9,
        dtype=None,
        rngs: nnx.Rngs,
        **transform_kwargs,
    ):
        self.c0, self.index, self.growth_rate, self.h = c0, index, growth_rate, h
        self.bottleneck = bottleneck
        self.activation = activation
        in_channels = c0 + (index - 1) * growth_rate
        norm_kwargs = dict(
            norm=norm, epsilon=norm_epsilon, momentum=norm_momentum, dtype=dtype
        )
        self.norm1 = Norm(in_channels, **norm_kwargs)
        width = in_channels
        if bottleneck:
            width = bottleneck_width * growth_rate
            self.aggregate = layers.pointwise(
                in_channels, width, dtype=dtype, rngs=rngs
            )
            self.norm2 = Norm(width, **norm_kwargs)
        self.transform = Transform(
            width, growth_rate, dtype=dtype, rngs=rngs, **transform_kwargs
        )
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

    @property
    def history_params(self) -> dict[str, int]:
        """Param and statistic paths whose given axis runs over the history."""
        axes = {}
        if self.norm1.batch is not None:
            axes = {f"norm1.batch.{p}": 0 for p in ("scale", "bias", "mean", "var")}
        if self.bottleneck:
            return axes | {"aggregate.kernel": 0}
        return axes | {
            f"transform.{p}": a for p, a in self.transform.history_params.items()
        }

    def __call__(self, history: Array, moments: tuple | None = None) -> Array:
        """Maps (batch, H, W, c0 + (n-1) k) history to (batch, H, W, k).

        `moments` ((C,), (C,)) are the history's batch moments when the block
        computed them once per source (train mode, 'shared'); otherwise
        norm1 takes them here.
        """
        act = layers.get_activation(self.activation)
        scale = history_scale(self.c0, self.index - 1, self.growth_rate, self.h)
        u = act(self.norm1(history, moments)) * scale.astype(history.dtype)
        if self.bottleneck:
            u = self.dropout(self.aggregate(u))
            u = act(self.norm2(u))
        return self.dropout(self.transform(u))


def _apply(graphdef, params, rest, history: Array, moments):
    """A DNL layer as a pure function: (y (batch, H, W, k), its new state)."""
    layer = nnx.merge(graphdef, params, rest)
    y = layer(history, moments)
    return y, nnx.state(layer, nnx.Not(nnx.Param))


def _zero_cotangent(x):
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


@dataclasses.dataclass(frozen=True)
class _LeanSpec:
    """What a lean DNL block computes besides its arrays (hashable, for jit)."""

    graphdefs: tuple  # one nnx.GraphDef per layer
    axis_name: str | None  # of the batch moments (a pmap axis), if any
    batch_norm: bool  # False for norm='none': no moments at all
    c0: int
    growth_rate: int  # k

    def moments(self, x: Array):
        """(mean, var) of x (batch, H, W, c) per channel, or None."""
        return layers.batch_moments(x, self.axis_name) if self.batch_norm else None

    def joined(self, moments: list):
        return layers.joined_moments(moments) if self.batch_norm else None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def lean_block(spec: _LeanSpec, x0: Array, params: tuple, rests: tuple):
    """A DNL block in train mode whose backward pass keeps only its history.

    Maps x0 (batch, H, W, c0) and each layer's parameters and other state
    (`nnx.split(layer, nnx.Param, ...)`) to the history (batch, H, W, c0 + N k)
    and each layer's new state (running statistics). Each source's batch
    moments are taken once, as in 'shared'. The backward pass walks the layers
    in reverse, recomputes each from its slice of the history, and adds its
    sources' gradients into one buffer: memory linear in depth, the (HW x HW)
    affinities of non-local transforms included, for one extra forward pass.
    """
    return _lean_forward(spec, x0, params, rests)[0]


def _lean_forward(spec, x0, params, rests):
    sources, moments, new_rests = [x0], [spec.moments(x0)], []
    for graphdef, p, rest in zip(spec.graphdefs, params, rests, strict=True):
        history = jnp.concatenate(sources, axis=-1)
        y, rest = _apply(graphdef, p, rest, history, spec.joined(moments))
        new_rests.append(rest)
        sources.append(y)
        moments.append(spec.moments(y))
    history = jnp.concatenate(sources, axis=-1)
    return (history, tuple(new_rests)), (history, params, rests, spec.joined(moments))


def _lean_backward(spec, saved, cotangents):
    history, params, rests, moments = saved
    grad = cotangents[0]  # the new state only feeds running averages

    def layer_vjp(n, x, p, m, dy):
        def layer(x, p, rest, m):
            return _apply(spec.graphdefs[n], p, rest, x, m)[0]

        _, vjp = jax.vjp(layer, x, p, rests[n], m)
        dx, dp, _, dm = vjp(dy)
        return dx, dp, dm

    dx0, dparams = layers.recomputed_backward(
        history,
        grad,
        moments,
        params,
        spec.c0,
        spec.growth_rate,
        layer_vjp,
        spec.axis_name,
    )
    return dx0, dparams, jax.tree.map(_zero_cotangent, rests)


lean_block.defvjp(_lean_forward, _lean_backward)


IMPLEMENTATIONS = ("plain", "shared", "lean")


class DNLBlock(nnx.Module):
    """N DNL layers at step h; returns the whole history [x_0, x_1, ..., x_N].

    `implementation` chooses how, never what (the same weights, outputs and
    gradients to float32 rounding): 'plain' lets every layer take the batch
    statistics of its whole input (quadratic in depth); 'shared' computes each
    source's once and shares them between the layers that read it, as
    DenseNet's 'shared' block does; 'lean' shares them too, and in training
    the block is one custom VJP (`lean_block`) whose backward pass keeps only
    the history and recomputes each layer: activation memory linear in depth
    (non-local affinities included) for one extra forward pass. 'lean' takes
    no dropout.
    """

    def __init__(
        self,
        c0: int,
        num_layers: int,  # N
        growth_rate: int,  # k
        *,
        horizon: float = 1.0,  # T
        depth_scale: str = "step",
        implementation: str = "plain",
        rngs: nnx.Rngs,
        **layer_kwargs,
    ):
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"a DNL block's implementation must be one of {IMPLEMENTATIONS}, "
                f"got {implementation!r}"
            )
        if implementation == "lean" and layer_kwargs.get("dropout_rate", 0.0) > 0:
            raise ValueError(
                "a DNL block with implementation='lean' runs without dropout; use "
                "'shared' with dropout_rate > 0"
            )
        self.implementation = implementation
        self.c0, self.num_layers, self.growth_rate = c0, num_layers, growth_rate
        self.h = step_size(horizon, num_layers, depth_scale)  # h = T / N
        self.layers = nnx.List(
            [
                DNLLayer(c0, n, growth_rate, self.h, rngs=rngs, **layer_kwargs)
                for n in range(1, num_layers + 1)
            ]
        )

    @property
    def out_channels(self) -> int:
        """c0 + N k."""
        return self.c0 + self.num_layers * self.growth_rate

    def output_scale(self) -> np.ndarray:
        """How transitions and the classifier weight the history: (c0 + N k,)."""
        return history_scale(self.c0, self.num_layers, self.growth_rate, self.h)

    def __call__(self, x0: Array) -> Array:
        """Maps (batch, H, W, c0) to (batch, H, W, c0 + N k)."""
        norm = self.layers[0].norm1.batch  # any: each reduces over the same axes
        train = norm is None or not norm.use_running_average
        if self.implementation == "lean" and train:
            return self._lean(x0)
        shared = self.implementation == "shared" and norm is not None
        shared = shared and not norm.use_running_average
        sources, moments = [x0], [norm.moments(x0)] if shared else None
        for layer in self.layers:
            given = layers.joined_moments(moments) if shared else None
            y = layer(jnp.concatenate(sources, axis=-1), given)
            sources.append(y)
            if shared:
                moments.append(norm.moments(y))
        return jnp.concatenate(sources, axis=-1)

    def _lean(self, x0: Array) -> Array:
        """Train mode through `lean_block`; updates the running statistics."""
        norm = self.layers[0].norm1.batch
        graphdefs, params, rests = zip(
            *(nnx.split(layer, nnx.Param, ...) for layer in self.layers), strict=True
        )
        spec = _LeanSpec(
            graphdefs=graphdefs,
            axis_name=None if norm is None else norm.axis_name,
            batch_norm=norm is not None,
            c0=self.c0,
            growth_rate=self.growth_rate,
        )
        history, rests = lean_block(spec, x0, params, rests)
        for layer, rest in zip(self.layers, rests, strict=True):
            nnx.update(layer, rest)
        return history


class DNLTransition(nnx.Module):
    """norm-act, the block's h weighting, Conv1x1 to `out_channels`, 2x2 pool."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        norm: str = "batch",
        activation: str = "relu",
        norm_epsilon: float = 1e-5,
        norm_momentum: float = 0.9,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        self.activation = activation
        self.norm = Norm(
            in_channels,
            norm=norm,
            epsilon=norm_epsilon,
            momentum=norm_momentum,
            dtype=dtype,
        )
        self.conv = layers.pointwise(in_channels, out_channels, dtype=dtype, rngs=rngs)

    def __call__(self, history: Array, scale: Array) -> Array:
        """Maps (batch, H, W, C) and its (C,) weights to (batch, H/2, W/2, out)."""
        act = layers.get_activation(self.activation)
        y = self.conv(act(self.norm(history)) * scale.astype(history.dtype))
        return nnx.avg_pool(y, window_shape=(2, 2), strides=(2, 2))


class DNLNet(nnx.Module):
    """Stem, DNL blocks joined by transitions, norm-act, pool, classifier.

    Transitions and the classifier weight each block's history as the block
    does (1 for x_0, h for x_1..x_N), so that in the scaled family they too
    read a Riemann sum over the layers.

    Args:
      block_config: layers per block N_b, e.g. (8, 8, 8).
      growth_rate: k.
      num_init_features: channels out of the stem (c0 of the first block).
      horizon: T of every block.
      depth_scale: 'step' (h = T / N) or 'none' (h = 1, DenseNet).
      transform: 'local', a non-local kernel, or 'local+<kernel>'; one for
        every block, or a sequence with one per block.
      pool: key/value pooling of the non-local transform, one or one per block.
      norm: 'batch' or 'none'.
      compression: theta of the transitions.
      transition_features: channels out of every transition. None keeps
        DenseNet's floor(theta * C), which grows with depth; depth transfer
        needs a fixed width, so the depth-sweep presets set it.
      implementation: how blocks take their batch statistics and what their
        backward pass keeps ('plain', 'shared' or 'lean'; see DNLBlock); the
        same weights and results either way.
    """

    def __init__(
        self,
        *,
        block_config: Sequence[int],
        growth_rate: int,
        num_init_features: int,
        horizon: float = 1.0,  # T
        depth_scale: str = "step",
        transform: str | Sequence[str] = "local",
        embed_features: int | None = None,
        num_heads: int = 1,
        pool: int | Sequence[int] = 1,
        norm: str = "batch",
        bottleneck: bool = False,
        bottleneck_width: int = 4,
        compression: float = 1.0,  # theta
        transition_features: int | None = None,
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
        # The constructor arguments, so that depth transfer can rebuild the
        # network at another depth.
        self.config = {k: v for k, v in locals().items() if k not in ("self", "rngs")}
        self.config["block_config"] = tuple(block_config)
        transforms = _per_block(transform, block_config, "transform")
        pools = _per_block(pool, block_config, "pool")
        for name in transforms:
            parse_transform(name)
        layers.get_activation(activation)
        common = dict(
            activation=activation,
            norm_epsilon=norm_epsilon,
            norm_momentum=norm_momentum,
            dtype=dtype,
        )
        self.in_channels = in_channels
        self.activation = activation
        self.stem = Stem(
            stem,
            in_channels,
            num_init_features,
            norm=norm == "batch",
            **common,
            rngs=rngs,
        )
        layer_kwargs = dict(
            embed_features=embed_features,
            num_heads=num_heads,
            norm=norm,
            bottleneck=bottleneck,
            bottleneck_width=bottleneck_width,
            dropout_rate=dropout_rate,
            **common,
        )
        blocks, transitions = [], []
        channels = num_init_features
        for b, num_layers in enumerate(block_config):
            block = DNLBlock(
                channels,
                num_layers,
                growth_rate,
                horizon=horizon,
                depth_scale=depth_scale,
                implementation=implementation,
                transform=transforms[b],
                pool=pools[b],
                rngs=rngs,
                **layer_kwargs,
            )
            blocks.append(block)
            channels = block.out_channels
            if b < len(block_config) - 1:
                out = transition_features or int(compression * channels)
                transitions.append(
                    DNLTransition(channels, out, norm=norm, **common, rngs=rngs)
                )
                channels = out
        self.blocks = nnx.List(blocks)
        self.transitions = nnx.List(transitions)
        self.norm_final = Norm(
            channels,
            norm=norm,
            epsilon=norm_epsilon,
            momentum=norm_momentum,
            dtype=dtype,
        )
        self.classifier = layers.classifier(
            channels, num_classes, dtype=dtype, rngs=rngs
        )
        self.num_features = channels

    @property
    def min_input_size(self) -> int:
        """Smallest height and width that every pooling stage can halve."""
        return self.stem.downsampling * 2 ** len(self.transitions)

    def histories(self, x: Array) -> list[Array]:
        """The history of every block: (batch, H_b, W_b, c0_b + N_b k) each."""
        layers.check_images(
            x,
            in_channels=self.in_channels,
            min_size=self.min_input_size,
            model=type(self).__name__,
        )
        y = self.stem(x)
        out = []
        for b, block in enumerate(self.blocks):
            out.append(block(y))
            if b < len(self.transitions):
                y = self.transitions[b](out[-1], block.output_scale())
        return out

    def features(self, x: Array) -> Array:
        """Maps images (batch, H, W, in) to pooled features (batch, num_features)."""
        history = self.histories(x)[-1]
        act = layers.get_activation(self.activation)
        scale = self.blocks[-1].output_scale().astype(history.dtype)
        return jnp.mean(act(self.norm_final(history)) * scale, axis=(1, 2))

    def __call__(self, x: Array) -> Array:
        """Maps images (batch, H, W, in) to logits (batch, num_classes)."""
        return self.classifier(self.features(x))


def _per_block(value, block_config: Sequence[int], name: str) -> tuple:
    """`value` repeated for every block, or checked to have one per block."""
    if isinstance(value, (str, int)):
        return (value,) * len(block_config)
    value = tuple(value)
    if len(value) != len(block_config):
        raise ValueError(
            f"{name} needs one value or one per block ({len(block_config)}), "
            f"got {value}"
        )
    return value


def dnl_path(path: str, bottleneck: bool) -> str:
    """The DNLNet path of a DenseNet parameter path of the same configuration."""
    parts = path.split(".")
    if parts[0] == "blocks":
        head, name, rest = ".".join(parts[:4]), parts[4], ".".join(parts[5:])
        if name.startswith("norm"):
            return f"{head}.{name}.batch.{rest}"
        if name == "conv1" and bottleneck:
            return f"{head}.aggregate.{rest}"
        return f"{head}.transform.conv.{rest}"
    if parts[0] == "transitions" and parts[2] == "norm":
        return ".".join([*parts[:3], "batch", *parts[3:]])
    if parts[0] == "norm_final":
        return ".".join(["norm_final", "batch", *parts[1:]])
    return path


def from_densenet(densenet: nnx.Module, model: DNLNet) -> DNLNet:
    """Copies a DenseNet's weights and statistics into a DNLNet of its layout.

    With depth_scale='none', transform='local' and norm='batch', the DNLNet then
    computes exactly what the DenseNet does (the special case h = 1).
    """
    bottleneck = model.config["bottleneck"]
    target = layers.named_weights(model)
    values = {}
    for path, value in layers.named_weights(densenet).items():
        name = dnl_path(path, bottleneck)
        if name not in target or target[name][...].shape != value[...].shape:
            raise ValueError(
                f"the DenseNet's {path} {value[...].shape} has no match {name!r} in "
                "this DNLNet; build the DNLNet with the DenseNet's block_config, "
                "growth_rate, widths and bottleneck"
            )
        values[name] = value[...]
    layers.load_weights(model, values)
    return model
