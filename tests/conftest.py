"""Test set-up: 8 fake CPU devices, so sharding tests run on any machine."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8"
os.environ.setdefault("KERAS_BACKEND", "jax")
