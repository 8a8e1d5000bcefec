"""Training-step speed and memory of dnl_zoo against PyTorch, in one process.

    .venv/bin/python -m benchmarks.run                       # everything below
    .venv/bin/python -m benchmarks.run --models bc100 --depths 40 100 --json out.json

Measures, side by side and in the same run:
- throughput (images/s, median over --steps timed steps after --warmup) of one
  SGD-with-momentum training step of DenseNet-BC-100 (k=12, 32x32, batch 64)
  and DenseNet-121 (224x224, batch 8): dnl_zoo (jax.jit) with each dense-block
  implementation, on one device and split over --devices (rows 'xN'; on a CPU,
  one JAX device per core: XLA runs many operations of one device on a single
  thread), and PyTorch eager in its default layout (NCHW) and channels_last,
  same architecture, batch and optimiser; with --dtypes, dnl_zoo's step also
  computes in each dtype named (float32 parameters either way);
- for each CIFAR DenseNet-BC depth in --depths and each implementation: compile
  seconds, XLA's temporary bytes of the compiled training step
  (`memory_analysis().temp_size_in_bytes`), and the peak resident memory of a
  fresh process that compiles and runs that one step (the JAX runtime included);
- with --dnl NAME ...: for each registered dense non-local (DNL) network named
  and each block implementation, compile seconds, XLA's temporary bytes and
  images/s of its training step (28x28x1, batch --dnl-batch-size);
- a 1x1 convolution as `conv_general_dilated` and as a matrix product.
It prints Markdown tables with ratios and writes the same as JSON. Numbers are
for this machine only; compare them within one run.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dnl_zoo import hardware
from dnl_zoo.models import registry
from dnl_zoo.models.densenet import IMPLEMENTATIONS, DenseNet, cifar_block_config
from dnl_zoo.models.dnl import IMPLEMENTATIONS as DNL_IMPLEMENTATIONS


def cifar_bc(depth: int, growth_rate: int = 12) -> dict:
    """DenseNet arguments of the CIFAR DenseNet-BC of depth L."""
    return dict(
        block_config=cifar_block_config(depth, True),
        growth_rate=growth_rate,
        num_init_features=2 * growth_rate,
        stem="cifar",
    )


# name: (dnl_zoo DenseNet arguments, batch, image size, classes)
MODELS = {
    "bc100": (cifar_bc(100), 64, 32, 10),
    "densenet121": (
        dict(block_config=(6, 12, 24, 16), growth_rate=32, num_init_features=64,
             stem="imagenet"),
        8, 224, 1000,
    ),
}  # fmt: skip


def build_jax(arch: dict, classes: int, implementation: str, dtype=None):
    """The compiled training step (state, images, labels) -> (state, loss).

    `dtype` is the computation's (float32 parameters either way)."""
    model = DenseNet(
        **arch,
        dtype=dtype,
        bottleneck=True,
        compression=0.5,
        num_classes=classes,
        implementation=implementation,
        rngs=nnx.Rngs(0),
    )
    return train_step(model)


def train_step(model: nnx.Module):
    """`model`'s jitted SGD-with-momentum training step and its state."""
    optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    def step(state, images, labels):
        model, optimizer = nnx.merge(graphdef, state)
        model.train()

        def loss_fn(model):
            logits = model(images)
            return optax.softmax_cross_entropy_with_integer_labels(
                logits, labels
            ).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    return jax.jit(step, donate_argnums=0), state


def _dtype(name: str):
    """A --dtypes name as the model's dtype (None: the default, float32)."""
    return None if name == "float32" else jnp.dtype(name)


def _inputs(batch: int, size: int, classes: int, channels: int = 3):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(batch, size, size, channels))
    images = jnp.asarray(images, jnp.float32)
    return images, jnp.asarray(rng.integers(0, classes, batch), jnp.int32)


def compile_stats(arch, classes, batch, size, implementation) -> dict:
    """Compile seconds and XLA temporary bytes of dnl_zoo's training step."""
    step, state = build_jax(arch, classes, implementation)
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    return _compile(step, state, images, labels)


