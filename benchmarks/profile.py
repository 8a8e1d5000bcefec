"""Where one dnl_zoo training step spends its time, by kind of XLA operation.

    .venv/bin/python -m benchmarks.profile                      # BC-100, lean
    .venv/bin/python -m benchmarks.profile --model densenet121 --implementation scan
    .venv/bin/python -m benchmarks.profile --depth 40 --batch-size 16 --json out.json

Traces --steps training steps (after --warmup) with `jax.profiler`, reads the
time of every operation XLA ran from the trace, and joins each with the
compiled program: the kind of work it does (the root of a fusion:
convolution, dot, reduce, dynamic-update-slice, copy or transpose, other
elementwise) and the pass it belongs to (backward where JAX's op name shows
a transpose, i.e. differentiation; forward otherwise; unnamed where XLA made
the operation up, mostly layout copies). It prints a Markdown
table of milliseconds per step for each (pass, kind), with each one's share
of the operations' total, and the wall time of a step beside it (the
difference is the runtime's own work and idle time between operations).
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax

from benchmarks.run import MODELS, _data_parallel, _inputs, build_jax, cifar_bc
from dnl_zoo import hardware

_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%(\S+) = \S+ ([\w-]+)\(")
_CALLS = re.compile(r"calls=%([\w.-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_KINDS = {
    "convolution": "convolution",
    "dot": "dot",
    "reduce": "reduce",
    "reduce-window": "reduce",
    "dynamic-update-slice": "dynamic-update-slice",
    "scatter": "dynamic-update-slice",
    "copy": "copy or transpose",
    "transpose": "copy or transpose",
}


def _computations(hlo: str) -> dict[str, list[str]]:
    """The compiled module's computations: name -> their instruction lines."""
    bodies, name = {}, None
    for line in hlo.splitlines():
        head = re.match(r"(?:ENTRY )?%([\w.-]+) .*\{$", line)
        if head:
            name = head.group(1)
            bodies[name] = []
        elif name is not None and line.strip() != "}":
            bodies[name].append(line)
    return bodies


def _root(bodies: dict, computation: str) -> str:
    """The root instruction's line of a computation, followed into fusions."""
    for line in reversed(bodies.get(computation, [])):
        match = _INSTRUCTION.match(line)
        if match and "ROOT" in line:
            if match.group(2) == "fusion":
                return _root(bodies, _CALLS.search(line).group(1))
            return line
    return ""


def classify(hlo: str) -> dict[str, tuple[str, str]]:
    """Each instruction of the compiled program: name -> (pass, kind of work).

    A fusion is classed by its root; its op name (what JAX traced it from) is
    its own or, where XLA left it none, its root's.
    """
    bodies, classes = _computations(hlo), {}
    for lines in bodies.values():
        for line in lines:
            match = _INSTRUCTION.match(line)
            if not match or match.group(1) in classes:
                continue
            root = line
            if match.group(2) == "fusion":
                root = _root(bodies, _CALLS.search(line).group(1))
            op = _INSTRUCTION.match(root).group(2) if root else "unknown"
            op_name = _OP_NAME.search(line) or _OP_NAME.search(root)
            classes[match.group(1)] = (
                _pass(op, op_name.group(1) if op_name else None),
                _KINDS.get(op, "elementwise and other"),
            )
    return classes


def _pass(op: str, op_name: str | None) -> str:
    """'forward', 'backward' (JAX's name shows a transpose) or 'unnamed'.

    XLA's CPU backend rewrites a convolution's kernel gradient into a new
    convolution (its window the whole image) and gives it no name: those are
    backward. Other unnamed work is mostly layout copies XLA added.
    """
    if op_name is None:
        return "backward" if op == "convolution" else "unnamed"
    return "backward" if "transpose(" in op_name else "forward"


def _trace_events(directory: str) -> list[dict]:
    (path,) = glob.glob(f"{directory}/plugins/profile/*/perfetto_trace.json.gz")
    with gzip.open(path) as file:
        trace = json.load(file)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def profile(arch, classes, batch, size, implementation, steps, warmup, devices):
    """Milliseconds per step of each (pass, kind), and a step's wall time."""
    step, state = build_jax(arch, classes, implementation)
    images, labels = _inputs(batch, size, classes)
    state, images, labels = _data_parallel(state, images, labels, devices)
    # Run the very executable whose program is classified (compiled once).
    step = step.lower(state, images, labels).compile()
    kinds = classify(step.as_text())
    for _ in range(warmup):
        state, loss = step(state, images, labels)
        jax.block_until_ready(loss)
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            start = time.perf_counter()
            for _ in range(steps):
                state, loss = step(state, images, labels)
                jax.block_until_ready(loss)
            wall = (time.perf_counter() - start) / steps
        events = _trace_events(directory)

    totals, counts = collections.defaultdict(float), collections.Counter()
    for event in events:
        if event.get("ph") == "X" and event["name"] in kinds:
            key = kinds[event["name"]]
            totals[key] += event["dur"] / 1e3 / steps / devices  # us -> ms
            counts[key] += 1
    rows = [
        {"pass": p, "kind": k, "ms": ms, "count": counts[(p, k)] // (steps * devices)}
        for (p, k), ms in sorted(totals.items(), key=lambda item: -item[1])
    ]
    return {"rows": rows, "wall_ms": wall * 1e3, "images_per_s": batch / wall}


def table(result: dict) -> str:
    """The profile as Markdown."""
    total = sum(row["ms"] for row in result["rows"])
    lines = [
        "| pass | kind of operation | ms per step | share | operations |",
        "|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        share = row["ms"] / total if total else 0.0
        lines.append(
            f"| {row['pass']} | {row['kind']} | {row['ms']:.1f} | {share:.0%} "
            f"| {row['count']} |"
        )
    lines.append(f"| all | operations | {total:.1f} | 100% | |")
    lines.append(
        f"\nwall time per step {result['wall_ms']:.1f} ms "
        f"({result['images_per_s']:.1f} images/s) on {result['hardware']}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Parses the flags, profiles, prints the table and writes --json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bc100", choices=MODELS)
    parser.add_argument("--implementation", default="lean")
    parser.add_argument("--depth", type=int, help="L of bc100 instead")
    parser.add_argument("--batch-size", type=int, help="instead of the model's")
    parser.add_argument("--image-size", type=int, help="instead of the model's")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    hardware.use_cpu_cores()
    if args.devices > jax.device_count():
        parser.error(
            f"--devices {args.devices} but JAX has {jax.device_count()} devices; "
            "on a CPU set DNL_ZOO_CPU_DEVICES before the run"
        )

    arch, batch, size, classes = MODELS[args.model]
    if args.depth and args.model == "bc100":
        arch = cifar_bc(args.depth)
    batch, size = args.batch_size or batch, args.image_size or size
    result = profile(
        arch,
        classes,
        batch,
        size,
        args.implementation,
        args.steps,
        args.warmup,
        args.devices,
    )
    result |= {"hardware": hardware.describe(), "arguments": vars(args)}
    print(table(result))
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as file:
            json.dump(result, file, indent=1)
    return result


if __name__ == "__main__":
    main()
