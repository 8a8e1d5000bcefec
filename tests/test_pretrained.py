"""Exporting, verifying, loading, evaluating and fine-tuning shipped checkpoints.

A session fixture trains dnl_conv_n1 for a few steps on the local Fashion-MNIST
and exports it into a temporary checkpoint directory, exactly as
scripts/train_ladder.sh ships the real ladders.
"""

import gzip
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import CONFIG_FILE, NAME, ROOT, ladder_config

import dnl_zoo
from dnl_zoo import cli, data, pretrained, reproduce, train
from dnl_zoo import config as config_lib
from dnl_zoo.models import layers


def test_export_records_what_eval_measures_and_every_files_hash(
    shipped, checkpoints, fashion_mnist_dir, capsys
):
    _, entry, config, workdir = shipped
    for key in ("params", "flops", "recipe", "hardware", "wall_seconds", "dataset"):
        assert entry[key], key
    # The hardware is what the trainer recorded, device count included.
    _, meta = train.restore_params(config, workdir, with_meta=True)
    assert entry["hardware"] == meta["hardware"]
    assert f"JAX on {jax.device_count()} cpu device" in entry["hardware"]
    assert entry["dataset"] == {
        "name": "fashion_mnist",
        "version": "3.0.1",
        "train_split": "train",
        "eval_split": "test",
    }
    files = sorted(p for p in (checkpoints / NAME).rglob("*") if p.is_file())
    assert sorted(entry["files"]) == [
        p.relative_to(checkpoints / NAME).as_posix() for p in files
    ]
    # No file names the machine it was written on.
    for path in [*files, checkpoints / "manifest.json"]:
        assert str(shipped[0]).encode() not in path.read_bytes(), path
    assert entry["config"]["dataset"]["data_dir"] == ""

    assert cli.main(["eval", NAME, "--data-dir", fashion_mnist_dir]) == 0
    measured = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert measured["eval_top1"] == entry["test"]["eval_top1"]
    assert measured["eval_loss"] == pytest.approx(entry["test"]["eval_loss"], abs=1e-6)


def test_pretrained_model_holds_the_runs_final_weights(shipped, checkpoints):
    _, _, config, workdir = shipped
    expected = train.restore_params(config, workdir)
    model = dnl_zoo.create_model(NAME, pretrained=True)
    loaded = {k: np.asarray(v[...]) for k, v in layers.named_weights(model).items()}
    assert sorted(loaded) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)


