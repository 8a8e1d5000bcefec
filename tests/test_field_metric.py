"""SGD on the fields: learning-rate factors that make every depth learn alike."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dnl_zoo import config as config_lib
from dnl_zoo import depth, train
from dnl_zoo.models import layers, registry


def _model(n: int, depth_scale: str = "step"):
    return registry.create_model(
        f"dnl_conv_n{n}", in_channels=1, depth_scale=depth_scale, seed=0
    )


def test_factors_follow_the_quadrature_weights():
    model = _model(2)  # T = 1, h = 1/2, x_0 of block 1 has 24 channels
    scales = depth.field_metric_scales(model)
    second = scales["blocks.0.layers.1.transform.conv.kernel"].ravel()
    np.testing.assert_array_equal(second, [2.0] * 24 + [4.0] * 12)  # G, K
    first = scales["blocks.0.layers.0.transform.conv.kernel"].ravel()
    np.testing.assert_array_equal(first, [2.0] * 24)  # G alone
    # The classifier reads the last block's history: x_0 as it is, x_1, x_2 over s.
    c0 = model.blocks[-1].c0
    classifier = scales["classifier.kernel"].ravel()
    np.testing.assert_array_equal(classifier, [1.0] * c0 + [2.0] * 24)
    assert not any(path.startswith("stem") for path in scales)
    assert depth.field_metric_scales(_model(2, "none")) == {}


def _block_rates(n: int, images, labels) -> tuple[float, float]:
    """First-order loss decrease of one SGD step through the blocks' weights,
    plain and on the fields."""
    model = _model(n)
    model.train()
    factors = depth.field_metric_scales(model)

    def loss_fn(model):
        logits = model(images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    grads = nnx.state(nnx.jit(nnx.grad(loss_fn))(model), nnx.Param)
    plain = field = 0.0
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        key = layers.dotted_path(path)
        if key.startswith("blocks."):
            plain += float(jnp.sum(g**2))
            field += float(jnp.sum(factors.get(key, 1.0) * g**2))
    return plain, field


def test_every_depth_learns_at_the_same_rate_on_the_fields():
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(8, 8, 8, 1)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, 8), jnp.int32)
    rates = [_block_rates(n, images, labels) for n in (2, 4, 8)]
    plain, field = [r[0] for r in rates], [r[1] for r in rates]
    print(f"first-order decrease, N = 2, 4, 8: plain {plain}, fields {field}")
    # Plain SGD: every read of x_j carries h, so the rate falls like 1/N.
    assert plain[1] < 0.7 * plain[0] and plain[2] < 0.7 * plain[1], plain
    # On the fields it settles: each doubling changes it by less than 30%.
    assert all(0.7 < b / a < 1.3 for a, b in zip(field, field[1:], strict=False)), field


def _flat_params(model) -> dict[str, np.ndarray]:
    state = nnx.state(model, nnx.Param)
    return {
        layers.dotted_path(p): np.asarray(v)
        for p, v in jax.tree_util.tree_flatten_with_path(state)[0]
    }


def test_one_step_scales_each_update_by_its_factor():
    model = _model(2)
    config = config_lib.base_config()
    config.optimizer.update(momentum=0.0, weight_decay=0.0, field_metric=True)
    config.schedule.name = "constant"
    tx, _ = train.create_optimizer(config, 10, 10, model)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)  # as the trainer does
    before = _flat_params(model)
    optimizer.update(model, jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param)))
    after = _flat_params(model)
    scales = depth.field_metric_scales(model)
    assert {k for k in scales if not k.endswith((".mean", ".var"))} <= after.keys()
    lr = config.optimizer.learning_rate
    for key, value in after.items():
        expected = -lr * np.broadcast_to(scales.get(key, 1.0), value.shape)
        np.testing.assert_allclose(
            value - before[key], expected, rtol=1e-5, atol=1e-7, err_msg=key
        )


def test_field_metric_needs_a_dnl_model_and_sgd():
    config = config_lib.base_config()
    config.optimizer.field_metric = True
    densenet = registry.create_model("densenet_bc16_k12_fmnist")
    with pytest.raises(ValueError, match="needs a DNL model"):
        train.create_optimizer(config, 10, 10, densenet)
    config.optimizer.name = "adamw"
    with pytest.raises(ValueError, match="use optimizer.name='sgd'"):
        train.create_optimizer(config, 10, 10, _model(2))
