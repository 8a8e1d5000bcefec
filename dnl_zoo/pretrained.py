"""Shipped pretrained weights: which exist, and loading them.

The manifest `checkpoints/manifest.json` lists every shipped checkpoint with the
sha256 of each of its files. No checkpoint ships yet, so `load` can only say so.
"""

import json
import pathlib

from flax import nnx

CHECKPOINT_DIR = pathlib.Path(__file__).resolve().parent.parent / "checkpoints"
MANIFEST = CHECKPOINT_DIR / "manifest.json"


class PretrainedUnavailableError(LookupError):
    """Raised when pretrained weights are asked of a model that has none."""


def manifest() -> dict:
    """The manifest's entries by registry name ({} when none ship)."""
    if not MANIFEST.exists():
        return {}
    return json.loads(MANIFEST.read_text())["models"]


def available(name: str) -> bool:
    """Whether pretrained weights ship for registry name `name`."""
    return name in manifest()


def load(name: str, *, seed: int = 0, **kwargs) -> nnx.Module:
    """Builds `name` and loads its shipped weights."""
    shipped = sorted(manifest())
    # TODO: restore the Orbax checkpoint named in the manifest once the first
    # trained checkpoints ship; until then no name has weights to load.
    raise PretrainedUnavailableError(
        f"no pretrained weights ship for {name!r}; models with weights: "
        f"{shipped or 'none yet'}. Train one with the train command, or bring "
        "the published ImageNet weights of densenet121/169/201 with "
        "dnl_zoo.convert.from_keras or dnl_zoo.convert.from_torch"
    )
