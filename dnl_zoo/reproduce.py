"""Depth tables: the shipped ladders, and the DNL depth sweep trained from scratch.

`shipped_table` evaluates every shipped checkpoint (`dnl-zoo eval NAME` for
each) and returns one row per model; `sweep` trains dnl_conv_n{N} (h = T/N) and
dnl_conv_n{N}_h1 (h = 1, the contrast) with one recipe and measures each. Both
come with a Markdown table and a PNG plot against depth; `dnl-zoo reproduce
depth-table` runs them.
"""

import dataclasses
import math
import pathlib

import ml_collections

from dnl_zoo import pretrained
from dnl_zoo.models import dnl, registry

# What one row of a table holds, and how its column reads in Markdown.
_COLUMNS = {
    "name": ("model", "{}"),
    "ladder": ("ladder", "{}"),
    "depth": ("depth", "{}"),
    "params": ("parameters", "{:,}"),
    "mflops": ("MFLOPs", "{:.1f}"),
    "train_loss": ("train loss", "{:.4f}"),
    "test_top1": ("test top-1 %", "{:.2f}"),
    "test_loss": ("test loss", "{:.4f}"),
    "epochs": ("epochs", "{:g}"),
    "train_minutes": ("training min", "{:.0f}"),
}
PRECISION = {"test_top1": 2, "test_loss": 4, "train_loss": 4}


def ladder_of(name: str) -> tuple[str, int, str]:
    """(ladder, depth, depth label) of a registered model.

    DenseNet-BC rungs are measured in L (total layers), DNL rungs in N (layers
    per block).
    """
    spec = registry.get_spec(name)
    if spec.family == "densenet":
        return "densenet_bc", spec.kwargs["depth"], "L"
    variant = name.rsplit("_n", 1)[0]
    suffix = name.rsplit("_n", 1)[1].partition("_")[2]
    ladder = f"{variant}_{suffix}" if suffix else variant
    return ladder, spec.kwargs["block_config"][0], "N"


def _order(name: str) -> tuple[str, int]:
    ladder, depth, _ = ladder_of(name)
    return ladder, depth


def shipped_table(
    names: list[str] | None = None,
    *,
    data_dir: str | None = None,
    batch_size: int | None = None,
) -> list[dict]:
    """One row per shipped model, its test metrics measured now.

    Each row also carries the manifest's figures (`manifest_top1`,
    `manifest_loss`) so that a caller can compare the two.
    """
    names = sorted(names or pretrained.manifest(), key=_order)
    rows = []
    for name in names:
        entry = pretrained.entry(name)
        metrics = pretrained.evaluate(name, data_dir=data_dir, batch_size=batch_size)
        ladder, depth, label = ladder_of(name)
        rows.append(
            {
                "name": name,
                "ladder": ladder,
                "depth": f"{label}={depth}",
                "depth_value": depth,
                "params": entry["params"],
                "mflops": entry["flops"] / 1e6,
                "test_top1": metrics["eval_top1"],
                "test_loss": metrics["eval_loss"],
                "epochs": entry["epochs"],
                "train_minutes": (entry["wall_seconds"] or float("nan")) / 60,
                "manifest_top1": entry["test"]["eval_top1"],
                "manifest_loss": entry["test"]["eval_loss"],
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table of the columns they have."""
    columns = [c for c in _COLUMNS if c in rows[0]]
    head = "| " + " | ".join(_COLUMNS[c][0] for c in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = [
        "| " + " | ".join(_COLUMNS[c][1].format(row[c]) for c in columns) + " |"
        for row in rows
    ]
    return "\n".join([head, rule, *body])


def plot(rows: list[dict], path: str | pathlib.Path, metrics: tuple[str, ...]) -> None:
    """One panel per metric against depth, one line per ladder, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6))
    for axis, metric in zip(axes, metrics, strict=True):
        for ladder in dict.fromkeys(row["ladder"] for row in rows):
            mine = [row for row in rows if row["ladder"] == ladder]
            depths = [row["depth_value"] for row in mine]
            axis.plot(depths, [row[metric] for row in mine], "o-", label=ladder)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("depth (L for DenseNet-BC, N per block for DNL)")
        axis.set_ylabel(_COLUMNS[metric][0])
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ---------------------------------------------------------------------------
# The DNL depth sweep from scratch (docs/dnl.md; DESIGN section 2.5).
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Budget:
    """How much of the sweep to run: depths, steps and the data measured."""

    depths: tuple[int, ...]
    num_train_steps: int  # -1: the config's epochs
    batch_size: int
    train_split: str  # what trains; '' for the whole train split
    train_loss_split: str  # train images whose loss is the "final training loss"


