"""The trainer's data parallelism: jit over a mesh and pmap replicas give the
losses of one device; configs and overrides; optimiser schedules."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from dnl_zoo import config as config_lib
from dnl_zoo import train
from dnl_zoo.models.densenet import DenseNet


def tiny_model() -> DenseNet:
    return DenseNet(
        block_config=(2, 2),
        growth_rate=4,
        num_init_features=8,
        in_channels=1,
        num_classes=4,
        rngs=nnx.Rngs(0),
    )


def synthetic_batch(step: int, size: int = 16) -> dict:
    rng = np.random.default_rng(step)
    labels = rng.integers(0, 4, size).astype(np.int32)
    images = rng.normal(size=(size, 8, 8, 1)).astype(np.float32)
    images[np.arange(size), labels, labels] += 3.0
    return {"image": images, "label": labels}


def run(parallelism: str, devices: list, steps: int = 10):
    config = config_lib.base_config()
    config.parallelism = parallelism
    model = tiny_model()
    if parallelism == "pmap":
        train._set_batch_norm_axis(model, "data")
    optimizer = nnx.Optimizer(model, optax.sgd(0.05, momentum=0.9), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    trainer = train.Trainer(config, graphdef, devices)
    state = trainer.place_state(state)
    losses = []
    for step in range(steps):
        batch = trainer.place_batch(synthetic_batch(step))
        state, metrics = trainer.train_step(state, batch)
        losses.append(float(np.asarray(metrics["loss"]).ravel()[0]))
    params = nnx.state(nnx.merge(graphdef, trainer.host_state(state))[0], nnx.Param)
    return np.array(losses), [np.asarray(x) for x in jax.tree.leaves(params)]


def test_sharded_and_pmap_training_equal_one_device():
    assert jax.device_count() == 8
    reference, reference_params = run("jit", jax.devices()[:1])
    print(f"one device: losses {np.round(reference, 4)}")
    for parallelism in ("jit", "pmap"):
        losses, params = run(parallelism, jax.devices())
        gap = np.max(np.abs(losses - reference))
        print(f"{parallelism} on 8 devices: max |loss difference| {gap:.1e}")
        np.testing.assert_allclose(losses, reference, rtol=1e-5, atol=1e-5)
        for a, b in zip(params, reference_params, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert reference[-1] < reference[0]


def test_overrides_parse_types_and_reject_unknown_keys():
    config = config_lib.base_config()
    config_lib.override(
        config,
        [
            "--config.optimizer.learning_rate=0.05",
            "--config.batch_size=128",
            "--config.parallelism=pmap",
            "--config.schedule.boundaries=(0.3, 0.6)",
            "--config.model.overrides.dropout_rate=0.2",
        ],
    )
    assert config.optimizer.learning_rate == 0.05
    assert config.batch_size == 128 and config.parallelism == "pmap"
    assert config.schedule.boundaries == (0.3, 0.6)
    assert config.model.overrides.dropout_rate == 0.2
    with pytest.raises(KeyError, match="did you mean optimizer.learning_rate"):
        config_lib.override(config, ["--config.optimizer.learning_rat=1"])
    with pytest.raises(ValueError, match="expected a int"):
        config_lib.override(config, ["--config.batch_size=big"])


def test_schedules_warm_up_and_decay():
    config = config_lib.base_config()
    config.schedule.warmup_epochs = 1.0
    _, cosine = train.create_optimizer(config, total_steps=100, steps_per_epoch=10)
    assert float(cosine(0)) == 0.0
    assert float(cosine(10)) == pytest.approx(0.1)
    assert float(cosine(100)) == pytest.approx(0.0, abs=1e-6)
    config.schedule.name = "step"
    _, step = train.create_optimizer(config, total_steps=100, steps_per_epoch=10)
    assert float(step(60)) == pytest.approx(0.01)
    assert float(step(80)) == pytest.approx(0.001)
    config.schedule.name = "linear"
    with pytest.raises(ValueError, match="'cosine', 'step' or 'constant'"):
        train.create_optimizer(config, total_steps=100, steps_per_epoch=10)
