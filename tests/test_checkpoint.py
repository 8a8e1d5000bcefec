"""Model directories: exact round trips, failed saves that lose nothing, clear
errors for damaged directories, and depth transfer between directories."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

import dnl_zoo
from dnl_zoo import checkpoint, depth


def weights(model) -> list[np.ndarray]:
    return [
        np.asarray(x) for x in jax.tree.leaves(nnx.state(model, checkpoint.WEIGHTS))
    ]


def assert_same(a, b) -> None:
    for x, y in zip(weights(a), weights(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("name", ["densenet40_k12", "dnl_nonlocal_n2"])
def test_save_and_load_give_identical_models(tmp_path, name):
    model = dnl_zoo.create_model(name, seed=3)
    checkpoint.save_model(tmp_path, model)
    restored = checkpoint.load_model(tmp_path)
    assert type(restored) is type(model)
    assert restored.config == model.config
    assert_same(model, restored)
    x = jax.random.normal(jax.random.key(0), (2, 28, 28, model.in_channels))
    model.eval()
    forward = nnx.jit(lambda m, x: m(x))  # eager runs compile per layer shape
    np.testing.assert_array_equal(forward(model, x), forward(restored, x))


def test_a_failed_save_leaves_the_last_good_model(tmp_path, monkeypatch):
    good = dnl_zoo.create_model("dnl_conv_n2", seed=1)
    checkpoint.save_model(tmp_path, good)

    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.ocp.StandardCheckpointer, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_model(tmp_path, dnl_zoo.create_model("dnl_conv_n2", seed=2))
    monkeypatch.undo()
    assert_same(checkpoint.load_model(tmp_path), good)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "weights"]


def test_damaged_directories_give_clear_errors(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="expected .*model.json"):
        checkpoint.load_model(tmp_path)
    checkpoint.save_model(tmp_path, dnl_zoo.create_model("dnl_conv_n2"))
    meta = tmp_path / "model.json"
    text = meta.read_text()
    meta.write_text(text[: len(text) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="not valid JSON"):
        checkpoint.load_model(tmp_path)
    wider = json.loads(text)
    wider["config"]["growth_rate"] = 16
    meta.write_text(json.dumps(wider))
    with pytest.raises(checkpoint.CheckpointError, match="does not match"):
        checkpoint.load_model(tmp_path)


def test_transfer_between_model_directories(tmp_path):
    model = dnl_zoo.create_model("dnl_conv_n4", seed=5)
    checkpoint.save_model(tmp_path / "n4", model)
    depth.transfer_checkpoint(tmp_path / "n4", tmp_path / "n8", 8)
    back = depth.transfer_checkpoint(tmp_path / "n8", tmp_path / "back", 4)
    assert [b.num_layers for b in checkpoint.load_model(tmp_path / "n8").blocks] == [
        8
    ] * 3
    assert_same(back, model)
    checkpoint.save_model(tmp_path / "dense", dnl_zoo.create_model("densenet40_k12"))
    with pytest.raises(ValueError, match="needs a DNLNet"):
        depth.transfer_checkpoint(tmp_path / "dense", tmp_path / "x", 8)
