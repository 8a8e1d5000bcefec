"""The DenseNet family: parameter counts, shapes, modes, jit, and learning."""

import contextlib
import io
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_same_step, gradient_temp_bytes, one_step
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

import dnl_zoo
from dnl_zoo.models import costs, layers
from dnl_zoo.models.densenet import DenseBlock, DenseNet, cifar_densenet

# Trainable parameters of the reference implementations at 1000 classes:
# Keras applications' DenseNet121/169/201 ("Trainable params") and torchvision's
# densenet161 (its weights table).
IMAGENET_PARAMS = {
    "densenet121": 7_978_856,
    "densenet169": 14_149_480,
    "densenet201": 20_013_928,
    "densenet161": 28_681_000,
}


def formula_params(spec) -> int:
    """Counts parameters from the paper's description, independently of modules."""
    kw = dnl_zoo.get_spec(spec).kwargs
    depth, k, bottleneck = kw["depth"], kw["growth_rate"], kw["bottleneck"]
    per_block = (depth - 4) // (6 if bottleneck else 3)
    channels = 2 * k if bottleneck else 16
    total = 9 * 3 * channels  # stem 3x3 convolution, no bias
    for block in range(3):
        for _ in range(per_block):
            if bottleneck:
                total += 2 * channels + channels * 4 * k + 2 * 4 * k + 9 * 4 * k * k
            else:
                total += 2 * channels + 9 * channels * k
            channels += k
        if block < 2:
            out = int(kw["compression"] * channels)
            total += 2 * channels + channels * out
            channels = out
    return total + 2 * channels + channels * 10 + 10


@pytest.mark.parametrize("name", sorted(IMAGENET_PARAMS))
def test_imagenet_parameter_counts_equal_references(name):
    assert dnl_zoo.model_info(name)["params"] == IMAGENET_PARAMS[name]


PUBLISHED_CIFAR = [
    n for n in dnl_zoo.list_models("densenet*_k*") if dnl_zoo.get_spec(n).reference
]


@pytest.mark.parametrize("name", PUBLISHED_CIFAR)
def test_cifar_parameter_counts_equal_paper(name):
    info = dnl_zoo.model_info(name)
    published = info["reference"]["params"]  # e.g. "0.8M", as the paper prints it
    assert info["params"] == formula_params(name)
    assert f"{info['params'] / 1e6:.1f}M" == published


def test_densenet_bc100_count_equals_pytorch_port():
    # The count printed by widely used PyTorch ports of DenseNet-BC-100, k=12.
    assert dnl_zoo.model_info("densenet_bc100_k12")["params"] == 769_162
    assert dnl_zoo.model_info("densenet_bc40_k12")["params"] == 176_122
    assert formula_params("densenet_bc40_k12") == 176_122


def test_densenet121_macs_match_torchvision():
    # torchvision lists 2.83 G multiply-accumulates ("GFLOPS") at 224x224.
    macs = dnl_zoo.model_info("densenet121")["macs"]
    assert abs(macs / 1e9 - 2.83) < 0.01
    assert dnl_zoo.model_info("densenet121")["flops"] == 2 * macs


def abstract_logits(name: str, train: bool, **overrides):
    """Output shape of a registered model, traced without allocating weights."""
    model = nnx.eval_shape(lambda: dnl_zoo.create_model(name, **overrides))
    graphdef, state = nnx.split(model)
    size = dnl_zoo.get_spec(name).input_size

    def forward(state, x):
        module = nnx.merge(graphdef, state)
        module.train() if train else module.eval()
        return module(x)

    x = jax.ShapeDtypeStruct((2, *size), jnp.float32)
    return jax.eval_shape(forward, state, x)


@pytest.mark.parametrize("name", dnl_zoo.list_models())
def test_every_registered_model_output_shape(name):
    spec = dnl_zoo.get_spec(name)
    for train in (True, False):
        out = abstract_logits(name, train)
        assert out.shape == (2, spec.num_classes)
        assert out.dtype == jnp.float32


