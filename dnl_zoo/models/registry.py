"""One registry for every model: create_model, list_models, model_info.

A registry entry names a builder, its default arguments, the input size its
published results use, and the published reference result where one exists.
Pretrained weights are looked up in the shipped checkpoint manifest.
"""

import dataclasses
import difflib
import fnmatch
import functools
import inspect
from collections.abc import Callable
from typing import Any

from flax import nnx

from dnl_zoo.models import costs, densenet, dnl


@dataclasses.dataclass(frozen=True)
class Reference:
    """A published result: `value` of `metric` on `dataset`, from `source`."""

    dataset: str
    metric: str
    value: float
    source: str
    params: str | None = None  # the parameter count as the source prints it


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How to build one registered model and what it is known to reach."""

    name: str
    family: str
    builder: Callable[..., nnx.Module]
    kwargs: dict[str, Any]
    input_size: tuple[int, int, int]  # (height, width, channels)
    num_classes: int
    description: str
    reference: Reference | None = None


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Adds `spec` to the registry; names must be new and lowercase."""
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    if spec.name != spec.name.lower():
        raise ValueError(f"registry names are lowercase, got {spec.name!r}")
    _REGISTRY[spec.name] = spec
    return spec


def list_models(pattern: str | None = None) -> list[str]:
    """Registered names, sorted, optionally filtered by a glob like 'densenet_bc*'."""
    names = sorted(_REGISTRY)
    if pattern is None:
        return names
    return [n for n in names if fnmatch.fnmatch(n, pattern)]