def _compile(step, state, images, labels) -> dict:
    """Compile seconds and XLA temporary bytes of `step` on those inputs."""
    start = time.perf_counter()
    compiled = step.lower(state, images, labels).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    return {
        "compile_s": seconds,
        "temp_bytes": int(memory.temp_size_in_bytes) if memory else None,
    }


def peak_rss(depth: int, batch: int, size: int, implementation: str) -> int:
    """Peak resident bytes of a fresh process that compiles and runs one step."""
    command = [sys.executable, "-m", "benchmarks.run", "--one-step"]
    command += [str(depth), str(batch), str(size), implementation]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise RuntimeError(f"{' '.join(command)} failed with status {status}")
    return usage.ru_maxrss * 1024  # kilobytes on Linux


def _one_step(depth: int, batch: int, size: int, implementation: str) -> None:
    step, state = build_jax(cifar_bc(depth), 10, implementation)
    jax.block_until_ready(step(state, *_inputs(batch, size, 10)))


def _step_times(run_step, steps: int, warmup: int) -> list[float]:
    """Seconds of each of `steps` calls of run_step(), after `warmup` calls."""
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        run_step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def _data_parallel(state, images, labels, devices: int):
    """State replicated and the batch split over the first `devices` devices."""
    mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
    state = jax.device_put(state, NamedSharding(mesh, P()))
    split = NamedSharding(mesh, P("data"))
    return state, jax.device_put(images, split), jax.device_put(labels, split)


def time_jax(
    arch, classes, batch, size, implementation, steps, warmup, devices=1, dtype=None
):
    """Step seconds of dnl_zoo's training step, data parallel over `devices`."""
    step, state = build_jax(arch, classes, implementation, dtype)
    images, labels = _inputs(batch, size, classes)
    return _time_steps(step, state, images, labels, devices, steps, warmup)


def _time_steps(step, state, images, labels, devices, steps, warmup):
    """Seconds of each timed call of `step`, data parallel over `devices`."""
    state, images, labels = _data_parallel(state, images, labels, devices)
    carry = [state]

    def run_step():
        carry[0], loss = step(carry[0], images, labels)
        jax.block_until_ready(loss)

    return _step_times(run_step, steps, warmup)


def dnl_stats(name: str, implementation: str, args) -> dict:
    """Compile seconds, XLA temporary bytes and images/s of the training step
    of the registered DNL network `name` (Fashion-MNIST sized), data parallel
    over the most --devices."""
    model = registry.create_model(name, implementation=implementation)
    step, state = train_step(model)
    size, _, channels = registry.model_info(name)["input_size"]
    batch, devices = args.dnl_batch_size, max(args.devices)
    images, labels = _inputs(batch, size, 10, channels)
    compiled = _compile(step, state, images, labels)
    timing = (devices, args.steps, args.warmup)
    times = _time_steps(step, state, images, labels, *timing)
    return {
        "model": name,
        "implementation": implementation,
        "input_size": [size, size, channels],
        "devices": devices,
        **compiled,
        "images_per_s": batch / statistics.median(times),
    }


def time_torch(arch, classes, batch, size, channels_last, steps, warmup):
    import torch

    from benchmarks.torch_densenet import DenseNet as TorchDenseNet

    model = TorchDenseNet(
        arch["block_config"],
        arch["growth_rate"],
        arch["num_init_features"],
        stem=arch["stem"],
        num_classes=classes,
    )
    images = torch.randn(batch, 3, size, size)
    labels = torch.randint(0, classes, (batch,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def run_step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(images), labels).backward()
        optimizer.step()

    return _step_times(run_step, steps, warmup)


def time_pointwise(batch: int, size: int, steps: int, warmup: int) -> dict:
    """GFLOP/s of a 1x1 convolution 120 -> 48, forward and backward, two ways.

    As `conv_general_dilated` and as a matrix product over the channel axis:
    why dnl_zoo stores 1x1 kernels as (in, out) matrices.
    """
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, size, size, 120)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(1, 1, 120, 48)), jnp.float32)

    def as_conv(x, w):
        dims = ("NHWC", "HWIO", "NHWC")
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=dims)
        return jnp.sum(y**2)

    def as_matmul(x, w):
        return jnp.sum(jnp.einsum("bhwi,io->bhwo", x, w[0, 0]) ** 2)

    flops = 3 * 2 * batch * size * size * 120 * 48  # forward + two backward products
    result = {}
    for name, f in (("conv", as_conv), ("matmul", as_matmul)):
        grad = jax.jit(jax.grad(f, argnums=(0, 1)))
        times = _step_times(
            lambda g=grad: jax.block_until_ready(g(x, w)), steps, warmup
        )
        result[name] = flops / statistics.median(times) / 1e9
    return result