def small_densenet(**kwargs) -> DenseNet:
    defaults = dict(
        depth=16,
        growth_rate=6,
        bottleneck=True,
        compression=0.5,
        in_channels=1,
        rngs=nnx.Rngs(0),
    )
    return cifar_densenet(**(defaults | kwargs))


@pytest.mark.parametrize("bottleneck", [True, False])
def test_fashion_mnist_size_forward_is_finite(bottleneck):
    depth = 16 if bottleneck else 13
    model = small_densenet(depth=depth, bottleneck=bottleneck)
    x = jax.random.normal(jax.random.key(1), (4, 28, 28, 1))
    for mode in (model.train, model.eval):
        mode()
        logits = model(x)
        assert logits.shape == (4, 10)
        assert bool(jnp.all(jnp.isfinite(logits)))


def test_jit_and_eager_agree_in_both_modes():
    model = small_densenet()
    x = jax.random.normal(jax.random.key(2), (4, 28, 28, 1))
    forward = nnx.jit(lambda m, x: m(x))
    for mode in ("eval", "train"):
        eager_model = nnx.clone(model)
        jit_model = nnx.clone(model)
        getattr(eager_model, mode)()
        getattr(jit_model, mode)()
        np.testing.assert_allclose(
            forward(jit_model, x), eager_model(x), atol=1e-5, rtol=1e-5
        )
        # Train mode also updates the running statistics the same way.
        eager_stats = nnx.state(eager_model, nnx.BatchStat)
        jit_stats = nnx.state(jit_model, nnx.BatchStat)
        for a, b in zip(
            jax.tree.leaves(eager_stats), jax.tree.leaves(jit_stats), strict=True
        ):
            np.testing.assert_allclose(a, b, atol=1e-6)


def test_eval_mode_uses_running_statistics():
    model = small_densenet()
    x = jax.random.normal(jax.random.key(3), (8, 28, 28, 1))
    model.train()
    model(x)  # moves the running statistics away from their initial values
    model.eval()
    alone = model(x[:1])
    in_batch = model(x)[:1]
    np.testing.assert_allclose(alone, in_batch, atol=1e-5)
    model.train()
    assert not np.allclose(model(x[:1]), model(x)[:1], atol=1e-3)


def test_dropout_is_random_in_train_mode_only():
    model = small_densenet(dropout_rate=0.2)
    x = jax.random.normal(jax.random.key(4), (2, 28, 28, 1))
    model.train()
    assert not np.allclose(model(x), model(x))
    model.eval()
    np.testing.assert_array_equal(model(x), model(x))


def test_sgd_on_one_batch_halves_the_loss():
    model = small_densenet()
    optimizer = nnx.Optimizer(model, optax.sgd(0.05, momentum=0.9), wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(5), (16, 28, 28, 1))
    y = jax.random.randint(jax.random.key(6), (16,), 0, 10)

    def loss_fn(model):
        logits = model(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(30)]
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize(
    "shape, dtype, message",
    [
        ((28, 28, 1), jnp.float32, "add a batch axis"),
        ((2, 1, 28, 28), jnp.float32, "channels-first"),
        ((2, 28, 28, 3), jnp.float32, "expects 1 input channels"),
        ((2, 28, 28, 1), jnp.uint8, "floating-point"),
        ((2, 2, 2, 1), jnp.float32, "at least 4"),
    ],
)
def test_bad_input_says_what_was_expected(shape, dtype, message):
    model = small_densenet()
    with pytest.raises((ValueError, TypeError), match=message):
        model(jnp.zeros(shape, dtype))


def test_imagenet_model_rejects_input_too_small_to_pool():
    model = nnx.eval_shape(lambda: dnl_zoo.create_model("densenet121"))
    with pytest.raises(ValueError, match="at least 32"):
        model(jnp.zeros((1, 16, 16, 3)))


