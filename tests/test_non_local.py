"""Non-local transforms: shapes, equivariance, gradients, pooling, a numpy reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dnl_zoo.models.non_local import KERNELS, NonLocal

IN, OUT = 8, 4


def build(kernel: str, **kwargs) -> NonLocal:
    """A small NonLocal; 'attention' gets two heads so every test covers them."""
    if kernel == "attention":
        kwargs.setdefault("num_heads", 2)
    return NonLocal(IN, OUT, kernel=kernel, rngs=nnx.Rngs(0), **kwargs)


def images(shape=(2, 6, 6, IN), seed=1) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def reference(model: NonLocal, u) -> np.ndarray:
    """The kernels' formulas in float64 numpy with loops over batch and queries."""
    u = np.asarray(u, np.float64)
    batch, height, width, _ = u.shape
    s = model.pool
    pooled = np.zeros((batch, height // s, width // s, IN))
    for i in range(height // s):
        for j in range(width // s):
            pooled[:, i, j] = u[:, i * s : (i + 1) * s, j * s : (j + 1) * s].mean(
                (1, 2)
            )
    x, src = u.reshape(batch, -1, IN), pooled.reshape(batch, -1, IN)
    out = np.zeros((batch, x.shape[1], OUT))
    for b in range(batch):
        for p in range(x.shape[1]):
            out[b, p] = reference_at(model, x[b, p], src[b])
    return out.reshape(batch, height, width, OUT)


def reference_at(model: NonLocal, u_p: np.ndarray, u_q: np.ndarray) -> np.ndarray:
    """K[u](p) for one query u_p: (IN,) against keys u_q: (Q, IN)."""

    def weight(name):
        return np.asarray(getattr(model, name).kernel[...], np.float64)

    def softmax(z):
        z = np.exp(z - z.max())
        return z / z.sum()

    kernel, num_q = model.kernel, u_q.shape[0]
    if kernel == "gaussian":
        return softmax(u_q @ u_p) @ (u_q @ weight("value"))
    theta, phi = u_p @ weight("theta"), u_q @ weight("phi")
    if kernel == "embedded_gaussian":
        f = softmax(phi @ theta)
    elif kernel == "dot_product":
        f = phi @ theta / num_q
    elif kernel == "concatenation":
        mix = np.asarray(model.mix[...], np.float64)
        a, b = np.split(mix, 2)
        f = np.array([max(0.0, a @ theta + b @ phi[q]) for q in range(num_q)]) / num_q
    else:
        d = model.embed_features // model.num_heads
        values, heads = u_q @ weight("value"), []
        for h in range(model.num_heads):
            cut = slice(h * d, (h + 1) * d)
            f = softmax(phi[:, cut] @ theta[cut] / math.sqrt(d))
            heads.append(f @ values[:, cut])
        return np.concatenate(heads) @ weight("output")
    return f @ (u_q @ weight("value"))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_output_shape_dtype_and_finite(kernel, dtype):
    out = build(kernel, dtype=dtype)(images())
    assert out.shape == (2, 6, 6, OUT)
    assert out.dtype == dtype
    assert bool(jnp.all(jnp.isfinite(out)))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("pool", [1, 2])
def test_matches_numpy_reference(kernel, pool):
    model, u = build(kernel, pool=pool), images()
    np.testing.assert_allclose(model(u), reference(model, u), atol=1e-5, rtol=1e-5)


def test_attention_with_one_head_matches_reference():
    model, u = build("attention", num_heads=1, embed_features=6), images((1, 4, 4, IN))
    np.testing.assert_allclose(model(u), reference(model, u), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_positions_permute_with_the_input(kernel):
    model, u = build(kernel), images()
    batch, height, width, _ = u.shape
    perm = np.random.default_rng(2).permutation(height * width)
    assert np.any(perm != np.arange(height * width))

    def permute(x):
        flat = x.reshape(batch, height * width, x.shape[-1])
        return flat[:, perm].reshape(x.shape)

    np.testing.assert_allclose(model(permute(u)), permute(model(u)), atol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_gradients_are_finite_and_reach_every_param(kernel):
    model, u = build(kernel, pool=2), images((2, 4, 4, IN))
    target = images((2, 4, 4, OUT), seed=3)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params, u):
        return jnp.sum(nnx.merge(graphdef, params)(u) * target)

    grads, grad_u = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, u)
    leaves = jax.tree.leaves_with_path(grads)
    assert len(leaves) == len(jax.tree.leaves(params)) > 0
    for path, g in [*leaves, ("u", grad_u)]:
        assert bool(jnp.all(jnp.isfinite(g))), path
        assert bool(jnp.any(g != 0)), path


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("size", [4, 6])
def test_pool_two_keeps_every_query(kernel, size):
    out = build(kernel, pool=2)(images((2, size, size, IN)))
    assert out.shape == (2, size, size, OUT)


def test_pool_that_does_not_divide_the_grid_raises():
    with pytest.raises(ValueError, match=r"pool=4 needs .* divisible by 4, got 6x6"):
        build("embedded_gaussian", pool=4)(images())


@pytest.mark.parametrize("kernel", KERNELS)
def test_zero_value_or_output_kernel_gives_exactly_zero(kernel):
    model, u = build(kernel), images()
    assert bool(jnp.any(model(u) != 0))
    last = model.output if kernel == "attention" else model.value
    last.kernel[...] = jnp.zeros_like(last.kernel[...])
    assert np.array_equal(np.asarray(model(u)), np.zeros((2, 6, 6, OUT)))


@pytest.mark.parametrize("kernel", KERNELS)
def test_history_params_are_the_input_kernels(kernel):
    model = build(kernel)
    expected = {"gaussian": ("value.kernel",)}.get(
        kernel, ("theta.kernel", "phi.kernel", "value.kernel")
    )
    assert model.history_params == expected
    for path in model.history_params:
        first, second = path.split(".")
        assert getattr(getattr(model, first), second)[...].shape[0] == IN


def test_defaults_and_parameter_layout():
    model = build("concatenation")
    assert model.embed_features == IN // 2
    assert model.mix[...].shape == (2 * IN // 2,)
    attention = build("attention", embed_features=6, num_heads=3)
    assert attention.value.kernel[...].shape == (IN, 6)
    assert attention.output.kernel[...].shape == (6, OUT)
    assert not hasattr(build("gaussian"), "theta")


def test_jit_equals_eager():
    model, u = build("attention", pool=2), images()
    np.testing.assert_allclose(
        nnx.jit(lambda m, x: m(x))(model, u), model(u), atol=1e-6
    )


def test_unknown_kernel_lists_the_kernels():
    with pytest.raises(ValueError, match="unknown non-local kernel 'cosine'") as info:
        build("cosine")
    assert all(name in str(info.value) for name in KERNELS)


def test_heads_must_divide_embed_features():
    with pytest.raises(
        ValueError, match="divisor of embed_features=4, got num_heads=3"
    ):
        build("attention", num_heads=3)


def test_heads_only_for_attention():
    with pytest.raises(ValueError, match="only to kernel='attention'"):
        build("dot_product", num_heads=2)


def test_wrong_channel_count_raises():
    with pytest.raises(ValueError, match="expects 8 input channels"):
        build("gaussian")(images((2, 4, 4, 3)))
