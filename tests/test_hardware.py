"""One JAX CPU device per core, and a run clock that leaves out pauses."""

import os
import signal
import subprocess
import sys
import time

import pytest

from dnl_zoo import hardware

_DEVICES = (
    "from dnl_zoo import hardware; print(hardware.use_cpu_cores()); "
    "import jax; print(jax.device_count())"
)


def _run(code: str, **env) -> list[str]:
    base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=base | {"JAX_PLATFORMS": "cpu"} | env,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.split()


def test_one_device_per_core_as_a_power_of_two():
    expected = 2 ** (hardware.usable_cores().bit_length() - 1)
    assert _run(_DEVICES) == [str(expected), str(expected)]


def test_device_count_can_be_chosen():
    assert _run(_DEVICES, DNL_ZOO_CPU_DEVICES="3") == ["3", "3"]


def test_xla_flags_win():
    flags = "--xla_force_host_platform_device_count=5"
    assert _run(_DEVICES, XLA_FLAGS=flags, DNL_ZOO_CPU_DEVICES="3") == ["None", "5"]


def test_bad_device_count_is_refused():
    os.environ["DNL_ZOO_CPU_DEVICES"] = "two"
    try:
        with pytest.raises(ValueError, match="positive integer, got 'two'"):
            hardware.use_cpu_cores()
    finally:
        del os.environ["DNL_ZOO_CPU_DEVICES"]


def test_no_effect_once_jax_runs():
    # The test process has its devices already (conftest: 8 fake ones).
    import jax

    before = jax.device_count()
    assert hardware.use_cpu_cores() is None
    assert jax.device_count() == before


_CLOCK = """
import time
from dnl_zoo.train import RunClock
with RunClock() as clock:
    print("ready", flush=True)
    start, wall = clock.now(), time.perf_counter()
    while time.perf_counter() - wall < 2.5:
        time.sleep(0.01)
    print(round(clock.now() - start, 2), round(time.perf_counter() - wall, 2))
"""


def test_run_clock_leaves_out_a_sigtstp_pause():
    child = subprocess.Popen(
        [sys.executable, "-c", _CLOCK], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    child.send_signal(signal.SIGTSTP)
    time.sleep(1.5)  # stopped: the child's own loop does not advance
    child.send_signal(signal.SIGCONT)
    counted, wall = map(float, child.stdout.readline().split())
    child.wait(timeout=10)
    assert wall >= 2.5
    assert counted < wall - 1.0, (counted, wall)
