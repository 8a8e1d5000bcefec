"""Training-step speed and memory of dnl_zoo against PyTorch, in one process.

    .venv/bin/python -m benchmarks.run                      # DenseNet-BC-100 at 32x32
    .venv/bin/python -m benchmarks.run --depths 40 100 190 250 --json out.json

Measures, side by side and in the same run:
- throughput (images/s, median over --steps timed steps after --warmup) of one
  SGD-with-momentum training step of a CIFAR DenseNet-BC: dnl_zoo (jax.jit) and
  PyTorch eager in its default layout (NCHW) and channels_last, same
  architecture, batch and optimiser;
- for each depth in --depths: dnl_zoo's compile time and XLA's temporary bytes
  of the compiled training step (`memory_analysis().temp_size_in_bytes`).
It prints one Markdown table with ratios and writes the same as JSON. Numbers
are for this machine only; compare them within one run.
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dnl_zoo import hardware
from dnl_zoo.models.densenet import cifar_block_config, cifar_densenet


def _jax_step(model, optimizer):
    """The compiled training step of dnl_zoo: (state, images, labels) -> state."""
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


def build_jax(depth: int, growth_rate: int):
    model = cifar_densenet(
        depth, growth_rate, bottleneck=True, compression=0.5, rngs=nnx.Rngs(0)
    )
    optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    return _jax_step(model, optimizer)


def compile_stats(depth: int, growth_rate: int, batch: int, size: int) -> dict:
    """Compile seconds and XLA temporary bytes of dnl_zoo's training step."""
    step, state = build_jax(depth, growth_rate)
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    start = time.perf_counter()
    compiled = step.lower(state, images, labels).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    return {
        "depth": depth,
        "compile_s": seconds,
        "temp_bytes": int(memory.temp_size_in_bytes) if memory else None,
    }


def _step_times(run_step, steps: int, warmup: int) -> list[float]:
    """Seconds of each of `steps` calls of run_step(), after `warmup` calls."""
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        run_step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def time_jax(depth, growth_rate, batch, size, steps, warmup) -> list[float]:
    step, state = build_jax(depth, growth_rate)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(batch, size, size, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
    carry = [state]

    def run_step():
        carry[0], loss = step(carry[0], images, labels)
        jax.block_until_ready(loss)

    return _step_times(run_step, steps, warmup)


def time_torch(depth, growth_rate, batch, size, steps, warmup, channels_last):
    import torch

    from benchmarks.torch_densenet import DenseNet

    model = DenseNet(
        cifar_block_config(depth, bottleneck=True),
        growth_rate,
        2 * growth_rate,
        stem="cifar",
        num_classes=10,
    )
    images = torch.randn(batch, 3, size, size)
    labels = torch.randint(0, 10, (batch,))
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


def run(args: argparse.Namespace) -> dict:
    """All measurements of one invocation, as a dict."""
    shape = (args.depth, args.growth_rate, args.batch_size, args.image_size)
    timing = (args.steps, args.warmup)
    throughput = {"dnl_zoo": time_jax(*shape, *timing)}
    if not args.no_torch:
        throughput["torch"] = time_torch(*shape, *timing, channels_last=False)
        throughput["torch_channels_last"] = time_torch(
            *shape, *timing, channels_last=True
        )
    depths = [
        compile_stats(d, args.growth_rate, args.batch_size, args.image_size)
        for d in args.depths
    ]
    return {
        "hardware": hardware.describe(),
        "model": f"DenseNet-BC L={args.depth}, k={args.growth_rate}",
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "throughput_images_per_s": {
            name: args.batch_size / statistics.median(times)
            for name, times in throughput.items()
        },
        "pointwise_gflops": time_pointwise(args.batch_size, args.image_size, *timing),
        "depths": depths,
    }


def table(result: dict) -> str:
    """The result as Markdown, with ratios to PyTorch and to the first depth."""
    lines = [
        f"{result['model']}, batch {result['batch_size']}, "
        f"{result['image_size']}x{result['image_size']}; {result['hardware']}",
        "",
        "| training step | images/s | dnl_zoo / this |",
        "|---|---|---|",
    ]
    speeds = result["throughput_images_per_s"]
    for name, value in speeds.items():
        lines.append(f"| {name} | {value:.1f} | {speeds['dnl_zoo'] / value:.2f}x |")
    ops = result["pointwise_gflops"]
    lines += [
        "",
        "| 1x1 convolution 120 -> 48, forward and backward | GFLOP/s |",
        "|---|---|",
        f"| as conv_general_dilated | {ops['conv']:.1f} |",
        f"| as a matrix product | {ops['matmul']:.1f} |",
    ]
    lines += [
        "",
        "| depth L | compile s | XLA temp MiB | compile / first |",
        "|---|---|---|---|",
    ]
    first = result["depths"][0]["compile_s"] if result["depths"] else 1.0
    for row in result["depths"]:
        mib = (
            row["temp_bytes"] / 2**20 if row["temp_bytes"] is not None else float("nan")
        )
        lines.append(
            f"| {row['depth']} | {row['compile_s']:.1f} | {mib:.1f} | "
            f"{row['compile_s'] / first:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Parses flags, measures, prints the table and writes --json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=100, help="L of the speed test")
    parser.add_argument("--growth-rate", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--depths", type=int, nargs="*", default=[40, 100])
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    result = run(args)
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
