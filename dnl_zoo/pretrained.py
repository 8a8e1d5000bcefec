"""Shipped pretrained weights: exporting, verifying, loading and evaluating them.

`checkpoints/manifest.json` lists every shipped model directory
(`checkpoints/NAME/`, the form `dnl_zoo.checkpoint.save_model` writes) with the
sha256 of each of its files, the config that trained it, and its test metrics as
`evaluate` (the `dnl-zoo eval NAME` command) measured them. Nothing is read from
a model directory before all of its hashes match.

The directory is looked up next to the package (a checkout of the repository,
as `pip install -e .` and the Colab notebooks have it); the environment variable
DNL_ZOO_CHECKPOINTS points elsewhere.
"""

import datetime
import hashlib
import json
import os
import pathlib

import ml_collections
from flax import nnx

from dnl_zoo import checkpoint, hardware
from dnl_zoo.models import layers, registry

_REPOSITORY = pathlib.Path(__file__).resolve().parent.parent
CLASSIFIER = "classifier."  # prefix of the head's weight paths in both families


class PretrainedUnavailableError(LookupError):
    """Raised when pretrained weights are asked of a model that has none."""


class ChecksumError(ValueError):
    """Raised when a shipped file is missing, extra or has another sha256."""


def checkpoint_dir() -> pathlib.Path:
    """Where shipped model directories and manifest.json live."""
    return pathlib.Path(
        os.environ.get("DNL_ZOO_CHECKPOINTS", _REPOSITORY / "checkpoints")
    )


def _manifest_path() -> pathlib.Path:
    return checkpoint_dir() / "manifest.json"


def manifest() -> dict:
    """The manifest's entries by registry name ({} when none ship)."""
    path = _manifest_path()
    if not path.exists():
        return {}
    return json.loads(path.read_text())["models"]


def available(name: str) -> bool:
    """Whether pretrained weights ship for registry name `name`."""
    return name in manifest()


def entry(name: str) -> dict:
    """The manifest entry of `name`, or an error naming the models that ship."""
    entries = manifest()
    if name not in entries:
        raise PretrainedUnavailableError(
            f"no pretrained weights ship for {name!r}; models with weights: "
            f"{sorted(entries) or 'none'} (in {checkpoint_dir()}). Train one with "
            "`dnl-zoo train` and export it with `dnl-zoo export`, or convert the "
            "published ImageNet weights with dnl_zoo.convert.from_keras/from_torch"
        )
    return entries[name]


def sha256(path: pathlib.Path) -> str:
    """The hex sha256 of one file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_hashes(directory: pathlib.Path) -> dict[str, str]:
    """{path relative to `directory`: sha256} of every file below it, sorted."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    return {p.relative_to(directory).as_posix(): sha256(p) for p in files}


def verify(name: str) -> pathlib.Path:
    """Checks every file of `name`'s directory against the manifest.

    Returns:
      The model directory, once every listed file exists with its sha256 and
      no other file is there.
    """
    expected = entry(name)["files"]
    directory = checkpoint_dir() / name
    found = file_hashes(directory) if directory.is_dir() else {}
    problems = [
        f"{path}: expected sha256 {digest[:12]}..., "
        + (f"found {found[path][:12]}..." if path in found else "the file is missing")
        for path, digest in expected.items()
        if found.get(path) != digest
    ]
    problems += [
        f"{path}: not in the manifest" for path in sorted(set(found) - set(expected))
    ]
    if problems:
        raise ChecksumError(
            f"the shipped weights of {name} in {directory} do not match "
            f"{_manifest_path()}: " + "; ".join(problems[:4]) + ". Nothing was "
            "loaded. Restore the directory (`git checkout -- checkpoints/"
            f"{name}`) or export it again with `dnl-zoo export`"
        )
    return directory


def load(name: str, *, seed: int = 0, new_head: bool = False, **kwargs) -> nnx.Module:
    """Builds `name` with `kwargs` and loads its verified shipped weights.

    With `new_head`, or a `num_classes` other than the shipped one, the
    classifier keeps its fresh initialisation (a new head for fine-tuning);
    every other weight must keep its shipped shape.

    Returns:
      The model in train mode, like an untrained `create_model`.
    """
    shipped = checkpoint.load_model(verify(name))
    values = layers.weight_values(shipped)
    model = registry.get_spec(name).builder(**kwargs, rngs=nnx.Rngs(seed))
    head = {k: v.shape for k, v in layers.weight_values(model).items()}
    resized = any(head[k] != values[k].shape for k in head if k.startswith(CLASSIFIER))
    if new_head or resized:
        values = {k: v for k, v in values.items() if not k.startswith(CLASSIFIER)}
    try:
        layers.load_weights(model, values)
    except (KeyError, ValueError) as error:
        raise ValueError(
            f"the shipped weights of {name} do not fit the model built with "
            f"{sorted(kwargs)}: {error}. Only num_classes (a new head), dtype "
            "and dropout may differ from the shipped model"
        ) from None
    model.train()
    return model