def _throughput(name: str, args) -> dict:
    arch, batch, size, classes = MODELS[name]
    if args.batch_size:
        batch = args.batch_size
    if args.image_size:
        size = args.image_size
    if args.depth and name == "bc100":
        arch = cifar_bc(args.depth)
    timing = (args.steps, args.warmup)
    times = {}
    for dtype in args.dtypes:
        for devices in args.devices:
            suffix = f" x{devices}" if devices > 1 else ""
            suffix += f" {dtype}" if dtype != "float32" else ""
            for impl in args.implementations:
                times[f"dnl_zoo {impl}{suffix}"] = time_jax(
                    arch, classes, batch, size, impl, *timing, devices, _dtype(dtype)
                )
    if not args.no_torch:
        for layout, channels_last in (("", False), (" channels_last", True)):
            times[f"torch{layout}"] = time_torch(
                arch, classes, batch, size, channels_last, *timing
            )
    speeds = {k: batch / statistics.median(v) for k, v in times.items()}
    return {"batch_size": batch, "image_size": size, "images_per_s": speeds}


def run(args: argparse.Namespace) -> dict:
    """All measurements of one invocation, as a dict."""
    result = {"hardware": hardware.describe(), "throughput": {}, "depths": []}
    for name in args.models:
        result["throughput"][name] = _throughput(name, args)
    batch, size = args.memory_batch_size, args.memory_image_size
    for depth in args.depths:
        for impl in args.memory_implementations or args.implementations:
            row = {"depth": depth, "implementation": impl}
            row |= compile_stats(cifar_bc(depth), 10, batch, size, impl)
            if not args.no_rss:
                row["peak_rss_bytes"] = peak_rss(depth, batch, size, impl)
            result["depths"].append(row)
    result["memory_batch_size"], result["memory_image_size"] = batch, size
    result["dnl_batch_size"] = args.dnl_batch_size
    result["dnl"] = [
        dnl_stats(name, impl, args)
        for name in args.dnl
        for impl in args.dnl_implementations
    ]
    result["pointwise_gflops"] = time_pointwise(
        args.memory_batch_size, args.memory_image_size, args.steps, args.warmup
    )
    return result


def _throughput_table(name: str, entry: dict) -> list[str]:
    speeds = entry["images_per_s"]
    torch_names = [k for k in speeds if k.startswith("torch")]
    head = "| training step | images/s |" + "".join(f" / {k} |" for k in torch_names)
    lines = [
        f"{name}, batch {entry['batch_size']}, "
        f"{entry['image_size']}x{entry['image_size']}:",
        "",
        head,
        "|" + "---|" * (2 + len(torch_names)),
    ]
    for key, value in speeds.items():
        ratios = "".join(f" {value / speeds[t]:.2f}x |" for t in torch_names)
        lines.append(f"| {key} | {value:.1f} |{ratios}")
    return lines + [""]


def _dnl_table(result: dict) -> list[str]:
    rows = result.get("dnl")
    if not rows:
        return []
    lines = [
        f"DNL training step, batch {result['dnl_batch_size']}, "
        f"{'x'.join(map(str, rows[0]['input_size']))}, on "
        f"{rows[0]['devices']} device(s):",
        "",
        "| model | implementation | compile s | XLA temp MiB | vs plain "
        "| images/s | vs plain |",
        "|---|---|---|---|---|---|---|",
    ]
    plain = {r["model"]: r for r in rows if r["implementation"] == "plain"}
    for r in rows:
        base = plain.get(r["model"])
        memory = f"{r['temp_bytes'] / base['temp_bytes']:.2f}x" if base else "-"
        speed = f"{r['images_per_s'] / base['images_per_s']:.2f}x" if base else "-"
        lines.append(
            f"| {r['model']} | {r['implementation']} | {r['compile_s']:.1f} | "
            f"{_mib(r['temp_bytes'])} | {memory} | {r['images_per_s']:.1f} | "
            f"{speed} |"
        )
    return lines + [""]


