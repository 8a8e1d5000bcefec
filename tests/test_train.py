"""The trainer's data parallelism: jit over a mesh and pmap replicas give the
losses of one device; configs and overrides; optimiser schedules."""

import json
import os
import subprocess

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from dnl_zoo import config as config_lib
from dnl_zoo import train
from dnl_zoo.models.densenet import DenseNet
from dnl_zoo.models.dnl import DNLNet


def tiny_model(implementation: str = "plain", family: str = "densenet"):
    network = DenseNet if family == "densenet" else DNLNet
    return network(
        block_config=(2, 2),
        growth_rate=4,
        num_init_features=8,
        in_channels=1,
        num_classes=4,
        implementation=implementation,
        rngs=nnx.Rngs(0),
    )


def synthetic_batch(step: int, size: int = 16) -> dict:
    rng = np.random.default_rng(step)
    labels = rng.integers(0, 4, size).astype(np.int32)
    images = rng.normal(size=(size, 8, 8, 1)).astype(np.float32)
    images[np.arange(size), labels, labels] += 3.0
    return {"image": images, "label": labels}


def run(parallelism, devices, steps=10, implementation="plain", family="densenet"):
    config = config_lib.base_config()
    config.parallelism = parallelism
    model = tiny_model(implementation, family)
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


@pytest.mark.parametrize(
    "family, implementation",
    [("densenet", "lean"), ("densenet", "scan"), ("dnl", "lean")],
)
def test_recomputing_blocks_train_under_pmap_like_plain_on_one_device(
    family, implementation
):
    # Their custom VJPs take batch statistics over the pmap axis like BatchNorm.
    reference, _ = run("jit", jax.devices()[:1], family=family)
    losses, _ = run("pmap", jax.devices(), implementation=implementation, family=family)
    np.testing.assert_allclose(losses, reference, rtol=1e-5, atol=1e-5)


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


def test_bfloat16_compute_keeps_float32_parameters():
    config = config_lib.base_config()
    config.compute_dtype = "bfloat16"
    config.model.name = "dnl_conv_n2"
    info = type("Info", (), {"image_shape": (8, 8, 1), "num_classes": 4})()
    trainer, state, _, _ = train.build(config, info, 10, 10)
    state = trainer.place_state(state)
    batch = trainer.place_batch(synthetic_batch(0))
    state, metrics = trainer.train_step(state, batch)
    model, _ = nnx.merge(trainer.graphdef, state)
    assert np.isfinite(float(metrics["loss"]))
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {
        np.dtype("float32")
    }
    logits = model(batch["image"])
    assert logits.dtype == jax.numpy.bfloat16


def test_a_second_run_in_a_busy_workdir_is_refused(tmp_path):
    holder = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / "run.lock").write_text(f"{holder.pid}\n")
        with pytest.raises(train.WorkdirBusyError, match=f"pid {holder.pid}"):
            train.train_and_evaluate(config_lib.base_config(), tmp_path)
    finally:
        holder.kill()
        holder.wait()
    # A dead holder's lock is taken over (the run then fails later, on data).
    train._lock_workdir(tmp_path)
    assert (tmp_path / "run.lock").read_text().strip() == str(os.getpid())


def test_log_writes_jsonl_and_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator

    log = train.Log(tmp_path)
    log.row(10, {"train_loss": 1.5, "learning_rate": 0.1})
    log.row(20, {"train_loss": 1.25, "eval_top1": 50.0})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert rows == [
        {"step": 10, "train_loss": 1.5, "learning_rate": 0.1},
        {"step": 20, "train_loss": 1.25, "eval_top1": 50.0},
    ]
    events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("train_loss")]
    assert losses == [(10, 1.5), (20, 1.25)]


def test_the_regulariser_of_the_config_joins_the_loss():
    from dnl_zoo import depth

    config = config_lib.base_config()
    config.model.name = "dnl_conv_n2"
    config.regulariser.update(alpha=0.5, beta=2.0)
    info = type("Info", (), {"image_shape": (8, 8, 1), "num_classes": 4})()
    trainer, state, _, _ = train.build(config, info, 10, 10)
    model, _ = nnx.merge(trainer.graphdef, state)
    batch = synthetic_batch(1)
    loss, logits = trainer._loss(model, batch)
    expected = train.cross_entropy(logits, batch["label"]) + depth.regulariser(
        model, 0.5, 2.0
    )
    assert float(depth.regulariser(model, 0.5, 2.0)) > 0
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)
