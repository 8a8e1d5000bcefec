"""Weight conversion: Keras applications and torchvision-keyed DenseNets give the
same logits as dnl_zoo's after `dnl_zoo.convert`. Nothing is downloaded."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

import dnl_zoo
from dnl_zoo import convert
from dnl_zoo.models import layers

# Kept small: a full 224x224 forward pass costs seconds per model on 2 cores and
# proves no more about the mapping (every DenseNet-121 stage runs at 64x64).
SIZE = 64


def random_images(seed: int, channels: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(2, SIZE, SIZE, channels))


def logits(model, x: np.ndarray) -> np.ndarray:
    model.eval()
    return np.asarray(nnx.jit(lambda m, x: m(x))(model, x.astype(np.float32)))


def randomise_keras_batch_norm(keras_model, rng: np.random.Generator) -> None:
    """Fresh BatchNorms are the identity; random ones expose a wrong mapping."""
    for layer in keras_model.layers:
        if type(layer).__name__ == "BatchNormalization":
            c = layer.get_weights()[0].shape[0]
            layer.set_weights(
                [
                    1 + 0.2 * rng.normal(size=c),
                    0.2 * rng.normal(size=c),
                    0.2 * rng.normal(size=c),
                    0.5 + rng.random(c),
                ]
            )


@pytest.mark.parametrize("name", ["densenet121", "densenet169", "densenet201"])
def test_keras_applications_logits_match(name):
    assert os.environ["KERAS_BACKEND"] == "numpy"
    import keras

    build = getattr(keras.applications, name.replace("densenet", "DenseNet"))
    reference = build(
        weights=None, input_shape=(SIZE, SIZE, 3), classifier_activation=None
    )
    randomise_keras_batch_norm(reference, np.random.default_rng(0))
    x = random_images(1)
    expected = np.asarray(reference(x.astype(np.float32), training=False))

    model = convert.from_keras(reference)
    assert dnl_zoo.model_info(name)["params"] == reference.count_params() - sum(
        int(np.prod(w.shape))
        for layer in reference.layers
        if type(layer).__name__ == "BatchNormalization"
        for w in layer.get_weights()[2:]
    )
    difference = np.max(np.abs(logits(model, x) - expected))
    scale = np.max(np.abs(expected))
    print(f"{name}: max |logit difference| = {difference:.2e}, scale {scale:.2f}")
    assert difference < 1e-4


def torch_reference(block_config, growth_rate, init, seed=0, classes=10):
    """The independent PyTorch DenseNet with random weights and BatchNorms."""
    torch = pytest.importorskip("torch")  # optional: `pip install dnl_zoo[torch]`
    from benchmarks.torch_densenet import DenseNet, randomise_batch_norm

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    reference = DenseNet(block_config, growth_rate, init, num_classes=classes)
    randomise_batch_norm(reference, generator)
    return reference.eval()


def torch_logits(reference, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        images = torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32))
        return reference(images).numpy()


@pytest.mark.parametrize(
    "block_config, growth_rate, init",
    [((6, 12, 24, 16), 32, 64), ((2, 3, 4), 48, 96)],
    ids=["densenet121", "small-k48"],
)
def test_torchvision_keyed_state_dict_logits_match(block_config, growth_rate, init):
    reference = torch_reference(block_config, growth_rate, init)
    x = random_images(2)
    model = convert.from_torch(reference.state_dict())
    assert tuple(len(b.layers) for b in model.blocks) == block_config
    difference = np.max(np.abs(logits(model, x) - torch_logits(reference, x)))
    print(f"max |logit difference| = {difference:.2e}")
    assert difference < 1e-4


def test_old_torchvision_key_spelling_and_data_parallel_prefix():
    reference = torch_reference((2, 2), 8, 16)
    state = reference.state_dict()
    old = {
        "module." + k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): v
        for k, v in state.items()
    }
    assert any(".norm.1." in k for k in old)
    x = random_images(3)
    a = logits(convert.from_torch(state), x)
    b = logits(convert.from_torch(old), x)
    np.testing.assert_array_equal(a, b)


def test_conversion_errors_name_the_tensor():
    state = torch_reference((2, 3), 8, 16).state_dict()
    smaller = dnl_zoo.models.DenseNet(
        block_config=(2, 2),
        growth_rate=8,
        num_init_features=16,
        stem="imagenet",
        rngs=nnx.Rngs(0),
    )
    with pytest.raises(convert.ConversionError, match=r"norm3.*expected shape"):
        convert.from_torch(state, smaller)
    extra = state | {"features.extra.weight": np.zeros(3)}
    with pytest.raises(convert.ConversionError, match="features.extra.weight"):
        convert.from_torch(extra)
    wider = dnl_zoo.models.DenseNet(
        block_config=(2, 3),
        growth_rate=12,
        num_init_features=16,
        stem="imagenet",
        num_classes=10,
        rngs=nnx.Rngs(0),
    )
    with pytest.raises(convert.ConversionError, match=r"conv2.*expected shape"):
        convert.from_torch(state, wider)
    cifar = dnl_zoo.create_model("densenet_bc100_k12")
    with pytest.raises(convert.ConversionError, match="stem='imagenet'"):
        convert.from_torch(state, cifar)
    with pytest.raises(convert.ConversionError, match="torchvision DenseNet"):
        convert.from_torch({"fc.weight": np.zeros((2, 2))})


def test_a_scanned_model_takes_converted_weights_through_load_weights():
    state = torch_reference((2, 3), 8, 16).state_dict()
    arch = convert.torch_architecture(state)
    scanned = dnl_zoo.models.DenseNet(**arch, implementation="scan", rngs=nnx.Rngs(1))
    with pytest.raises(convert.ConversionError, match="layers.load_weights"):
        convert.from_torch(state, scanned)
    converted = convert.from_torch(state)
    layers.load_weights(scanned, layers.weight_values(converted))
    scanned.eval()
    x = random_images(2)
    np.testing.assert_allclose(
        logits(scanned, x), logits(converted, x), rtol=1e-5, atol=1e-5
    )


def test_keras_without_top_keeps_a_fresh_classifier():
    import keras

    reference = keras.applications.DenseNet121(
        weights=None, include_top=False, input_shape=(SIZE, SIZE, 3), pooling="avg"
    )
    randomise_keras_batch_norm(reference, np.random.default_rng(4))
    model = dnl_zoo.models.DenseNet(
        block_config=(6, 12, 24, 16),
        growth_rate=32,
        num_init_features=64,
        stem="imagenet",
        num_classes=5,
        norm_epsilon=1.001e-5,
        rngs=nnx.Rngs(0),
    )
    before = np.asarray(model.classifier.kernel[...])
    convert.from_keras(reference, model)
    x = random_images(5).astype(np.float32)
    features = np.asarray(jax.jit(lambda x: model.features(x))(x))
    np.testing.assert_allclose(
        features, np.asarray(reference(x, training=False)), atol=1e-4
    )
    np.testing.assert_array_equal(model.classifier.kernel[...], before)