def test_any_block_config_stem_and_channels():
    model = DenseNet(
        block_config=(2, 3),
        growth_rate=4,
        num_init_features=8,
        stem="imagenet",
        in_channels=5,
        num_classes=7,
        rngs=nnx.Rngs(0),
    )
    assert model(jnp.ones((2, 16, 16, 5))).shape == (2, 7)
    assert model.num_features == int(0.5 * (8 + 2 * 4)) + 3 * 4


def test_registry_lists_filters_and_explains_mistakes():
    assert "densenet121" in dnl_zoo.list_models()
    assert dnl_zoo.list_models("densenet_bc*_k??") == [
        "densenet_bc100_k12",
        "densenet_bc190_k40",
        "densenet_bc250_k24",
        "densenet_bc40_k12",
    ]
    assert dnl_zoo.list_models("*_fmnist") == [
        f"densenet_bc{depth}_k12_fmnist" for depth in (16, 22, 28, 40)
    ]
    with pytest.raises(KeyError, match="did you mean densenet121"):
        dnl_zoo.create_model("densenet12")
    with pytest.raises(TypeError, match="inchannels"):
        dnl_zoo.create_model("densenet_bc100_k12", inchannels=1)
    with pytest.raises(dnl_zoo.PretrainedUnavailableError, match="densenet121"):
        dnl_zoo.create_model("densenet121", pretrained=True)


def test_create_model_overrides_and_seed():
    a = dnl_zoo.create_model("densenet40_k12", num_classes=3, in_channels=1, seed=1)
    b = dnl_zoo.create_model("densenet40_k12", num_classes=3, in_channels=1, seed=1)
    c = dnl_zoo.create_model("densenet40_k12", num_classes=3, in_channels=1, seed=2)
    assert a.classifier.kernel.shape == (a.num_features, 3)
    assert a.stem.conv.kernel.shape == (3, 3, 1, 16)
    np.testing.assert_array_equal(a.stem.conv.kernel[...], b.stem.conv.kernel[...])
    assert not np.allclose(a.stem.conv.kernel[...], c.stem.conv.kernel[...])


def test_checkpoint_paths_are_readable():
    model = small_densenet()
    paths = {
        ".".join(str(p) for p in path)
        for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    assert "blocks.2.layers.1.conv2.kernel" in paths
    assert "transitions.0.norm.scale" in paths
    assert "classifier.bias" in paths
    assert costs.count_params(model) == sum(
        math.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, nnx.Param))
    )


# ---------------------------------------------------------------------------
# Block implementations: the same network, computed four ways.


def _step(implementation: str, bottleneck: bool, x, y, dropout_rate: float = 0.0):
    """Loss, gradients and updated statistics of one train step, plus eval logits."""
    model = cifar_densenet(
        16 if bottleneck else 10,
        6,
        bottleneck=bottleneck,
        compression=0.5 if bottleneck else 1.0,
        implementation=implementation,
        dropout_rate=dropout_rate,
        rngs=nnx.Rngs(0),
    )
    return one_step(model, x, y)  # scan's stacked weights compared per layer


@pytest.mark.parametrize(
    "implementation, bottleneck, dropout_rate",
    [
        (implementation, bottleneck, 0.0)
        for implementation in ("shared", "lean", "scan")
        for bottleneck in (True, False)
    ]
    + [("lean", True, 0.2)],  # lean with dropout: the per-read recomputation
)
def test_every_block_implementation_has_the_plain_gradients(
    implementation, bottleneck, dropout_rate
):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 16, 16, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 8))
    reference = _step("plain", bottleneck, x, y, dropout_rate)
    assert_same_step(_step(implementation, bottleneck, x, y, dropout_rate), reference)