def get_spec(name: str) -> ModelSpec:
    """The registry entry for `name`, or an error listing the closest names."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise KeyError(
            f"no model named {name!r}{hint} (dnl_zoo.list_models() lists all "
            f"{len(_REGISTRY)})"
        )
    return _REGISTRY[name]


def _accepted_arguments(builder: Callable[..., nnx.Module]) -> set[str]:
    """Keyword arguments `builder` takes, following **kwargs to its model class."""
    target = builder.__init__ if isinstance(builder, type) else builder
    signature = inspect.signature(target)
    names = set()
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            names |= _accepted_arguments(signature.return_annotation)
        elif name not in ("self", "rngs"):
            names.add(name)
    return names


def create_model(
    name: str,
    *,
    num_classes: int | None = None,
    seed: int = 0,
    pretrained: bool = False,
    **overrides,
) -> nnx.Module:
    """Builds the registered model `name`.

    Args:
      name: a name from list_models().
      num_classes: outputs of the classifier; the preset's own by default.
      seed: seeds parameter initialisation and dropout.
      pretrained: load the shipped weights (their sha256 is checked first).
      **overrides: any constructor argument, e.g. in_channels=1, dropout_rate=0.2.

    Returns:
      The model in train mode (call .eval() for inference).
    """
    spec = get_spec(name)
    allowed = _accepted_arguments(spec.builder)
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise TypeError(
            f"create_model({name!r}) got unknown argument(s) {unknown}; "
            f"{name} accepts {sorted(allowed - {'num_classes'})}"
        )
    kwargs = spec.kwargs | overrides
    kwargs["num_classes"] = spec.num_classes if num_classes is None else num_classes
    if pretrained:
        from dnl_zoo import pretrained as shipped

        return shipped.load(name, seed=seed, **kwargs)
    return spec.builder(**kwargs, rngs=nnx.Rngs(seed))


@functools.cache
def model_info(name: str) -> dict[str, Any]:
    """Parameters, MACs and FLOPs per image at the default input size, and more.

    Counts come from an abstract model (nnx.eval_shape): nothing is allocated.
    """
    spec = get_spec(name)
    model = nnx.eval_shape(
        lambda: spec.builder(
            **spec.kwargs, num_classes=spec.num_classes, rngs=nnx.Rngs(0)
        )
    )
    macs = costs.count_macs(model, spec.input_size)
    from dnl_zoo import pretrained as shipped

    return {
        "name": name,
        "family": spec.family,
        "description": spec.description,
        "input_size": spec.input_size,
        "num_classes": spec.num_classes,
        "params": costs.count_params(model),
        "macs": macs,
        "flops": 2 * macs,
        "reference": dataclasses.asdict(spec.reference) if spec.reference else None,
        "pretrained": shipped.available(name),
    }


# ---------------------------------------------------------------------------
# Presets: the DenseNet family.
# ---------------------------------------------------------------------------

_PAPER = "Huang et al., Densely Connected Convolutional Networks, CVPR 2017"


def _cifar(name, depth, k, bottleneck, error, params, description):
    register(
        ModelSpec(
            name=name,
            family="densenet",
            builder=densenet.cifar_densenet,
            kwargs=dict(
                depth=depth,
                growth_rate=k,
                bottleneck=bottleneck,
                compression=0.5 if bottleneck else 1.0,
            ),
            input_size=(32, 32, 3),
            num_classes=10,
            description=description,
            reference=Reference(
                dataset="cifar10 (standard augmentation)",
                metric="top1_accuracy",
                value=round(100.0 - error, 2),
                source=f"{_PAPER}, Table 2 (C10+ error {error}%)",
                params=params,
            ),
        )
    )


_cifar("densenet40_k12", 40, 12, False, 5.24, "1.0M", "DenseNet L=40, k=12")
_cifar("densenet100_k12", 100, 12, False, 4.10, "7.0M", "DenseNet L=100, k=12")
_cifar("densenet100_k24", 100, 24, False, 3.74, "27.2M", "DenseNet L=100, k=24")
_cifar("densenet_bc100_k12", 100, 12, True, 4.51, "0.8M", "DenseNet-BC L=100, k=12")
_cifar("densenet_bc250_k24", 250, 24, True, 3.62, "15.3M", "DenseNet-BC L=250, k=24")
_cifar("densenet_bc190_k40", 190, 40, True, 3.46, "25.6M", "DenseNet-BC L=190, k=40")


# Not in the paper's table; the smallest BC network, for fast CPU runs.
register(
    ModelSpec(
        name="densenet_bc40_k12",
        family="densenet",
        builder=densenet.cifar_densenet,
        kwargs=dict(depth=40, growth_rate=12, bottleneck=True, compression=0.5),
        input_size=(32, 32, 3),
        num_classes=10,
        description="DenseNet-BC L=40, k=12",
    )
)


# The Fashion-MNIST DenseNet-BC ladder (28x28 greyscale), sized for CPU training;
# checkpoints/ ships their weights. L = 6n + 4 for n layers per block.
FASHION_BC_DEPTHS = (16, 22, 28, 40)

for _depth in FASHION_BC_DEPTHS:
    register(
        ModelSpec(
            name=f"densenet_bc{_depth}_k12_fmnist",
            family="densenet",
            builder=densenet.cifar_densenet,
            kwargs=dict(
                depth=_depth,
                growth_rate=12,
                bottleneck=True,
                compression=0.5,
                in_channels=1,
            ),
            input_size=(28, 28, 1),
            num_classes=10,
            description=f"DenseNet-BC L={_depth}, k=12, 28x28 greyscale",
        )
    )


def _imagenet(name, blocks, k, init, reference):
    register(
        ModelSpec(
            name=name,
            family="densenet",
            builder=densenet.DenseNet,
            kwargs=dict(
                block_config=blocks,
                growth_rate=k,
                num_init_features=init,
                bottleneck=True,
                compression=0.5,
                stem="imagenet",
            ),
            input_size=(224, 224, 3),
            num_classes=1000,
            description=f"DenseNet-BC, blocks {blocks}, k={k}, ImageNet stem",
            reference=reference,
        )
    )


def _imagenet_paper(top1_error):
    return Reference(
        dataset="imagenet2012 validation",
        metric="top1_accuracy",
        value=round(100.0 - top1_error, 2),
        source=f"{_PAPER}, Table 3 (single-crop top-1 error {top1_error}%)",
    )


_imagenet("densenet121", (6, 12, 24, 16), 32, 64, _imagenet_paper(25.02))
_imagenet("densenet169", (6, 12, 32, 32), 32, 64, _imagenet_paper(23.80))
_imagenet("densenet201", (6, 12, 48, 32), 32, 64, _imagenet_paper(22.58))
_imagenet("densenet264", (6, 12, 64, 48), 32, 64, _imagenet_paper(22.15))
_imagenet(
    "densenet161",
    (6, 12, 36, 24),
    48,
    96,
    Reference(
        dataset="imagenet2012 validation",
        metric="top1_accuracy",
        value=77.14,
        source="torchvision DenseNet161_Weights.IMAGENET1K_V1 (acc@1 77.138)",
    ),
)


# ---------------------------------------------------------------------------
# Presets: the dense non-local (DNL) depth sweep (docs/dnl.md).
# ---------------------------------------------------------------------------
# Fashion-MNIST-sized (28x28x1), 3 blocks of N layers, k = 12, T = 1, BatchNorm,
# no bottleneck (a norm after the aggregation would cancel h), and transitions
# of a fixed width, so that every depth samples the same fields.

SWEEP_DEPTHS = (2, 4, 8, 16, 32)
# The shipped DNL ladder adds N = 1 (h = T): checkpoints/ ships N = 1, 2, 4, 8.
LADDER_DEPTHS = (1, 2, 4, 8)

_DNL_BASE = dict(
    growth_rate=12,
    num_init_features=24,
    transition_features=48,
    horizon=1.0,
    norm="batch",
    bottleneck=False,
    in_channels=1,
)

_DNL_VARIANTS = {
    # name with {n}: (transform, depth_scale, extra arguments, description)
    "dnl_conv_n{n}": ("local", "step", {}, "local 3x3 transform, h = T/N"),
    "dnl_conv_n{n}_h1": ("local", "none", {}, "local 3x3 transform, h = 1 (contrast)"),
    # Non-local where positions are few, as non-local networks do: blocks 2
    # and 3 (14x14 with keys pooled 2x2, and 7x7); block 1 (28x28) stays local.
    "dnl_nonlocal_n{n}": (
        ("local", "local+embedded_gaussian", "local+embedded_gaussian"),
        "step",
        {"pool": (1, 2, 1)},
        "3x3 plus embedded-Gaussian non-local in blocks 2-3, h = T/N",
    ),
}


def _dnl(name: str, num_layers: int) -> None:
    transform, depth_scale, extra, description = _DNL_VARIANTS[name]
    register(
        ModelSpec(
            name=name.format(n=num_layers),
            family="dnl",
            builder=dnl.DNLNet,
            kwargs=_DNL_BASE
            | extra
            | dict(
                block_config=(num_layers,) * 3,
                transform=transform,
                depth_scale=depth_scale,
            ),
            input_size=(28, 28, 1),
            num_classes=10,
            description=f"DNL, 3 blocks of N={num_layers}, {description}",
        )
    )


for _name in _DNL_VARIANTS:
    for _n in sorted(set(SWEEP_DEPTHS) | set(LADDER_DEPTHS)):
        _dnl(_name, _n)
