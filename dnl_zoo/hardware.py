"""The machine a figure was measured on, in words, for manifests and benchmarks."""

import os
import platform

import jax


def describe() -> str:
    """Processor, cores and JAX devices: 'AMD EPYC, 2 cores, JAX on 2 cpu devices'."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [
                line.split(":", 1)[1].strip() for line in f if "model name" in line
            ]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    count, kind = jax.device_count(), jax.devices()[0].device_kind
    devices = f"{count} {kind} device" + ("s" if count > 1 else "")
    return f"{cpu}, {os.cpu_count()} cores, JAX on {devices}"


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def use_cpu_cores() -> int | None:
    """Gives JAX one CPU device per core, so that data parallelism uses them all.

    XLA's CPU client runs many operations of one device on a single thread; a
    data-parallel step over one device per core keeps every core busy (BC-40 on
    Fashion-MNIST trains about 1.2x faster on 2 cores). The count is the largest
    power of two <= the usable cores, so that batch sizes divide it; set
    DNL_ZOO_CPU_DEVICES=N to choose N (1 turns this off). Leaves the count alone
    where XLA_FLAGS already sets it. Only the CPU client is affected: on GPU and
    TPU the accelerators remain the default devices.

    Call it before the first JAX computation; once JAX's backends exist it
    changes nothing.

    Returns:
      The CPU device count it set, or None where it set none.
    """
    chosen = os.environ.get("DNL_ZOO_CPU_DEVICES", "")
    if chosen and not (chosen.isdigit() and int(chosen) > 0):
        raise ValueError(
            f"DNL_ZOO_CPU_DEVICES must be a positive integer, got {chosen!r}"
        )
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return None
    count = int(chosen) if chosen else 2 ** (usable_cores().bit_length() - 1)
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # the backends exist already
        return None
    return count
