"""Whole training runs on the real Fashion-MNIST (prepared offline): resume
after SIGKILL, restore across device counts, damaged checkpoints, non-finite
losses, and two processes that agree with one."""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dnl_zoo import config as config_lib
from dnl_zoo import train

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "fashion_mnist_small.py"


def overrides(data_dir, **extra) -> list[str]:
    values = (
        dict(
            model_name="dnl_conv_n2",
            num_train_steps=24,
            batch_size=32,
            eval_batch_size=2000,
            every_steps=6,
            log_every_steps=6,
            eval_every_steps=12,
        )
        | extra
    )
    return [
        f"--config.model.name={values['model_name']}",
        f"--config.num_train_steps={values['num_train_steps']}",
        f"--config.batch_size={values['batch_size']}",
        f"--config.eval_batch_size={values['eval_batch_size']}",
        f"--config.checkpoint.every_steps={values['every_steps']}",
        f"--config.log_every_steps={values['log_every_steps']}",
        f"--config.eval_every_steps={values['eval_every_steps']}",
        f"--config.dataset.data_dir={data_dir}",
        "--config.dataset.eval_split=test[:2000]",
        "--config.progress_bar=False",
    ]


def make_config(data_dir, **extra):
    return config_lib.override(config_lib.load(CONFIG), overrides(data_dir, **extra))


def cli(workdir, data_dir, devices: int = 8, extra=(), **kw) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dnl_zoo",
        "train",
        "--config",
        str(CONFIG),
        "--workdir",
        str(workdir),
        *overrides(data_dir, **kw),
        *extra,
    ]


def env(devices: int) -> dict:
    return os.environ | {
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
    }


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_sigkill_and_restart_end_bit_for_bit_like_one_run(tmp_path, fashion_mnist_dir):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    subprocess.run(cli(whole, fashion_mnist_dir), env=env(8), check=True)
    process = subprocess.Popen(cli(broken, fashion_mnist_dir), env=env(8))
    checkpoints = broken / "checkpoints"
    deadline = time.time() + 300
    while not (checkpoints / "12").exists() and process.poll() is None:
        assert time.time() < deadline, "no checkpoint of step 12 within 300 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (checkpoints / "24").exists(), "the run finished before the kill"
    subprocess.run(cli(broken, fashion_mnist_dir), env=env(8), check=True)
    config = make_config(fashion_mnist_dir)
    assert_identical(
        train.restore_params(config, whole), train.restore_params(config, broken)
    )


def test_damaged_checkpoint_is_a_clear_error_and_the_previous_restores(
    tmp_path, fashion_mnist_dir
):
    config = make_config(fashion_mnist_dir, num_train_steps=12)
    finished = train.train_and_evaluate(config, tmp_path)
    # Run again, a finished run reports the same final metrics.
    assert train.train_and_evaluate(config, tmp_path) == finished
    assert finished["step"] == 12 and finished["eval_top1"] > 0
    files = [p for p in (tmp_path / "checkpoints" / "12").rglob("*") if p.is_file()]
    largest = max(files, key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 3])
    with pytest.raises(train.CheckpointDamagedError, match="Delete that step"):
        train.evaluate_workdir(config, tmp_path)
    shutil.rmtree(tmp_path / "checkpoints" / "12")
    assert train.evaluate_workdir(config, tmp_path)["step"] == 6


def test_non_finite_loss_stops_and_names_the_step(tmp_path, fashion_mnist_dir):
    good = make_config(fashion_mnist_dir, num_train_steps=4, every_steps=4)
    train.train_and_evaluate(good, tmp_path)
    # Resume the same run with a learning rate that blows it up.
    config = make_config(fashion_mnist_dir, num_train_steps=24, every_steps=100)
    config.optimizer.learning_rate = 1e30
    with pytest.raises(train.NonFiniteLossError, match=r"at step (\d+)") as error:
        train.train_and_evaluate(config, tmp_path)
    assert "last good checkpoint is step 4" in str(error.value)
    params = train.restore_params(config, tmp_path)
    assert all(np.all(np.isfinite(v)) for v in params.values())


def test_batch_that_does_not_divide_over_devices(tmp_path, fashion_mnist_dir):
    config = make_config(fashion_mnist_dir, batch_size=30)
    with pytest.raises(ValueError, match="batch_size=30 does not divide over 8"):
        train.train_and_evaluate(config, tmp_path)