@pytest.mark.parametrize("damage", ["flip a byte", "delete a file", "add a file"])
def test_a_checkpoint_that_differs_from_the_manifest_is_refused(
    checkpoints, damage, capsys
):
    directory = checkpoints / NAME
    victim = max((p for p in directory.rglob("*") if p.is_file()), key=os.path.getsize)
    if damage == "flip a byte":
        raw = bytearray(victim.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        victim.write_bytes(bytes(raw))
    elif damage == "delete a file":
        victim.unlink()
    else:
        (directory / "weights" / "extra").write_text("x")
    with pytest.raises(pretrained.ChecksumError, match="Nothing was loaded"):
        dnl_zoo.create_model(NAME, pretrained=True)
    assert cli.main(["eval", NAME]) == 2
    error = capsys.readouterr().err
    assert "do not match" in error and "git checkout -- checkpoints/" in error


def test_no_weights_for_a_model_names_those_that_ship(checkpoints):
    with pytest.raises(dnl_zoo.PretrainedUnavailableError, match=NAME):
        dnl_zoo.create_model("dnl_conv_n16", pretrained=True)


def test_a_new_head_keeps_the_body(checkpoints):
    shipped = layers.named_weights(dnl_zoo.create_model(NAME, pretrained=True))
    model = dnl_zoo.create_model(NAME, pretrained=True, num_classes=5)
    for key, variable in layers.named_weights(model).items():
        if key.startswith("classifier."):
            assert variable[...].shape[-1] == 5
        else:
            np.testing.assert_array_equal(variable[...], shipped[key][...], key)


def test_eval_on_one_device_and_another_batch_gives_the_same_figures(
    shipped, checkpoints, fashion_mnist_dir
):
    assert jax.device_count() == 8
    environment = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    command = [sys.executable, "-m", "dnl_zoo", "eval", NAME]
    command += ["--data-dir", fashion_mnist_dir, "--batch-size", "100"]
    out = subprocess.run(command, env=environment, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    single = json.loads(out.stdout.splitlines()[-1])
    eight = pretrained.evaluate(NAME, data_dir=fashion_mnist_dir, batch_size=504)
    assert single["eval_top1"] == eight["eval_top1"] == shipped[1]["test"]["eval_top1"]
    assert single["eval_loss"] == pytest.approx(eight["eval_loss"], abs=1e-5)


def test_finetune_with_a_frozen_body_changes_the_head_alone(
    checkpoints, fashion_mnist_dir, tmp_path
):
    config = train.finetune_config(
        NAME, "fashion_mnist", freeze_body=True, data_dir=fashion_mnist_dir
    )
    config.update(num_train_steps=6, batch_size=64)
    train.train_and_evaluate(config, tmp_path / "ft")
    before = layers.named_weights(dnl_zoo.create_model(NAME, pretrained=True))
    after = train.restore_params(config, tmp_path / "ft")
    for key, value in after.items():
        same = np.array_equal(value, before[key][...])
        # The body, its BatchNorm statistics included, stays as shipped.
        assert same != key.startswith("classifier."), key


def _write_idx(path: pathlib.Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(
        n.to_bytes(4, "big") for n in array.shape
    )
    path.write_bytes(gzip.compress(header + array.tobytes(), compresslevel=1))


def test_finetune_command_on_another_dataset(checkpoints, tmp_path, capsys):
    # Another task in MNIST's format: Fashion-MNIST transposed, labels rotated.
    source = tmp_path / "idx"
    source.mkdir()
    for images_stem, labels_stem in data.IDX_FILES.values():
        prefix = pathlib.Path(data.DEBIAN_FASHION_MNIST)
        images = data.read_idx(prefix / f"{images_stem}.gz")
        labels = data.read_idx(prefix / f"{labels_stem}.gz")
        _write_idx(source / f"{images_stem}.gz", images.transpose(0, 2, 1).copy())
        _write_idx(source / f"{labels_stem}.gz", ((labels + 3) % 10).astype(np.uint8))
    data_dir = tmp_path / "tfds"
    data.prepare("mnist", source, str(data_dir))
    command = ["finetune", NAME, "--dataset", "mnist", "--workdir", str(tmp_path / "w")]
    command += ["--data-dir", str(data_dir), "--config.num_train_steps=8"]
    command += ["--config.batch_size=64"]
    assert cli.main(command) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["step"] == 8 and 0 <= result["eval_top1"] <= 100


def test_export_refuses_an_unfinished_run(shipped, checkpoints):
    _, _, config, workdir = shipped
    longer = ladder_config(config.dataset.data_dir, steps=100)
    with pytest.raises(ValueError, match="holds step 12 of 100"):
        pretrained.export(NAME, longer, workdir, config_file=CONFIG_FILE)


def test_depth_table_of_the_shipped_models_matches_the_manifest(
    checkpoints, fashion_mnist_dir, tmp_path, capsys
):
    command = ["reproduce", "depth-table", "--data-dir", fashion_mnist_dir]
    assert cli.main([*command, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| dnl_conv_n1 | dnl_conv | N=1 | 18,946 |" in out
    assert "every row equals checkpoints/manifest.json: yes" in out
    assert (tmp_path / "depth_table.png").stat().st_size > 10_000


def test_sweep_trains_both_families_and_plots(fashion_mnist_dir, tmp_path, monkeypatch):
    tiny = reproduce.Budget((1,), 3, 32, "", "train[:256]")
    monkeypatch.setitem(reproduce.BUDGETS, "tiny", tiny)
    base = config_lib.load(ROOT / "configs/dnl_sweep_fashion_mnist.py")
    base.eval_batch_size = 512
    base.dataset.eval_split = "test[:512]"
    rows = reproduce.sweep("tiny", base, tmp_path, data_dir=fashion_mnist_dir)
    assert [(r["ladder"], r["depth"]) for r in rows] == [
        ("h = T/N", "N=1"),
        ("h = 1", "N=1"),
    ]
    # N = 1: h = T/N = 1, the same network in both families, trained once.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dnl_conv_n1"]
    assert rows[0]["train_loss"] == rows[1]["train_loss"]
    assert reproduce._network("dnl_conv_n2") != reproduce._network("dnl_conv_n2_h1")
    reproduce.plot(rows, tmp_path / "sweep.png", ("train_loss", "test_top1"))
    assert "| train loss |" in reproduce.markdown(rows)


def test_a_changed_budget_gets_runs_of_its_own():
    plan, name = reproduce.budget("quick")
    assert (plan, name) == (reproduce.BUDGETS["quick"], "quick")
    plan, name = reproduce.budget("quick", depths=[1, 2], steps=700, split="train[:5%]")
    assert (plan.depths, plan.num_train_steps, plan.train_split) == (
        (1, 2),
        700,
        "train[:5%]",
    )
    assert name == "quick_n1_2_steps700train5"
