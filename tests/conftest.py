"""Test set-up: 8 fake CPU devices, so sharding tests run on any machine."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8"
# Keras on its numpy backend builds and runs the reference models in a second
# or two, and shares no code path with the JAX model under test.
os.environ["KERAS_BACKEND"] = "numpy"


import fcntl  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402


def built_once(tmp_path_factory, worker_id: str, name: str, build) -> pathlib.Path:
    """The directory `name` that `build(directory)` fills once per test run.

    pytest-xdist's workers share it: the first to come builds it under a lock
    while the others wait, so work that takes half a minute is not done twice.
    """
    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        root = root.parent  # the run's base, above each worker's own
    directory, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            build(directory)
            done.touch()
    return directory


@pytest.fixture(scope="session")
def fashion_mnist_dir(tmp_path_factory, worker_id) -> str:
    """A TFDS data_dir with fashion_mnist built from Debian's IDX files, once."""
    from dnl_zoo import data

    def build(data_dir):
        data.prepare("fashion_mnist", data.DEBIAN_FASHION_MNIST, str(data_dir))

    return str(built_once(tmp_path_factory, worker_id, "tfds", build))


# A shipped checkpoint made the way scripts/train_ladder.sh makes the real ones:
# dnl_conv_n1 trained for a few steps on the local Fashion-MNIST, then exported.
NAME = "dnl_conv_n1"
CONFIG_FILE = "configs/fmnist_dnl_ladder.py"
ROOT = pathlib.Path(__file__).resolve().parent.parent


def ladder_config(data_dir: str, steps: int = 12):
    """The DNL ladder's config for NAME, cut to `steps` small steps."""
    from dnl_zoo import config as config_lib

    config = config_lib.load(ROOT / CONFIG_FILE)
    config.model.name = NAME
    config.dataset.data_dir = data_dir
    config.num_train_steps = steps
    config.batch_size = 64
    config.eval_batch_size = 512
    config.checkpoint.every_steps = steps
    return config


@pytest.fixture(scope="session")
def shipped(fashion_mnist_dir, tmp_path_factory, worker_id):
    """(checkpoint root, manifest entry, config, workdir) of an exported run."""
    from dnl_zoo import pretrained, train

    config = ladder_config(fashion_mnist_dir)

    def build(directory):
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("DNL_ZOO_CHECKPOINTS", str(directory / "checkpoints"))
            train.train_and_evaluate(config, directory / "run")
            pretrained.export(NAME, config, directory / "run", config_file=CONFIG_FILE)

    directory = built_once(tmp_path_factory, worker_id, "shipped", build)
    root = directory / "checkpoints"
    entry = json.loads((root / "manifest.json").read_text())["models"][NAME]
    return root, entry, config, directory / "run"


@pytest.fixture
def checkpoints(shipped, monkeypatch, tmp_path):
    """A private copy of the exported checkpoints, in use for one test."""
    copy = tmp_path / "checkpoints"
    shutil.copytree(shipped[0], copy)
    monkeypatch.setenv("DNL_ZOO_CHECKPOINTS", str(copy))
    return copy


def one_step(model, x, y) -> tuple:
    """Loss, gradients and updated statistics of one train step of `model` on
    (x, y), plus its eval logits after it; weights by per-layer path (a
    scanned block's stacked ones unstacked)."""
    import numpy as np
    import optax
    from flax import nnx

    from dnl_zoo.models import layers

    def loss_fn(model):
        logits = model(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    model.train()
    loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model)
    statistics = nnx.state(model, nnx.BatchStat)
    model.eval()
    logits = nnx.jit(lambda m, x: m(x))(model, x)

    def per_layer(state):
        flat = {".".join(map(str, k)): v[...] for k, v in nnx.to_flat_state(state)}
        return {k: np.asarray(v) for k, v in layers.per_layer(model, flat).items()}

    return float(loss), per_layer(grads), per_layer(statistics), np.asarray(logits)


def assert_same_step(result: tuple, reference: tuple) -> None:
    """Two (loss, grads, statistics, eval logits) of one training step agree to
    float32 rounding: what every block implementation owes the plain one."""
    import numpy as np

    loss, grads, stats, logits = result
    loss0, grads0, stats0, logits0 = reference
    assert loss == pytest.approx(loss0, rel=1e-6)
    assert grads.keys() == grads0.keys() and stats.keys() == stats0.keys()
    for key, expected in grads0.items():
        scale = np.max(np.abs(expected)) + 1e-12
        np.testing.assert_allclose(grads[key] / scale, expected / scale, atol=2e-5)
    for key, expected in stats0.items():
        np.testing.assert_allclose(stats[key], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits, logits0, rtol=1e-4, atol=1e-5)


def gradient_temp_bytes(block, input_shape: tuple) -> int:
    """XLA's temporary bytes of the compiled training gradient of `block`
    (an NNX module in train mode) on float32 input of `input_shape`."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(block)

    def step(state, x):
        model = nnx.merge(graphdef, state)
        model.train()
        grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
        return grads, nnx.state(model)

    x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    compiled = jax.jit(step).lower(state, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes
