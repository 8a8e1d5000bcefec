"""Training runs across device counts and processes: restore a checkpoint onto
other device counts, and two gloo processes that train like one.

Split from test_training_runs.py so that the two pytest workers share the
longest runs.
"""

import json
import socket
import subprocess
import sys

import numpy as np
import pytest
from test_training_runs import CONFIG, cli, env, make_config, overrides

from dnl_zoo import train


def test_checkpoints_restore_on_other_device_counts(tmp_path, fashion_mnist_dir):
    config = make_config(fashion_mnist_dir, num_train_steps=6)
    on_one = tmp_path / "one"
    subprocess.run(
        cli(on_one, fashion_mnist_dir, num_train_steps=6), env=env(1), check=True
    )
    on_eight = tmp_path / "eight"
    train.train_and_evaluate(config, on_eight)
    # Written on 1 device, read here on 8; and the reverse in a 1-device process.
    eight = train.evaluate_workdir(config, on_eight)
    one = train.evaluate_workdir(config, on_one)
    command = [
        sys.executable,
        "-m",
        "dnl_zoo",
        "eval",
        "--config",
        str(CONFIG),
        "--workdir",
        str(on_eight),
        *overrides(fashion_mnist_dir, num_train_steps=6),
    ]
    out = subprocess.run(
        command, env=env(1), check=True, capture_output=True, text=True
    )
    eight_on_one = json.loads(out.stdout.strip().splitlines()[-1])
    assert eight_on_one["eval_top1"] == pytest.approx(eight["eval_top1"], abs=1e-9)
    assert eight_on_one["eval_loss"] == pytest.approx(eight["eval_loss"], rel=1e-5)
    assert one["step"] == eight["step"] == 6
    # One device and eight train the same model up to float32 rounding.
    assert one["eval_loss"] == pytest.approx(eight["eval_loss"], rel=1e-3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_agree_with_one(tmp_path, fashion_mnist_dir):
    steps = dict(num_train_steps=6, every_steps=6, eval_every_steps=6)
    single = tmp_path / "single"
    subprocess.run(cli(single, fashion_mnist_dir, **steps), env=env(4), check=True)
    port = free_port()
    workers = [
        subprocess.Popen(
            cli(
                tmp_path / "multi",
                fashion_mnist_dir,
                extra=[
                    f"--coordinator=127.0.0.1:{port}",
                    "--num-processes=2",
                    f"--process-id={i}",
                ],
                **steps,
            ),
            env=env(2),
        )
        for i in range(2)
    ]
    for worker in workers:
        assert worker.wait(timeout=600) == 0
    config = make_config(fashion_mnist_dir, **steps)
    a = train.restore_params(config, single)
    b = train.restore_params(config, tmp_path / "multi")
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5, err_msg=key)