def _mib(value) -> str:
    return f"{value / 2**20:.0f}" if value is not None else "-"


def table(result: dict) -> str:
    """The result as Markdown, with ratios to PyTorch and to the plain block."""
    lines = [result["hardware"], ""]
    for name, entry in result["throughput"].items():
        lines += _throughput_table(name, entry)
    rows = result["depths"]
    if rows:
        lines += [
            f"CIFAR DenseNet-BC k=12, batch {result['memory_batch_size']}, "
            f"{result['memory_image_size']}x{result['memory_image_size']}:",
            "",
            "| depth L | implementation | compile s | vs first depth | XLA temp MiB "
            "| vs plain | peak RSS MiB |",
            "|---|---|---|---|---|---|---|",
        ]
        first = {r["implementation"]: r for r in rows if r["depth"] == rows[0]["depth"]}
        plain = {r["depth"]: r for r in rows if r["implementation"] == "plain"}
        for r in rows:
            base = plain.get(r["depth"])
            vs_plain = (
                f"{r['temp_bytes'] / base['temp_bytes']:.2f}x"
                if base and r["temp_bytes"] and base["temp_bytes"]
                else "-"
            )
            vs_first = r["compile_s"] / first[r["implementation"]]["compile_s"]
            lines.append(
                f"| {r['depth']} | {r['implementation']} | {r['compile_s']:.1f} | "
                f"{vs_first:.2f}x | {_mib(r['temp_bytes'])} | {vs_plain} | "
                f"{_mib(r.get('peak_rss_bytes'))} |"
            )
        lines.append("")
    lines += _dnl_table(result)
    ops = result["pointwise_gflops"]
    lines += [
        "| 1x1 convolution 120 -> 48, forward and backward | GFLOP/s |",
        "|---|---|",
        f"| as conv_general_dilated | {ops['conv']:.1f} |",
        f"| as a matrix product | {ops['matmul']:.1f} |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Parses flags, measures, prints the table and writes --json."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--one-step"]:
        depth, batch, size, impl = argv[1:5]
        _one_step(int(depth), int(batch), int(size), impl)
        return {}
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    parser.add_argument("--implementations", nargs="*", default=list(IMPLEMENTATIONS))
    parser.add_argument("--depth", type=int, help="L of bc100's speed test instead")
    parser.add_argument("--batch-size", type=int, help="instead of each model's")
    parser.add_argument("--image-size", type=int, help="instead of each model's")
    parser.add_argument(
        "--devices",
        type=int,
        nargs="*",
        help="data-parallel device counts of the speed test (default: 1 and one "
        "per core on a CPU); a row 'dnl_zoo IMPL xN' is the step split over N",
    )
    parser.add_argument(
        "--dtypes",
        nargs="*",
        default=["float32"],
        help="computation dtypes of the speed test; rows name any but float32",
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--depths", type=int, nargs="*", default=[40, 100, 190, 250])
    parser.add_argument(
        "--memory-implementations", nargs="*", help="for --depths (default: all)"
    )
    parser.add_argument("--memory-batch-size", type=int, default=64)
    parser.add_argument("--memory-image-size", type=int, default=32)
    parser.add_argument(
        "--dnl",
        nargs="*",
        default=[],
        help="registered DNL networks (e.g. dnl_conv_n16) to measure compile "
        "time, XLA temporary bytes and speed of, for each --dnl-implementations",
    )
    parser.add_argument(
        "--dnl-implementations", nargs="*", default=list(DNL_IMPLEMENTATIONS)
    )
    parser.add_argument("--dnl-batch-size", type=int, default=128)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--no-rss", action="store_true", help="skip peak RSS")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    cores = hardware.use_cpu_cores()  # before the first JAX computation
    if args.devices is None:
        args.devices = sorted({1, cores or 1})
    if max(args.devices) > jax.device_count():
        parser.error(
            f"--devices {max(args.devices)} but JAX has {jax.device_count()} "
            "devices; on a CPU set DNL_ZOO_CPU_DEVICES before the run"
        )
    result = run(args)
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
