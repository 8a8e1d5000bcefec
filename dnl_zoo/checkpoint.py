"""Model checkpoints: weights and the constructor arguments that rebuild them.

A model directory holds

    model.json   {"format": 1, "class": "DenseNet" | "DNLNet", "config": {...}}
    weights/     an Orbax checkpoint of the parameters and BatchNorm statistics

and nothing else (no optimiser state, no RNG state): the form in which models are
shipped and moved between depths. Orbax writes `weights/` under a temporary name
and renames it when complete, and `model.json` is replaced only after that, so a
save that fails leaves the previous model in the directory intact.

Training checkpoints (optimiser and input state, keep-last-K, resume) are the
trainer's (dnl_zoo.train); `dnl-zoo export` turns a finished run into this form.
"""

import json
import os
import pathlib
import shutil
import tempfile

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from dnl_zoo.models import layers
from dnl_zoo.models.densenet import DenseNet
from dnl_zoo.models.dnl import DNLNet

FORMAT = 1
CLASSES = {"DenseNet": DenseNet, "DNLNet": DNLNet}
WEIGHTS = layers.WEIGHTS


class CheckpointError(ValueError):
    """Raised when a model directory is missing, incomplete or does not fit."""


def _jsonable(config: dict) -> dict:
    out = {}
    for key, value in config.items():
        if key == "dtype":
            value = None if value is None else np.dtype(value).name
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def _from_json(config: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


def save_model(directory: str | os.PathLike, model: nnx.Module) -> pathlib.Path:
    """Writes `model` (a DenseNet or DNLNet) to `directory`; returns its path."""
    name = type(model).__name__
    if name not in CLASSES:
        raise CheckpointError(
            f"save_model saves {sorted(CLASSES)}, got a {name}; save its "
            "nnx.state with Orbax directly"
        )
    directory = pathlib.Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".saving-", dir=directory))
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(staging / "weights", nnx.state(model, WEIGHTS))
            checkpointer.wait_until_finished()  # saves are asynchronous
        # Orbax's commit marker names the absolute path it wrote to; a model
        # directory is meant to move (and ship), and restoring does not read it.
        (staging / "weights" / "commit_success.txt").unlink(missing_ok=True)
        meta = {"format": FORMAT, "class": name, "config": _jsonable(model.config)}
        (staging / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
        _replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _replace(staging: pathlib.Path, directory: pathlib.Path) -> None:
    """Moves the staged weights and then model.json into place."""
    old = directory / ".previous-weights"
    shutil.rmtree(old, ignore_errors=True)
    if (directory / "weights").exists():
        (directory / "weights").rename(old)
    (staging / "weights").rename(directory / "weights")
    os.replace(staging / "model.json", directory / "model.json")
    shutil.rmtree(old, ignore_errors=True)


def read_meta(directory: str | os.PathLike) -> dict:
    """The parsed model.json of a model directory, or a readable error."""
    path = pathlib.Path(directory) / "model.json"
    if not path.is_file():
        raise CheckpointError(
            f"{directory} is not a dnl_zoo model directory: expected {path} "
            "(written by dnl_zoo.checkpoint.save_model)"
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(
            f"{path} is not valid JSON ({error}); re-save it"
        ) from None
    if meta.get("format") != FORMAT or meta.get("class") not in CLASSES:
        raise CheckpointError(
            f"{path}: expected format {FORMAT} and a class in {sorted(CLASSES)}, "
            f"got format {meta.get('format')!r}, class {meta.get('class')!r}"
        )
    return meta


def build(meta: dict, **overrides) -> nnx.Module:
    """An untrained model of the class and config recorded in `meta`."""
    config = _from_json(meta["config"]) | overrides
    return CLASSES[meta["class"]](**config, rngs=nnx.Rngs(0))


def _check_shapes(checkpointer, weights: pathlib.Path, model: nnx.Module) -> None:
    """Compares stored shapes with the model's before Orbax reads any array."""
    stored = {
        array.name.removesuffix(".value"): tuple(array.shape)
        for array in jax.tree.leaves(checkpointer.metadata(weights).item_metadata)
    }
    expected = {k: tuple(v[...].shape) for k, v in layers.named_weights(model).items()}
    for name, shape in expected.items():
        if stored.get(name) != shape:
            raise ValueError(
                f"{name} should have shape {shape}, the checkpoint has "
                f"{stored.get(name, 'no such array')}"
            )
    extra = sorted(set(stored) - set(expected))
    if extra:
        raise ValueError(f"the checkpoint has arrays the model lacks: {extra[:3]}")


def load_model(directory: str | os.PathLike) -> nnx.Module:
    """Rebuilds and restores the model saved in `directory`, in eval mode."""
    meta = read_meta(directory)
    model = build(meta)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state(model, WEIGHTS))
    weights = pathlib.Path(directory).resolve() / "weights"
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            _check_shapes(checkpointer, weights, model)
            restored = checkpointer.restore(weights, abstract)
    except (FileNotFoundError, ValueError, KeyError) as error:
        raise CheckpointError(
            f"could not restore the weights in {weights}: {error}. The directory "
            "is incomplete or does not match its model.json"
        ) from None
    nnx.update(model, restored)
    model.eval()
    return model