def test_implementation_is_a_choice_of_computation_not_of_weights():
    plain = dnl_zoo.create_model("densenet_bc40_k12")
    scanned = dnl_zoo.create_model("densenet_bc40_k12", implementation="scan")
    # Scan stores each block's weights stacked, one array per kind of weight...
    assert len(layers.named_weights(scanned)) < len(layers.named_weights(plain)) / 4
    assert scanned.blocks[0].layers.conv1.kernel.shape == (6, 24 + 6 * 12, 48)
    # ...and names and initialises every weight as the other implementations do.
    expected, values = layers.weight_values(plain), layers.weight_values(scanned)
    assert values.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(values[key], value, err_msg=key)
    # Per-layer weights load into the stacked storage and come back unchanged.
    rng = np.random.default_rng(0)
    noisy = {k: v + rng.normal(size=v.shape).astype(v.dtype) for k, v in values.items()}
    layers.load_weights(scanned, noisy)
    for key, value in layers.weight_values(scanned).items():
        np.testing.assert_array_equal(value, noisy[key], err_msg=key)
    with pytest.raises(ValueError, match="blocks.0.layers.2.conv1.kernel: expected"):
        layers.load_weights(
            scanned, {"blocks.0.layers.2.conv1.kernel": np.zeros((1, 1))}
        )
    with pytest.raises(ValueError, match="implementation must be one of"):
        dnl_zoo.create_model("densenet_bc40_k12", implementation="fast")
    with pytest.raises(ValueError, match="without dropout"):
        model = dnl_zoo.create_model(
            "densenet_bc40_k12", implementation="scan", dropout_rate=0.2
        )
        model(jnp.zeros((2, 32, 32, 3)))


def _residual_elements(implementation: str) -> int:
    """Elements of the (batch, H, W, C) arrays saved for one backward pass."""
    model = cifar_densenet(
        40, 12, bottleneck=True, compression=0.5, implementation=implementation,
        rngs=nnx.Rngs(0),
    )  # fmt: skip
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x, y = jnp.zeros((4, 16, 16, 3)), jnp.zeros((4,), jnp.int32)

    def loss(params, rest):
        model = nnx.merge(graphdef, params, rest)
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        print_saved_residuals(loss, params, rest)  # 'f32[4,16,16,24] from ...'
    shapes = re.findall(r"^\w+\[(\d+),(\d+),(\d+),(\d+)\]", printed.getvalue(), re.M)
    return sum(math.prod(map(int, shape)) for shape in shapes)


def test_lean_blocks_save_far_fewer_residuals_than_plain():
    assert _residual_elements("lean") < 0.7 * _residual_elements("plain")


def _block_temp_bytes(implementation: str, num_layers: int) -> int:
    """XLA's temporary bytes of one dense block's training gradient."""
    block = DenseBlock(
        24, num_layers, 12, bottleneck=True, implementation=implementation,
        rngs=nnx.Rngs(0),
    )  # fmt: skip
    return gradient_temp_bytes(block, (16, 16, 16, 24))


@pytest.mark.parametrize("implementation", ["lean", "scan"])
def test_recomputing_blocks_keep_xla_memory_linear_in_depth(implementation):
    # What XLA allocates, not what JAX saves: the recomputation must not be
    # folded back into the forward pass (see densenet._after).
    plain = _block_temp_bytes("plain", 16)
    lean = _block_temp_bytes(implementation, 16)
    print(
        f"16-layer block, XLA temp bytes {implementation} / plain: {lean / plain:.2f}"
    )
    assert lean < 0.4 * plain, (lean, plain)


def _train_step_equations(depth: int) -> int:
    """Equations in the jaxpr of a scanned DenseNet-BC's training gradient."""
    model = cifar_densenet(
        depth, 12, bottleneck=True, compression=0.5, implementation="scan",
        rngs=nnx.Rngs(0),
    )  # fmt: skip
    graphdef, state = nnx.split(model)
    x, y = jnp.zeros((2, 16, 16, 3)), jnp.zeros((2,), jnp.int32)

    def step(state):
        model = nnx.merge(graphdef, state)
        model.train()

        def loss(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

        return nnx.grad(loss)(model)

    return len(jax.make_jaxpr(step)(state).jaxpr.eqns)


def test_scan_traces_the_same_program_at_every_depth():
    # What compile time follows: the program XLA gets does not grow with depth.
    assert _train_step_equations(40) == _train_step_equations(250)