def config(name: str) -> ml_collections.ConfigDict:
    """The training config recorded for `name` in the manifest."""
    from dnl_zoo.config import base_config

    # Over today's defaults, so that entries written before a key existed load.
    return _merge(base_config(), entry(name)["config"])


def _merge(config: ml_collections.ConfigDict, recorded: dict):
    for key, value in recorded.items():
        if isinstance(value, dict) and isinstance(
            config.get(key), ml_collections.ConfigDict
        ):
            _merge(config[key], value)
        else:
            config[key] = value
    return config


def evaluate(
    name: str, *, data_dir: str | None = None, batch_size: int | None = None
) -> dict:
    """Test loss and top-1/top-5 accuracy (%) of the shipped `name`.

    Runs on every device, with any batch size (rounded up to a multiple of the
    device count; padding is masked out).
    """
    from dnl_zoo import train

    cfg = config(name)
    if data_dir is not None:
        cfg.dataset.data_dir = data_dir
    cfg.eval_batch_size = batch_size or cfg.eval_batch_size
    # The trainer's own model building, starting from the verified weights.
    cfg.init.update(pretrained=name, new_head=False, freeze_body=False)
    model = train.create_model(cfg, train.dataset_info(cfg))
    return train.evaluate_model(cfg, model)


def _recipe(cfg) -> str:
    opt, sched = cfg.optimizer, cfg.schedule
    steps = cfg.num_train_steps
    length = f"{steps} steps" if steps > 0 else f"{cfg.num_epochs:g} epochs"
    momentum = f", {'Nesterov ' if opt.nesterov else ''}momentum {opt.momentum}"
    return (
        f"batch {cfg.batch_size}, {opt.name}{momentum if opt.name == 'sgd' else ''}, "
        f"lr {opt.learning_rate}, weight decay {opt.weight_decay}, {sched.name} "
        f"schedule, {sched.warmup_epochs} warm-up epochs, {length}, "
        f"augment {cfg.dataset.augment!r}, {cfg.compute_dtype}"
    )


def _portable(cfg) -> dict:
    """`cfg` as a dict without the machine's data directory."""
    out = cfg.to_dict()
    out["dataset"]["data_dir"] = ""
    return out


def export(name: str, cfg, workdir: str | os.PathLike, *, config_file: str) -> dict:
    """Ships the final checkpoint of a finished run as `checkpoints/name/`.

    Writes the weights (float32 parameters and BatchNorm statistics, no
    optimiser state), hashes every file, evaluates the shipped model exactly as
    `dnl-zoo eval name` does, and records all of it in the manifest.

    Returns:
      The new manifest entry.
    """
    from dnl_zoo import data, train

    info = train.dataset_info(cfg)
    params, meta = train.restore_params(cfg, workdir, with_meta=True)
    total = train.total_steps(cfg)
    if meta["step"] != total:
        raise ValueError(
            f"{workdir} holds step {meta['step']} of {total}: finish the run "
            f"(`dnl-zoo train` resumes it) before exporting {name}"
        )
    model = train.create_model(cfg, info)
    layers.load_weights(model, params)
    directory = checkpoint_dir() / name
    checkpoint.save_model(directory, model)
    spec_info = registry.model_info(name)
    new = {
        "name": name,
        "family": spec_info["family"],
        "description": spec_info["description"],
        "params": spec_info["params"],
        "flops": spec_info["flops"],
        "input_size": list(spec_info["input_size"]),
        "dataset": {
            "name": cfg.dataset.name,
            "version": data.dataset_version(cfg.dataset.name, cfg.dataset.data_dir),
            "train_split": cfg.dataset.train_split or info.train_split,
            "eval_split": cfg.dataset.eval_split or info.eval_split,
        },
        "config_file": config_file,
        "config": _portable(cfg),
        "recipe": _recipe(cfg),
        "epochs": meta["epoch"],
        "steps": meta["step"],
        "wall_seconds": round(meta["wall_seconds"], 1)
        if "wall_seconds" in meta
        else None,
        # Runs saved before the trainer recorded it: the exporting machine's.
        "hardware": meta.get("hardware") or hardware.describe(),
        "exported": datetime.date.today().isoformat(),
        "files": file_hashes(directory),
    }
    _write_entry(name, new)
    new["test"] = evaluate(name, data_dir=cfg.dataset.data_dir or None)
    _write_entry(name, new)
    return new


def _write_entry(name: str, new: dict) -> None:
    """Adds or replaces one entry; the manifest file is replaced atomically."""
    path = _manifest_path()
    entries = manifest() | {name: new}
    text = json.dumps({"format": 1, "models": dict(sorted(entries.items()))}, indent=1)
    staging = path.with_suffix(".json.tmp")
    staging.write_text(text + "\n")
    os.replace(staging, path)
