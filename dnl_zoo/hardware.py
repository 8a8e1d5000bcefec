"""The machine a figure was measured on, in words, for manifests and benchmarks."""

import os
import platform

import jax


def describe() -> str:
    """Processor, core count and JAX device kind, e.g. 'AMD EPYC ..., 2 cores, ...'."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [
                line.split(":", 1)[1].strip() for line in f if "model name" in line
            ]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    device = jax.devices()[0]
    return f"{cpu}, {os.cpu_count()} cores, JAX on {device.device_kind}"
