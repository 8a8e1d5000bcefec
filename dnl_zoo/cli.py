"""The `dnl-zoo` command line (also `python -m dnl_zoo`).

dnl-zoo models [PATTERN]          list registered models with their sizes
dnl-zoo info NAME                 one model's metadata as JSON
dnl-zoo summary NAME [options]    per-stage shapes, then a timed forward pass
"""

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from dnl_zoo.models import costs, registry


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f}M"


def cmd_models(args: argparse.Namespace) -> int:
    """Prints a Markdown table of the registered models matching PATTERN."""
    names = registry.list_models(args.pattern)
    if not names:
        print(f"no model matches {args.pattern!r}; try 'dnl-zoo models'")
        return 1
    print("| name | params | GFLOPs | input | reference |")
    print("|---|---|---|---|---|")
    for name in names:
        info = registry.model_info(name)
        reference = info["reference"]
        cited = f"{reference['value']}% {reference['dataset']}" if reference else "-"
        size = "x".join(str(s) for s in info["input_size"])
        print(
            f"| {name} | {_millions(info['params'])} | {info['flops'] / 1e9:.2f} "
            f"| {size} | {cited} |"
        )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Prints `model_info(NAME)` as JSON."""
    print(json.dumps(registry.model_info(args.name), indent=2))
    return 0


def _stages(model) -> list[tuple[str, nnx.Module]]:
    """The named stages of a DenseNet, in the order they run."""
    stages = [("stem", model.stem)]
    for b, block in enumerate(model.blocks):
        stages.append((f"blocks.{b} ({len(block.layers)} layers)", block))
        if b < len(model.transitions):
            stages.append((f"transitions.{b}", model.transitions[b]))
    return stages


def _stage_shapes(model, x: jax.Array) -> list[jax.Array]:
    """Output of each stage of `model` on x: (batch, H, W, C) each."""
    outputs = []
    for _, stage in _stages(model):
        x = stage(x)
        outputs.append(x)
    return outputs


def cmd_summary(args: argparse.Namespace) -> int:
    """Builds NAME, prints its stages and runs a timed eval forward pass."""
    overrides = {"in_channels": args.in_channels} if args.in_channels else {}
    model = registry.create_model(
        args.name, num_classes=args.num_classes, seed=args.seed, **overrides
    )
    spec = registry.get_spec(args.name)
    height, width, channels = spec.input_size
    if args.image_size:
        height = width = args.image_size
    channels = args.in_channels or channels
    shape = (args.batch_size, height, width, channels)
    macs = costs.count_macs(model, shape[1:])
    print(f"{args.name}: {spec.description}")
    print(f"parameters: {costs.count_params(model):,}")
    print(f"FLOPs per image at {shape[1:]}: {2 * macs / 1e9:.3f} G")

    model.eval()
    abstract = jax.ShapeDtypeStruct(shape, jnp.float32)
    shapes = nnx.eval_shape(_stage_shapes, model, abstract)
    print("\n| stage | output shape | params |\n|---|---|---|")
    for (name, stage), out in zip(_stages(model), shapes, strict=True):
        params = sum(p.size for p in jax.tree.leaves(nnx.state(stage, nnx.Param)))
        print(f"| {name} | {tuple(out.shape)} | {params:,} |")

    x = jax.random.normal(jax.random.key(args.seed), shape)
    forward = nnx.jit(lambda m, x: m(x))
    start = time.perf_counter()
    logits = jax.block_until_ready(forward(model, x))
    compiled = time.perf_counter() - start
    start = time.perf_counter()
    logits = jax.block_until_ready(forward(model, x))
    ran = time.perf_counter() - start
    print(f"\nforward pass on {shape} -> logits {tuple(logits.shape)}")
    print(f"compile + first run {compiled:.1f} s, then {ran * 1e3:.0f} ms per batch")
    print(f"on {jax.devices()[0].device_kind} ({jax.default_backend()})")
    if not bool(jnp.all(jnp.isfinite(logits))):
        print("error: the logits are not finite", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `dnl-zoo`."""
    parser = argparse.ArgumentParser(
        prog="dnl-zoo",
        description="DenseNet and dense non-local (DNL) networks in Flax NNX.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    models = commands.add_parser("models", help="list registered models")
    models.add_argument("pattern", nargs="?", help="a glob such as 'densenet_bc*'")
    models.set_defaults(run=cmd_models)

    info = commands.add_parser("info", help="one model's metadata as JSON")
    info.add_argument("name")
    info.set_defaults(run=cmd_info)

    summary = commands.add_parser(
        "summary", help="per-stage shapes and a timed forward pass"
    )
    summary.add_argument("name")
    summary.add_argument("--batch-size", type=int, default=8)
    summary.add_argument(
        "--image-size", type=int, help="height and width (the preset's by default)"
    )
    summary.add_argument("--in-channels", type=int, help="e.g. 1 for greyscale")
    summary.add_argument("--num-classes", type=int)
    summary.add_argument("--seed", type=int, default=0)
    summary.set_defaults(run=cmd_summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs `dnl-zoo` with `argv` (sys.argv[1:] by default); returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (KeyError, ValueError) as error:
        message = error.args[0] if isinstance(error, KeyError) else error
        print(f"dnl-zoo {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
