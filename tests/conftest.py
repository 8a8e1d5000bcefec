"""Test set-up: 8 fake CPU devices, so sharding tests run on any machine."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8"
# Keras on its numpy backend builds and runs the reference models in a second
# or two, and shares no code path with the JAX model under test.
os.environ["KERAS_BACKEND"] = "numpy"


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def fashion_mnist_dir(tmp_path_factory) -> str:
    """A TFDS data_dir with fashion_mnist built from Debian's IDX files, once."""
    from dnl_zoo import data

    data_dir = tmp_path_factory.mktemp("tfds")
    data.prepare("fashion_mnist", data.DEBIAN_FASHION_MNIST, str(data_dir))
    return str(data_dir)