BUDGETS = {
    # Under 15 minutes on a 2-core CPU: the direction of the effect, not its size.
    "quick": Budget((1, 2, 4, 8), 300, 64, "", "train[:5000]"),
    "full": Budget(registry.SWEEP_DEPTHS, -1, 128, "", "train"),
}
SWEEP_FAMILIES = {"dnl_conv_n{n}": "h = T/N", "dnl_conv_n{n}_h1": "h = 1"}


def budget(
    name: str,
    *,
    depths: list[int] | None = None,
    steps: int | None = None,
    split: str | None = None,
) -> tuple[Budget, str]:
    """BUDGETS[name] with any of its depths, steps or train split replaced.

    Returns the budget and a name for its runs: `name` itself, or one that
    spells out what changed, so that different budgets never share a run.
    """
    base = BUDGETS[name]
    changes = dict(depths=tuple(depths or ()), num_train_steps=steps, train_split=split)
    plan = dataclasses.replace(base, **{k: v for k, v in changes.items() if v})
    if plan == base:
        return plan, name
    depths_text = "_".join(map(str, plan.depths))
    split_text = "".join(c for c in plan.train_split if c.isalnum())
    return plan, f"{name}_n{depths_text}_steps{plan.num_train_steps}{split_text}"


def sweep_config(name: str, budget: Budget, base) -> ml_collections.ConfigDict:
    """The one recipe of the sweep for model `name` under `budget`."""
    config = ml_collections.ConfigDict(base.to_dict())
    config.model.name = name
    config.batch_size = budget.batch_size
    config.num_train_steps = budget.num_train_steps
    config.dataset.train_split = budget.train_split
    config.progress_bar = False
    if budget.num_train_steps > 0:
        config.checkpoint.every_steps = budget.num_train_steps
        config.eval_every_steps = budget.num_train_steps
        config.schedule.warmup_epochs = 0.0
    return config


def sweep(
    budget: "str | Budget",
    base,
    workdir: str | pathlib.Path,
    *,
    data_dir: str | None = None,
) -> list[dict]:
    """Trains and measures every model of the sweep; resumes what is in `workdir`.

    `budget` is a name in BUDGETS or a Budget of one's own. A model that
    computes the same network as one already measured (dnl_conv_n1_h1 is
    dnl_conv_n1 when T = 1) shares its row's numbers instead of training again.
    """
    plan = BUDGETS[budget] if isinstance(budget, str) else budget
    rows, measured = [], {}
    for pattern, ladder in SWEEP_FAMILIES.items():
        for n in plan.depths:
            name = pattern.format(n=n)
            network = _network(name)
            if network not in measured:  # N = 1 with T = 1: h = T/N is h = 1
                measured[network] = _measure(name, plan, base, workdir, data_dir)
            info = registry.model_info(name)
            rows.append(
                {"name": name, "ladder": ladder, "depth": f"N={n}", "depth_value": n}
                | {"params": info["params"], "mflops": info["flops"] / 1e6}
                | measured[network]
            )
    return rows


def _network(name: str) -> str:
    """What a sweep model computes: its arguments, with depth_scale resolved to h."""
    kwargs = dict(registry.get_spec(name).kwargs)
    scale = kwargs.pop("depth_scale", "step")
    steps = [
        dnl.step_size(kwargs.get("horizon", 1.0), n, scale)
        for n in kwargs["block_config"]
    ]
    return repr(sorted(kwargs.items()) + [("h", steps)])


def _measure(name: str, plan: Budget, base, workdir, data_dir) -> dict:
    """Trains (or resumes) one sweep model; its final training and test metrics."""
    from dnl_zoo import train

    config = sweep_config(name, plan, base)
    if data_dir is not None:
        config.dataset.data_dir = data_dir
    run = pathlib.Path(workdir) / name
    test = train.train_and_evaluate(config, run)
    model = train.restore_model(config, run)
    if "eval_top1" not in test:  # a finished run resumed: nothing ran
        test = train.evaluate_model(config, model)
    config.dataset.eval_split = plan.train_loss_split
    fit = train.evaluate_model(config, model)
    return {
        "train_loss": fit["eval_loss"],
        "test_top1": test["eval_top1"],
        "test_loss": test["eval_loss"],
    }


def falls_with_depth(rows: list[dict], ladder: str, metric: str) -> bool:
    """Whether `metric` of `ladder` decreases from each depth to the next."""
    values = [row[metric] for row in rows if row["ladder"] == ladder]
    return all(b < a for a, b in zip(values, values[1:], strict=False))


def agrees(row: dict) -> bool:
    """Whether a measured row equals the manifest to the reported precision."""
    return math.isclose(
        round(row["test_top1"], PRECISION["test_top1"]),
        round(row["manifest_top1"], PRECISION["test_top1"]),
    ) and math.isclose(
        round(row["test_loss"], PRECISION["test_loss"]),
        round(row["manifest_loss"], PRECISION["test_loss"]),
    )
