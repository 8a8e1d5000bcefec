"""Test set-up: 8 fake CPU devices, so sharding tests run on any machine."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8"
# Keras on its numpy backend builds and runs the reference models in a second
# or two, and shares no code path with the JAX model under test.
os.environ["KERAS_BACKEND"] = "numpy"
