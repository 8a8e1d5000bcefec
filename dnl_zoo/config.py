"""Experiment configs: `configs/*.py` files and command-line overrides.

Every experiment is one Python file whose `get_config()` returns an
`ml_collections.ConfigDict`; `base_config()` holds the keys every trainer run
reads, so a config file names a model and dataset and overrides a few keys.
On the command line any key can be set as `--config.optimizer.learning_rate=0.05`;
values are parsed as Python literals and must keep the type of the key they
replace, and an unknown key is an error that lists the close matches.
"""

import ast
import difflib
import importlib.util
import os
import pathlib

import ml_collections

ConfigDict = ml_collections.ConfigDict


def base_config() -> ConfigDict:
    """Defaults for every key the trainer reads."""
    c = ConfigDict()
    c.seed = 0
    c.model = ConfigDict(dict(name="densenet_bc100_k12", overrides=ConfigDict()))
    c.dataset = ConfigDict(
        dict(
            name="fashion_mnist",
            data_dir="",
            augment="default",
            train_split="",  # '' for the dataset's own, e.g. 'train[:5000]'
            eval_split="",
        )
    )
    # Fine-tuning: start from the shipped weights of model.name.
    c.init = ConfigDict(dict(pretrained="", new_head=True, freeze_body=False))
    c.batch_size = 64  # global, over every device and process
    c.num_epochs = 1.0
    c.num_train_steps = -1  # > 0 overrides num_epochs
    c.optimizer = ConfigDict(
        dict(
            name="sgd",  # 'sgd' or 'adamw'
            learning_rate=0.1,
            momentum=0.9,
            nesterov=True,
            weight_decay=1e-4,
            # DNL models: SGD on the fields (depth.field_metric_scales)
            field_metric=False,
        )
    )
    c.schedule = ConfigDict(
        dict(
            name="cosine",  # 'cosine', 'step' or 'constant'
            warmup_epochs=0.0,
            boundaries=(0.5, 0.75),  # 'step': fractions of training
            decay_factor=0.1,
        )
    )
    c.regulariser = ConfigDict(dict(alpha=0.0, beta=0.0))  # R_N, DNL models
    c.parallelism = "jit"  # 'jit' (mesh + NamedSharding) or 'pmap'
    c.compute_dtype = "float32"  # or 'bfloat16' (parameters stay float32)
    c.log_every_steps = 50
    c.eval_every_steps = -1  # -1: at the end of every epoch
    c.eval_batch_size = 500
    c.checkpoint = ConfigDict(dict(every_steps=500, keep=3, keep_best=True))
    c.progress_bar = True
    return c


def load(path: str | os.PathLike) -> ConfigDict:
    """Runs `get_config()` of the config file at `path`."""
    path = pathlib.Path(path)
    if not path.is_file():
        known = sorted(p.name for p in pathlib.Path("configs").glob("*.py"))
        raise FileNotFoundError(
            f"no config file {path}; the configs in ./configs are {known}"
        )
    spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"{path} defines no get_config()")
    return module.get_config()


def _keys(config: ConfigDict, prefix: str = "") -> list[str]:
    out = []
    for key, value in config.items():
        out.append(prefix + key)
        if isinstance(value, ConfigDict):
            out += _keys(value, f"{prefix}{key}.")
    return out


def _parse(text: str, old):
    """`text` as a Python literal of the type of `old` (a bare word: a string)."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(old, bool) or old is None:
        return value
    if isinstance(old, float) and isinstance(value, int):
        return float(value)
    if isinstance(old, tuple) and isinstance(value, list):
        return tuple(value)
    if isinstance(old, str):
        return text if not isinstance(value, str) else value
    if type(value) is not type(old):
        raise ValueError(f"expected a {type(old).__name__} like {old!r}, got {text!r}")
    return value


def override(config: ConfigDict, assignments: list[str]) -> ConfigDict:
    """Applies 'a.b=value' assignments; model.overrides accepts new keys."""
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        key = key.removeprefix("--").removeprefix("config.")
        if not sep:
            raise ValueError(f"expected --config.KEY=VALUE, got {assignment!r}")
        *parents, leaf = key.split(".")
        node = config
        for i, name in enumerate(parents):
            if name not in node or not isinstance(node[name], ConfigDict):
                _unknown(config, ".".join(parents[: i + 1]))
            node = node[name]
        if key.startswith("model.overrides."):
            node[leaf] = _parse(text, None)
            continue
        if leaf not in node:
            _unknown(config, key)
        try:
            node[leaf] = _parse(text, node[leaf])
        except ValueError as error:
            raise ValueError(f"--config.{key}: {error}") from None
    return config


def _unknown(config: ConfigDict, key: str):
    close = difflib.get_close_matches(key, _keys(config), n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise KeyError(f"unknown config key {key!r}{hint}")
