"""Non-local feature transformations for dense non-local (DNL) networks.

A non-local transform maps u: (batch, H, W, C_in) to (batch, H, W, C_out) by a
sum over every position q of the grid Omega, as in Wang et al., "Non-local Neural
Networks" (CVPR 2018):

    K[u](p) = sum_{q in Omega} kappa(p, q; u) W u(q)

W is the 1x1 `value` transform C_in -> C_out and kappa(p, q; u) = f(p, q) the
pairwise affinity of the kernel chosen, with theta and phi 1x1 embeddings
C_in -> embed and N_q the number of key positions:

    gaussian           f = softmax_q(u_p . u_q)
    embedded_gaussian  f = softmax_q(theta(u_p) . phi(u_q))
    dot_product        f = theta(u_p) . phi(u_q) / N_q
    concatenation      f = relu(a . theta(u_p) + b . phi(u_q)) / N_q
    attention          multi-head softmax_q(Q_p . K_q / sqrt(d_head)) V_q

'attention' is transformer attention: Q = theta(u), K = phi(u) and V = value(u),
all C_in -> embed, are split into num_heads heads of d_head = embed / num_heads
channels, and a 1x1 `output` projection maps the joined heads embed -> C_out.

With pool > 1, keys and values are read from u average-pooled by pool x pool
(stride pool), so the affinity matrix is (batch, HW, HW / pool^2); queries stay
at every position. Affinities, softmax and the weighted sum run in float32.

A zero `value` kernel (a zero `output` kernel for 'attention') gives exactly zero,
so a local-plus-non-local layer whose non-local weights are zero is its local
layer.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from dnl_zoo.models import layers

Array = jax.Array

KERNELS = ("gaussian", "embedded_gaussian", "dot_product", "concatenation", "attention")


# ---------------------------------------------------------------------------
# Pairwise affinities f(p, q) and the sum over q.
# ---------------------------------------------------------------------------


def flatten_positions(u: Array) -> Array:
    """Joins the grid axes: (batch, H, W, C) -> (batch, H * W, C), row-major."""
    batch, height, width, channels = u.shape
    return u.reshape(batch, height * width, channels)


def average_pool(u: Array, pool: int) -> Array:
    """Means over pool x pool windows, stride pool.

    Args:
      u: (batch, H, W, C) with H and W divisible by `pool`.
      pool: window size and stride.

    Returns:
      (batch, H / pool, W / pool, C), in the dtype of `u`.
    """
    batch, height, width, channels = u.shape
    if height % pool or width % pool:
        raise ValueError(
            f"pool={pool} needs height and width divisible by {pool}, got "
            f"{height}x{width}; choose a pool that divides both"
        )
    if pool == 1:
        return u
    windows = u.reshape(batch, height // pool, pool, width // pool, pool, channels)
    return jnp.mean(windows, axis=(2, 4), dtype=jnp.float32).astype(u.dtype)


def _dot_logits(queries: Array, keys: Array) -> Array:
    """queries_p . keys_q in float32: (..., P, D), (..., Q, D) -> (..., P, Q)."""
    return jnp.einsum(
        "...pd,...qd->...pq", queries.astype(jnp.float32), keys.astype(jnp.float32)
    )


def softmax_affinity(queries: Array, keys: Array, scale: float = 1.0) -> Array:
    """softmax_q(scale * queries_p . keys_q), in float32.

    Args:
      queries: (..., P, D).
      keys: (..., Q, D).
      scale: multiplies the logits before the softmax.

    Returns:
      (..., P, Q), every row summing to one.
    """
    return jax.nn.softmax(_dot_logits(queries, keys) * scale, axis=-1)


def dot_product_affinity(queries: Array, keys: Array) -> Array:
    """queries_p . keys_q / Q in float32: (..., P, D), (..., Q, D) -> (..., P, Q)."""
    return _dot_logits(queries, keys) / keys.shape[-2]


def concatenation_affinity(queries: Array, keys: Array, mix: Array) -> Array:
    """relu(a . queries_p + b . keys_q) / Q in float32, with [a, b] = mix.

    Args:
      queries: (..., P, D).
      keys: (..., Q, D).
      mix: (2 D,), a = mix[:D] and b = mix[D:]; together the weights of the
        paper's 1x1 convolution over the concatenation [theta(u_p), phi(u_q)].

    Returns:
      (..., P, Q).
    """
    embed = queries.shape[-1]
    mix = mix.astype(jnp.float32)
    from_query = queries.astype(jnp.float32) @ mix[:embed]  # (..., P)
    from_key = keys.astype(jnp.float32) @ mix[embed:]  # (..., Q)
    logits = from_query[..., :, None] + from_key[..., None, :]
    return jax.nn.relu(logits) / keys.shape[-2]


def aggregate(affinity: Array, values: Array) -> Array:
    """sum_q f(p, q) v_q, summed in float32 and returned in the values' dtype.

    Args:
      affinity: (..., P, Q).
      values: (..., Q, C).

    Returns:
      (..., P, C).
    """
    out = jnp.einsum("...pq,...qc->...pc", affinity, values.astype(jnp.float32))
    return out.astype(values.dtype)


# ---------------------------------------------------------------------------
# The module.
# ---------------------------------------------------------------------------


def _check_config(kernel: str, embed: int, num_heads: int, pool: int) -> None:
    """Raises a readable ValueError for settings NonLocal cannot build."""
    if kernel not in KERNELS:
        raise ValueError(
            f"unknown non-local kernel {kernel!r}; expected one of {KERNELS}"
        )
    if embed < 1:
        raise ValueError(f"embed_features must be at least 1, got {embed}")
    if num_heads != 1 and kernel != "attention":
        raise ValueError(
            f"num_heads={num_heads} applies only to kernel='attention', got "
            f"kernel={kernel!r}; leave num_heads at 1"
        )
    if num_heads < 1 or embed % num_heads:
        raise ValueError(
            f"num_heads must be a positive divisor of embed_features={embed}, "
            f"got num_heads={num_heads}"
        )
    if pool < 1:
        raise ValueError(f"pool must be a positive integer, got {pool}")


class NonLocal(nnx.Module):
    """A non-local transform K[u](p) = sum_q f(p, q; u) W u(q) over all positions.

    Submodules (all `layers.pointwise`, kernels (in, out), no bias): `theta` and
    `phi` (C_in -> embed; absent for 'gaussian'), `value` (C_in -> C_out, or
    C_in -> embed for 'attention') and, for 'attention' only, `output`
    (embed -> C_out). 'concatenation' adds one Param `mix` of shape (2 embed,)
    holding [a, b]. `history_params` names the kernels whose axis 0 is the input
    channel axis, so the DNL code can split them by source layer.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        kernel: str = "embedded_gaussian",
        embed_features: int | None = None,
        num_heads: int = 1,
        pool: int = 1,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        if embed_features is None:
            embed_features = max(1, in_features // 2)
        _check_config(kernel, embed_features, num_heads, pool)
        self.in_features = in_features
        self.out_features = out_features
        self.kernel = kernel
        self.embed_features = embed_features
        self.num_heads = num_heads
        self.pool = pool

        proj = dict(dtype=dtype, rngs=rngs)
        names = ("value",)
        if kernel != "gaussian":
            self.theta = layers.pointwise(in_features, embed_features, **proj)
            self.phi = layers.pointwise(in_features, embed_features, **proj)
            names = ("theta", "phi", "value")
        if kernel == "concatenation":
            # The paper's w_f: a 1x1 convolution 2 embed -> 1, He-initialised.
            mix = layers.he_normal(rngs.params(), (2 * embed_features, 1))
            self.mix = nnx.Param(mix.reshape(-1))  # [a, b]
        if kernel == "attention":
            self.value = layers.pointwise(in_features, embed_features, **proj)
            self.output = layers.pointwise(embed_features, out_features, **proj)
        else:
            self.value = layers.pointwise(in_features, out_features, **proj)  # W
        self.history_params = tuple(f"{name}.kernel" for name in names)

    def __call__(self, u: Array) -> Array:
        """Maps u: (batch, H, W, in_features) to (batch, H, W, out_features).

        With pool > 1, H and W must be divisible by pool.
        """
        layers.check_images(
            u, in_channels=self.in_features, min_size=1, model="NonLocal"
        )
        batch, height, width, _ = u.shape
        sources = flatten_positions(average_pool(u, self.pool))  # keys, values
        targets = flatten_positions(u)  # queries
        if self.kernel == "attention":
            out = self._attend(targets, sources)
        else:
            affinity = self._affinity(targets, sources)
            out = aggregate(affinity, self.value(sources))
        return out.reshape(batch, height, width, self.out_features)

    def _affinity(self, targets: Array, sources: Array) -> Array:
        """f(p, q): (batch, P, C_in), (batch, Q, C_in) -> (batch, P, Q) float32."""
        if self.kernel == "gaussian":
            return softmax_affinity(targets, sources)
        queries, keys = self.theta(targets), self.phi(sources)
        if self.kernel == "embedded_gaussian":
            return softmax_affinity(queries, keys)
        if self.kernel == "dot_product":
            return dot_product_affinity(queries, keys)
        return concatenation_affinity(queries, keys, self.mix[...])

    def _attend(self, targets: Array, sources: Array) -> Array:
        """Attention: (batch, P, C_in), (batch, Q, C_in) -> (batch, P, C_out)."""
        heads = self.num_heads
        head_features = self.embed_features // heads  # d_head

        def split(x: Array) -> Array:  # (batch, N, embed) -> (batch, heads, N, d)
            batch, positions, _ = x.shape
            return x.reshape(batch, positions, heads, head_features).swapaxes(1, 2)

        queries = split(self.theta(targets))
        keys, values = split(self.phi(sources)), split(self.value(sources))
        affinity = softmax_affinity(queries, keys, 1.0 / math.sqrt(head_features))
        joined = aggregate(affinity, values).swapaxes(1, 2)  # (batch, P, heads, d)
        batch, positions = joined.shape[:2]
        return self.output(joined.reshape(batch, positions, self.embed_features))
