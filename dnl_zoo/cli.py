"""The `dnl-zoo` command line (also `python -m dnl_zoo`).

dnl-zoo models [PATTERN]          list registered models with their sizes
dnl-zoo info NAME                 one model's metadata as JSON
dnl-zoo summary NAME [options]    per-stage shapes, then a timed forward pass
dnl-zoo train --config F --workdir W     train or resume an experiment
dnl-zoo eval NAME                 test metrics of a shipped checkpoint (sha256 first)
dnl-zoo eval --config F --workdir W      ... or of a run's latest checkpoint
dnl-zoo export NAME --config F --workdir W   ship a finished run in checkpoints/
dnl-zoo finetune NAME --dataset D --workdir W   fine-tune a shipped model
dnl-zoo reproduce depth-table [--train]   the depth table, as Markdown and a PNG
dnl-zoo data prepare NAME --source DIR    a TFDS dataset from local IDX files
"""

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from dnl_zoo import hardware
from dnl_zoo.errors import ActionableError
from dnl_zoo.models import costs, registry


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f}M"


def cmd_models(args: argparse.Namespace) -> int:
    """Prints a Markdown table of the registered models matching PATTERN, with
    the test top-1 of the weights shipped for them, if any."""
    from dnl_zoo import pretrained

    shipped = pretrained.manifest()
    names = registry.list_models(args.pattern)
    if args.pretrained:
        names = [name for name in names if name in shipped]
    if not names:
        which = "shipped model" if args.pretrained else "model"
        print(f"no {which} matches {args.pattern!r}; try 'dnl-zoo models'")
        return 1
    print("| name | params | GFLOPs | input | reference | shipped weights |")
    print("|---|---|---|---|---|---|")
    for name in names:
        info = registry.model_info(name)
        reference = info["reference"]
        cited = f"{reference['value']}% {reference['dataset']}" if reference else "-"
        size = "x".join(str(s) for s in info["input_size"])
        entry = shipped.get(name)
        weights = (
            f"{entry['test']['eval_top1']}% {entry['dataset']['name']}"
            if entry
            else "-"
        )
        print(
            f"| {name} | {_millions(info['params'])} | {info['flops'] / 1e9:.2f} "
            f"| {size} | {cited} | {weights} |"
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
    start = time.perf_counter()
    model = registry.create_model(
        args.name, num_classes=args.num_classes, seed=args.seed, **overrides
    )
    built = time.perf_counter() - start
    spec = registry.get_spec(args.name)
    height, width, channels = spec.input_size
    if args.image_size:
        height = width = args.image_size
    channels = args.in_channels or channels
    shape = (args.batch_size, height, width, channels)
    macs = costs.count_macs(model, shape[1:])
    print(f"{args.name}: {spec.description}")
    print(f"parameters: {costs.count_params(model):,} (built in {built:.1f} s)")
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


def _initialise_distributed(args: argparse.Namespace) -> None:
    """Joins a multi-process run: found by itself on TPU pods and SLURM."""
    if not (args.distributed or args.coordinator):
        return
    # Before anything touches a backend: CPU devices talk through gloo (the
    # setting only concerns the CPU client, so it is harmless on TPU and GPU).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if args.coordinator:
        kwargs = dict(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    jax.distributed.initialize(**kwargs)


def _experiment(args: argparse.Namespace):
    """The config file of --config with the --config.KEY=VALUE overrides applied."""
    from dnl_zoo import config as config_lib

    return config_lib.override(config_lib.load(args.config), args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    """Trains (or resumes) the experiment of --config in --workdir."""
    from dnl_zoo import train

    _initialise_distributed(args)
    config = _experiment(args)
    result = train.train_and_evaluate(config, args.workdir)
    if jax.process_index() == 0:
        print(json.dumps(result))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluates a shipped model, or the latest checkpoint in --workdir."""
    from dnl_zoo import pretrained, train

    if args.name is not None:
        if args.config or args.workdir or args.overrides:
            raise ValueError(
                "give a shipped NAME (with --data-dir, --batch-size) or --config "
                "and --workdir (with --config.KEY=VALUE), not both"
            )
        metrics = pretrained.evaluate(
            args.name, data_dir=args.data_dir, batch_size=args.batch_size
        )
        print(json.dumps({"name": args.name, **metrics}))
        return 0
    if not (args.config and args.workdir):
        raise ValueError(
            "expected a shipped model NAME (dnl-zoo models --pretrained lists "
            "them) or both --config and --workdir"
        )
    config = _experiment(args)
    if args.data_dir:
        config.dataset.data_dir = args.data_dir
    print(json.dumps(train.evaluate_workdir(config, args.workdir)))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Ships the finished run in --workdir as checkpoints/NAME."""
    from dnl_zoo import pretrained

    config = _experiment(args)
    config.model.name = args.name
    entry = pretrained.export(args.name, config, args.workdir, config_file=args.config)
    print(json.dumps({k: entry[k] for k in ("name", "params", "test", "files")}))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tunes a shipped model on --dataset with a new classifier head."""
    from dnl_zoo import config as config_lib
    from dnl_zoo import train

    base = config_lib.load(args.config) if args.config else None
    config = train.finetune_config(
        args.name,
        args.dataset,
        freeze_body=args.freeze_body,
        data_dir=args.data_dir,
        base=base,
    )
    config = config_lib.override(config, args.overrides)
    print(json.dumps(train.train_and_evaluate(config, args.workdir)))
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    """Prints the depth table as Markdown and writes its plot."""
    from dnl_zoo import config as config_lib
    from dnl_zoo import reproduce

    out = pathlib.Path(args.out)
    if args.train:
        base = config_lib.override(config_lib.load(args.config), args.overrides)
        budget, name = reproduce.budget(
            args.budget, depths=args.depths, steps=args.steps, split=args.train_split
        )
        workdir = pathlib.Path(args.workdir) / name
        rows = reproduce.sweep(budget, base, workdir, data_dir=args.data_dir)
        path = out / f"depth_sweep_{workdir.name}.png"
        reproduce.plot(rows, path, ("train_loss", "test_top1"))
        falls = reproduce.falls_with_depth(rows, "h = T/N", "train_loss")
        note = f"training loss falls with N for h = T/N: {'yes' if falls else 'no'}"
    else:
        rows = reproduce.shipped_table(
            data_dir=args.data_dir, batch_size=args.batch_size
        )
        path = out / "depth_table.png"
        reproduce.plot(rows, path, ("test_top1", "test_loss"))
        same = all(reproduce.agrees(row) for row in rows)
        note = f"every row equals checkpoints/manifest.json: {'yes' if same else 'no'}"
    print(reproduce.markdown(rows))
    print(f"\n{note}\nplot: {path}")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    """Builds the canonical TFDS dataset from local original files."""
    from dnl_zoo import data

    print(json.dumps(data.prepare(args.name, args.source, args.data_dir), indent=2))
    return 0


def _add_experiment_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="a configs/*.py file")
    parser.add_argument("--workdir", required=True, help="checkpoints and logs")
    parser.epilog = (
        "Any config key can follow as --config.KEY=VALUE, "
        "e.g. --config.optimizer.learning_rate=0.05"
    )


def _add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multi-process runs")
    group.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() (TPU pods, SLURM find the rest)",
    )
    group.add_argument("--coordinator", help="host:port of process 0")
    group.add_argument("--num-processes", type=int)
    group.add_argument("--process-id", type=int)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `dnl-zoo`."""
    parser = argparse.ArgumentParser(
        prog="dnl-zoo",
        description="DenseNet and dense non-local (DNL) networks in Flax NNX.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    models = commands.add_parser("models", help="list registered models")
    models.add_argument("pattern", nargs="?", help="a glob such as 'densenet_bc*'")
    models.add_argument(
        "--pretrained", action="store_true", help="only models with shipped weights"
    )
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

    train = commands.add_parser("train", help="train or resume an experiment")
    _add_experiment_arguments(train)
    _add_distributed_arguments(train)
    train.set_defaults(run=cmd_train)

    evaluate = commands.add_parser(
        "eval", help="evaluate a shipped model or a workdir's checkpoint"
    )
    evaluate.add_argument("name", nargs="?", help="a shipped model, e.g. dnl_conv_n8")
    evaluate.add_argument("--config", help="a configs/*.py file (with --workdir)")
    evaluate.add_argument("--workdir", help="a run's checkpoints and logs")
    evaluate.add_argument("--data-dir", help="TFDS data_dir (TFDS's default if unset)")
    evaluate.add_argument("--batch-size", type=int, help="eval batch (any size)")
    evaluate.set_defaults(run=cmd_eval)

    export = commands.add_parser("export", help="ship a finished run's weights")
    export.add_argument("name", help="the registry name it trained")
    _add_experiment_arguments(export)
    export.set_defaults(run=cmd_export)

    finetune = commands.add_parser(
        "finetune", help="fine-tune a shipped model with a new head"
    )
    finetune.add_argument("name", help="a shipped model, e.g. densenet_bc40_k12_fmnist")
    finetune.add_argument("--dataset", required=True, help="e.g. mnist, cifar10")
    finetune.add_argument("--workdir", required=True, help="checkpoints and logs")
    finetune.add_argument("--config", help="a recipe to use instead of the default")
    finetune.add_argument(
        "--freeze-body", action="store_true", help="train the classifier alone"
    )
    finetune.add_argument("--data-dir", help="TFDS data_dir (TFDS's default if unset)")
    finetune.set_defaults(run=cmd_finetune)

    reproduce = commands.add_parser("reproduce", help="reproduce a table")
    reproduce.add_argument("table", choices=["depth-table"])
    reproduce.add_argument(
        "--train", action="store_true", help="run the DNL depth sweep from scratch"
    )
    reproduce.add_argument("--budget", choices=["quick", "full"], default="quick")
    reproduce.add_argument("--depths", type=int, nargs="*", help="N instead")
    reproduce.add_argument("--steps", type=int, help="training steps instead")
    reproduce.add_argument("--train-split", help="e.g. 'train[:5000]' instead")
    reproduce.add_argument(
        "--config",
        default="configs/dnl_sweep_fashion_mnist.py",
        help="the sweep's recipe (with --train)",
    )
    reproduce.add_argument("--workdir", default="runs/depth_sweep", help="--train runs")
    reproduce.add_argument("--out", default="runs/depth_table", help="the PNG's folder")
    reproduce.add_argument("--data-dir", help="TFDS data_dir (TFDS's default if unset)")
    reproduce.add_argument("--batch-size", type=int, help="eval batch (any size)")
    reproduce.set_defaults(run=cmd_reproduce)

    data = commands.add_parser("data", help="datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    prepare = data_commands.add_parser(
        "prepare",
        help="build a TFDS dataset from local files (no network)",
        description="Builds the canonical TFDS dataset (the name, version, splits "
        "and features of tfds.load) from the original files in --source. For "
        "fashion_mnist: apt-get install dataset-fashion-mnist, then --source "
        "/usr/share/datasets/fashion-mnist.",
    )
    prepare.add_argument("name", choices=["fashion_mnist", "mnist"])
    prepare.add_argument("--source", required=True, help="the IDX files")
    prepare.add_argument("--data-dir", help="TFDS data_dir (TFDS's default if unset)")
    prepare.set_defaults(run=cmd_data_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs `dnl-zoo` with `argv` (sys.argv[1:] by default); returns the exit code."""
    args, rest = build_parser().parse_known_args(argv)
    overrides = [a for a in rest if a.startswith("--config.")]
    unknown = [a for a in rest if not a.startswith("--config.")]
    takes_overrides = ("train", "eval", "export", "finetune", "reproduce")
    if unknown or (overrides and args.command not in takes_overrides):
        build_parser().error(
            f"unrecognised arguments: {' '.join(unknown or overrides)}"
        )
    args.overrides = overrides
    distributed = getattr(args, "distributed", False) or getattr(
        args, "coordinator", None
    )
    if args.command in takes_overrides and not distributed:
        hardware.use_cpu_cores()  # data parallel over the cores of a CPU
    try:
        return args.run(args)
    except ActionableError as error:  # a run that could not go on
        print(f"dnl-zoo {args.command}: error: {error}", file=sys.stderr)
        return 1
    except (LookupError, ValueError) as error:  # a bad name or value
        message = error.args[0] if isinstance(error, KeyError) else error
        print(f"dnl-zoo {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
