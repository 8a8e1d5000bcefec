"""Draws docs/convergence.png: DNL block outputs as depth grows (docs/dnl.md).

    .venv/bin/python docs/make_figures.py

A norm-free DNL block with smooth fixed fields G(t) = G0 + t G1 and
K(t, s) = K0 + t K1 + s K2 (`depth.linear_fields` and `depth.sampled_block`, as
in the tests) is run at N = 4 ... 256. Left: |x_N(T) - x_2N(T)| against N with
h = T/N, beside a slope of -1 (first order). Right: the largest state norm
against N for h = T/N and h = 1. It takes about a minute on a 2-core CPU.
"""

import pathlib

import jax
import matplotlib
import numpy as np
from flax import nnx

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dnl_zoo import depth  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent


def final_history(num_layers: int, fields, depth_scale: str, x0) -> np.ndarray:
    """The whole history of a sampled block on x0: (batch, H, W, 2 + 2 N)."""
    block = depth.sampled_block(num_layers, fields, c0=2, k=2, depth_scale=depth_scale)
    return np.asarray(nnx.jit(lambda b, x: b(x))(block, x0))


def main() -> None:
    """Computes both panels and writes the PNG."""
    fields = depth.linear_fields(2, 2, seed=3)
    x0 = np.asarray(jax.random.normal(jax.random.key(1), (2, 6, 6, 2)))
    depths = [4, 8, 16, 32, 64, 128]
    final, norms = {}, {"step": [], "none": []}
    for n in [*depths, 256]:
        history = final_history(n, fields, "step", x0)
        final[n] = history[..., -2:]
        norms["step"].append(max(depth.state_norms(history, 2, 2)))
    for n in depths[:4]:
        history = final_history(n, fields, "none", x0)
        norms["none"].append(max(depth.state_norms(history, 2, 2)))
    gaps = [float(np.max(np.abs(final[2 * n] - final[n]))) for n in depths]

    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.loglog(depths, gaps, "o-", label=r"$\max|x_N(T) - x_{2N}(T)|$")
    left.loglog(
        depths, [gaps[0] * depths[0] / n for n in depths], "k--", label="slope -1"
    )
    left.set(xlabel="layers per block N", title="convergence, h = T/N")
    left.legend()
    right.semilogy([*depths, 256], norms["step"], "o-", label="h = T/N")
    right.semilogy(depths[:4], norms["none"], "s-", label="h = 1 (DenseNet)")
    right.set(xlabel="layers per block N", ylabel=r"$\max_n |x_n|$", title="stability")
    right.set_xscale("log", base=2)
    right.legend()
    figure.tight_layout()
    out = ROOT / "docs" / "convergence.png"
    figure.savefig(out, dpi=120)
    print(f"wrote {out}; gaps {gaps}; norms {norms}")


if __name__ == "__main__":
    main()
