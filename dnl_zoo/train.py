"""Training and evaluation: one trainer for every registered model.

Read top to bottom: `create_model`, `create_optimizer`, `Trainer` (the mesh or
pmap replicas, the compiled steps), `train_and_evaluate` (the loop, metrics,
checkpoints and resume).

Data parallelism, as `config.parallelism` says:
- 'jit' (default): a 1-D mesh over every device with axis 'data'; the batch is
  split on it and the parameters are replicated (`NamedSharding`). XLA computes
  BatchNorm statistics over the global batch.
- 'pmap': one replica per device; gradients and BatchNorm statistics are
  averaged over the axis 'data' with collectives.
Several processes (`jax.distributed`) each feed their share of the batch.

A run saves its whole state (parameters, statistics, optimiser, step) with
Orbax every `checkpoint.every_steps` steps and at the end, keeps the last few
and the best by eval accuracy, and resumes from its workdir by itself. The
input order is a function of (seed, step), so a resumed run sees the batches
that the interrupted one would have seen.
"""

import dataclasses
import functools
import json
import math
import os
import pathlib
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from orbax.checkpoint import checkpoint_managers as policies
from tqdm import tqdm

from dnl_zoo import data as data_lib
from dnl_zoo import depth, hardware, pretrained
from dnl_zoo.errors import ActionableError
from dnl_zoo.models import layers, registry
from dnl_zoo.models.dnl import DNLNet


class NonFiniteLossError(ActionableError, FloatingPointError):
    """Raised when the training loss stops being finite; names the step."""


def create_model(config: ml_collections.ConfigDict, info) -> nnx.Module:
    """The registered model of `config.model`, sized for the dataset.

    With `config.init.pretrained` set, the model starts from those shipped
    weights; `config.init.new_head` gives it a freshly initialised classifier.
    """
    overrides = dict(config.model.overrides)
    overrides.setdefault("in_channels", info.image_shape[-1])
    if config.compute_dtype != "float32":
        overrides["dtype"] = jnp.dtype(config.compute_dtype)
    name, init = config.model.name, config.init
    if not init.pretrained:
        return registry.create_model(
            name, num_classes=info.num_classes, seed=config.seed, **overrides
        )
    if init.pretrained != name:
        raise ValueError(
            f"init.pretrained={init.pretrained!r} but model.name={name!r}; a "
            "fine-tune starts from the model it names, so set both to the same"
        )
    kwargs = registry.get_spec(name).kwargs | overrides
    return pretrained.load(
        name,
        seed=config.seed,
        new_head=init.new_head,
        num_classes=info.num_classes,
        **kwargs,
    )


def trainable(config) -> nnx.filterlib.Filter:
    """The parameters a run updates: all, or the classifier alone."""
    if config.init.freeze_body:
        return nnx.All(nnx.Param, nnx.PathContains("classifier"))
    return nnx.Param


def scale_by_factors(factors: dict[str, np.ndarray]) -> optax.GradientTransformation:
    """Multiplies the update of each parameter path in `factors` by its factors."""

    def scale(path, update):
        factor = factors.get(layers.dotted_path(path))
        return update if factor is None else update * factor.astype(update.dtype)

    def update_fn(updates, state, params=None):
        return jax.tree_util.tree_map_with_path(scale, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _field_metric_factors(config, model) -> dict[str, np.ndarray]:
    """depth.field_metric_scales of a DNL model where the config asks for them."""
    if model is None:  # only the state's layout is asked for
        return {}
    if not isinstance(model, DNLNet):
        raise ValueError(
            f"optimizer.field_metric=True needs a DNL model (its weights sample "
            f"fields in depth), got {type(model).__name__} for {config.model.name}; "
            "set optimizer.field_metric=False"
        )
    return depth.field_metric_scales(model)


def create_optimizer(config, total_steps: int, steps_per_epoch: int, model=None):
    """The optax transform and its learning-rate schedule.

    With `optimizer.field_metric`, the gradient of each weight of a DNL `model`
    is scaled by depth.field_metric_scales (weight decay included) before SGD.
    """
    opt, sched = config.optimizer, config.schedule
    warmup = int(sched.warmup_epochs * steps_per_epoch)
    lr = opt.learning_rate
    if sched.name == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(
            0.0 if warmup else lr, lr, warmup, max(total_steps, warmup + 1)
        )
    elif sched.name in ("step", "constant"):
        bounds = sched.boundaries if sched.name == "step" else ()
        # join_schedules hands the second schedule the steps since warm-up.
        schedule = optax.piecewise_constant_schedule(
            lr, {int(b * total_steps) - warmup: sched.decay_factor for b in bounds}
        )
        if warmup:
            ramp = optax.linear_schedule(0.0, lr, warmup)
            schedule = optax.join_schedules([ramp, schedule], [warmup])
    else:
        raise ValueError(
            f"schedule.name must be 'cosine', 'step' or 'constant', got {sched.name!r}"
        )
    if opt.name == "sgd":
        # Only with the field metric: the optimiser state keeps the layout of
        # the training checkpoints written without it.
        field = (
            [scale_by_factors(_field_metric_factors(config, model))]
            if opt.field_metric
            else []
        )
        tx = optax.chain(
            optax.add_decayed_weights(opt.weight_decay),
            *field,
            optax.sgd(schedule, momentum=opt.momentum, nesterov=opt.nesterov),
        )
    elif opt.name == "adamw":
        if opt.field_metric:
            raise ValueError(
                "optimizer.field_metric=True scales SGD's gradients; Adam's "
                "updates do not follow a gradient's scale: use optimizer.name='sgd'"
            )
        tx = optax.adamw(schedule, weight_decay=opt.weight_decay)
    else:
        raise ValueError(f"optimizer.name must be 'sgd' or 'adamw', got {opt.name!r}")
    return tx, schedule


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy: logits (batch, classes), labels (batch,)."""
    logits = logits.astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def eval_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict:
    """Summed loss, top-1 and top-5 hits and count over the real examples."""
    logits = logits.astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    mask = mask.astype(jnp.float32)
    return {
        "loss": jnp.sum(losses * mask),
        "top1": jnp.sum((top5[:, 0] == labels) * mask),
        "top5": jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * mask),
        "count": jnp.sum(mask),
    }


def _set_batch_norm_axis(model: nnx.Module, axis_name: str | None) -> None:
    for _, module in nnx.iter_modules(model):
        # layers.BatchNorm, and a scanned block's stacked norms (StackedLayers)
        if hasattr(module, "axis_name"):
            module.axis_name = axis_name


def _replicate(x, sharding: NamedSharding) -> jax.Array:
    """One host array as a global array replicated over every process's devices.

    (jax.device_put only reaches this process's devices.)
    """
    if _is_key(x):
        words = _replicate(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(words, impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda i: host[i])


@dataclasses.dataclass
class Trainer:
    """Compiled train and eval steps over (graphdef, state) of model+optimizer."""

    config: ml_collections.ConfigDict
    graphdef: nnx.GraphDef
    devices: list  # every device of every process for 'jit', local for 'pmap'

    @functools.cached_property
    def mesh(self) -> jax.sharding.Mesh:
        return jax.sharding.Mesh(np.array(self.devices), ("data",))

    @property
    def pmap(self) -> bool:
        return self.config.parallelism == "pmap"

    def _loss(self, model, batch):
        logits = model(batch["image"])
        loss = cross_entropy(logits, batch["label"])
        reg = self.config.regulariser
        if (reg.alpha or reg.beta) and isinstance(model, DNLNet):
            loss = loss + depth.regulariser(model, reg.alpha, reg.beta)
        return loss, logits

    def _train_step(self, state, batch):
        model, optimizer = nnx.merge(self.graphdef, state)
        # A frozen body keeps its BatchNorm statistics: eval mode throughout.
        model.eval() if self.config.init.freeze_body else model.train()
        wrt = nnx.DiffState(0, trainable(self.config))
        grad_fn = nnx.value_and_grad(self._loss, has_aux=True, argnums=wrt)
        (loss, logits), grads = grad_fn(model, batch)
        if self.pmap:
            grads, loss = jax.lax.pmean((grads, loss), "data")
        optimizer.update(model, grads)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        if self.pmap:
            accuracy = jax.lax.pmean(accuracy, "data")
        return nnx.state((model, optimizer)), {"loss": loss, "accuracy": accuracy}

    def _eval_step(self, state, batch):
        model, _ = nnx.merge(self.graphdef, state)
        model.eval()
        sums = eval_sums(model(batch["image"]), batch["label"], batch["mask"])
        return jax.lax.psum(sums, "data") if self.pmap else sums

    @functools.cached_property
    def train_step(self):
        if self.pmap:
            return jax.pmap(
                self._train_step,
                axis_name="data",
                donate_argnums=0,
                devices=self.devices,
            )
        return jax.jit(self._train_step, donate_argnums=0)

    @functools.cached_property
    def eval_step(self):
        if self.pmap:
            return jax.pmap(self._eval_step, axis_name="data", devices=self.devices)
        return jax.jit(self._eval_step)

    def place_state(self, state):
        """Replicates a host state onto the devices (stacked for pmap)."""
        if self.pmap:
            n = len(self.devices)
            return jax.tree.map(lambda x: jnp.stack([x] * n), state)
        sharding = NamedSharding(self.mesh, P())
        return jax.tree.map(lambda x: _replicate(x, sharding), state)

    def host_state(self, state):
        """The state as one copy, whatever the parallelism (for saving)."""
        return jax.tree.map(lambda x: x[0], state) if self.pmap else state

    def place_batch(self, batch: dict) -> dict:
        """This process's share of a global batch, onto its devices."""
        if self.pmap:
            n = len(self.devices)
            return {
                k: v.reshape(n, v.shape[0] // n, *v.shape[1:]) for k, v in batch.items()
            }
        sharding = NamedSharding(self.mesh, P("data"))
        return {
            k: jax.make_array_from_process_local_data(sharding, v)
            for k, v in batch.items()
        }


# ---------------------------------------------------------------------------
# Checkpoints.
# ---------------------------------------------------------------------------


def _is_key(x) -> bool:
    return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_saveable(state):
    """PRNG keys as their raw words: Orbax stores plain arrays."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, state)


def _from_saveable(saved, like):
    def unpack(s, x):
        return (
            jax.random.wrap_key_data(s, impl=jax.random.key_impl(x))
            if _is_key(x)
            else s
        )

    return jax.tree.map(unpack, saved, like)


def checkpoint_manager(workdir: pathlib.Path, config):
    """Orbax manager: keep the last `keep` checkpoints and the best by accuracy."""
    keep = [policies.LatestN(config.checkpoint.keep)]
    if config.checkpoint.keep_best:
        keep.append(
            policies.BestN(
                get_metric_fn=lambda m: m["accuracy"],
                reverse=True,
                n=1,
                keep_checkpoints_without_metrics=False,
            )
        )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(keep),
        enable_async_checkpointing=False,
        create=True,
    )
    # Orbax wants an absolute path; a relative workdir is the user's usual.
    directory = pathlib.Path(workdir).absolute() / "checkpoints"
    return ocp.CheckpointManager(directory, options=options)


def save(manager, step: int, state, meta: dict, metrics: dict | None) -> None:
    """Writes one checkpoint; Orbax renames it into place only when complete."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(_to_saveable(state)),
        meta=ocp.args.JsonSave(meta),
    )
    manager.save(step, args=args, metrics=metrics)
    manager.wait_until_finished()


def restore(manager, step: int, like) -> tuple[object, dict]:
    """The state saved at `step`, laid out like `like` (any device count)."""
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_saveable(like))
    args = ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
    )
    try:
        restored = manager.restore(step, args=args)
    # NOTE: TensorStore reports a truncated file as a bare Exception; whatever
    # fails while reading a checkpoint is reported as damage, with its cause.
    except Exception as error:
        directory = manager.directory / str(step)
        first_line = str(error).splitlines()[0][:300]
        if "tree structures do not match" in first_line:
            # Not damage: every step of this run has that layout; keep them all.
            raise CheckpointLayoutError(
                f"the checkpoint of step {step} in {directory} holds a model or "
                "optimiser state of another layout than this config builds "
                f"({first_line}). Resume with the config the run was written with "
                "(optimizer.name, optimizer.field_metric and model.name shape it), "
                "or train into a new workdir."
            ) from error
        raise CheckpointDamagedError(
            f"the checkpoint of step {step} in {directory} cannot be read "
            f"({type(error).__name__}: {first_line}). Delete that step's directory "
            "to resume from the one before."
        ) from error
    return _from_saveable(restored["state"], like), restored["meta"]


class CheckpointDamagedError(ActionableError, RuntimeError):
    """Raised when a training checkpoint is truncated or altered."""


class CheckpointLayoutError(ActionableError, RuntimeError):
    """Raised when a checkpoint was written by a config of another state layout."""


# ---------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------


def _tensorboard_writer(directory: pathlib.Path):
    """An event-file writer when the tensorboard package is installed, else None."""
    try:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError:
        return None
    return EventFileWriter(str(directory))


def _scalar_event(step: int, values: dict):
    from tensorboard.compat.proto import event_pb2, summary_pb2

    summary = summary_pb2.Summary(
        value=[
            summary_pb2.Summary.Value(tag=k, simple_value=float(v))
            for k, v in sorted(values.items())
        ]
    )
    return event_pb2.Event(step=step, wall_time=time.time(), summary=summary)


class Log:
    """Lines for people on stdout, the same values as JSONL and, when the
    tensorboard package is installed, as TensorBoard scalars; process 0 only."""

    def __init__(self, workdir: pathlib.Path):
        self.enabled = jax.process_index() == 0
        self.path = workdir / "metrics.jsonl"
        self.tensorboard = None
        if self.enabled:
            self.tensorboard = _tensorboard_writer(workdir / "tensorboard")

    def info(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def row(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        text = " ".join(f"{k}={_fmt(v)}" for k, v in sorted(values.items()))
        print(f"[{step}] {text}", flush=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.add_event(_scalar_event(step, values))
            self.tensorboard.flush()


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class WorkdirBusyError(ActionableError, RuntimeError):
    """Raised when another live run holds the workdir."""


def _lock_workdir(workdir: pathlib.Path) -> None:
    """Claims `workdir` for this run (process 0); a dead holder's lock is taken.

    Two runs writing one workdir would interleave their checkpoints and logs.
    """
    if jax.process_index() != 0:
        return
    lock = workdir / "run.lock"
    if lock.exists():
        holder = lock.read_text().strip()
        if holder.isdigit() and int(holder) != os.getpid() and _alive(int(holder)):
            raise WorkdirBusyError(
                f"another run (pid {holder}) is training in {workdir}; wait for it, "
                "stop it, or choose another --workdir"
            )
    lock.write_text(f"{os.getpid()}\n")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_batch(config) -> None:
    # The eval batch is rounded up instead (padding is masked out).
    devices, batch = jax.device_count(), config.batch_size
    if batch % devices:
        raise ValueError(
            f"batch_size={batch} does not divide over {devices} devices; use a "
            f"multiple of {devices}, e.g. "
            f"--config.batch_size={devices * max(1, batch // devices)}"
        )


def evaluate(trainer: Trainer, state, loader) -> dict:
    """Loss, top-1 and top-5 accuracy (%) over a whole eval split."""
    totals = None
    for batch in loader.eval_batches():
        sums = trainer.eval_step(state, trainer.place_batch(batch))
        sums = jax.tree.map(lambda x: float(np.asarray(x).ravel()[0]), sums)
        totals = sums if totals is None else {k: totals[k] + sums[k] for k in sums}
    count = totals["count"]
    return {
        "eval_loss": totals["loss"] / count,
        "eval_top1": 100.0 * totals["top1"] / count,
        "eval_top5": 100.0 * totals["top5"] / count,
    }


def _loader(config, info, *, train: bool):
    """The train or eval Loader of `config.dataset`, this process's share."""
    split = (
        config.dataset.train_split or info.train_split
        if train
        else config.dataset.eval_split or info.eval_split
    )
    source = data_lib.load_source(
        config.dataset.name, split, config.dataset.data_dir or None
    )
    augment = {"default": info.augment, "none": None}.get(
        config.dataset.augment, config.dataset.augment
    )
    return data_lib.Loader(
        source,
        global_batch_size=(
            config.batch_size if train else divisible_batch(config.eval_batch_size)
        ),
        seed=config.seed if train else 0,
        train=train,
        # Eval images change only for 'imagenet' (resize and centre crop).
        augment=augment if train else info.augment,
        mean=info.mean,
        std=info.std,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def build(config, info, total_steps: int, steps_per_epoch: int):
    """The Trainer, its initial host state, the schedule and the parameter count."""
    model = create_model(config, info)
    if config.parallelism == "pmap":
        _set_batch_norm_axis(model, "data")
    elif config.parallelism != "jit":
        raise ValueError(
            f"parallelism must be 'jit' or 'pmap', got {config.parallelism!r}"
        )
    tx, schedule = create_optimizer(config, total_steps, steps_per_epoch, model)
    optimizer = nnx.Optimizer(model, tx, wrt=trainable(config))
    graphdef, state = nnx.split((model, optimizer))
    pmap = config.parallelism == "pmap"
    trainer = Trainer(config, graphdef, jax.local_devices() if pmap else jax.devices())
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, trainable(config))))
    return trainer, state, schedule, params


def _restore_latest(config, workdir, step: int | None = None):
    """(trainer, host state, meta) of a checkpoint in `workdir` (latest if None).

    The optimiser's schedule is a placeholder: nothing here trains.
    """
    trainer, state, _, _ = build(config, dataset_info(config), 1, 1)
    manager = checkpoint_manager(pathlib.Path(workdir), config)
    step = step or manager.latest_step()
    if step is None:
        raise FileNotFoundError(
            f"no checkpoint in {pathlib.Path(workdir) / 'checkpoints'}; train first"
        )
    state, meta = restore(manager, step, state)
    return trainer, state, meta


def evaluate_workdir(config, workdir) -> dict:
    """Eval metrics of the latest checkpoint in `workdir`, with its step."""
    _check_batch(config)
    trainer, state, meta = _restore_latest(config, workdir)
    eval_loader = _loader(config, dataset_info(config), train=False)
    metrics = evaluate(trainer, trainer.place_state(state), eval_loader)
    return {"step": meta["step"], **metrics}


def evaluate_model(config, model: nnx.Module) -> dict:
    """Eval metrics of `model` on `config.dataset`'s eval split, on every device."""
    _check_batch(config)
    tx, _ = create_optimizer(config, 1, 1)  # only to give the state its layout
    graphdef, state = nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))
    pmap = config.parallelism == "pmap"
    trainer = Trainer(config, graphdef, jax.local_devices() if pmap else jax.devices())
    eval_loader = _loader(config, dataset_info(config), train=False)
    return evaluate(trainer, trainer.place_state(state), eval_loader)


def restore_params(config, workdir, step: int | None = None, *, with_meta=False):
    """{path: numpy array} of the parameters and statistics in a checkpoint.

    Restores onto this process's devices, whatever device count wrote it. With
    `with_meta`, returns (params, the checkpoint's meta: step, epoch, wall_seconds,
    hardware).
    """
    trainer, state, meta = _restore_latest(config, workdir, step)
    model, _ = nnx.merge(trainer.graphdef, state)
    params = layers.weight_values(model)
    return (params, meta) if with_meta else params


def restore_model(config, workdir, step: int | None = None) -> nnx.Module:
    """The model of a checkpoint in `workdir` (latest if None), in eval mode."""
    trainer, state, _ = _restore_latest(config, workdir, step)
    model, _ = nnx.merge(trainer.graphdef, state)
    model.eval()
    return model


def finetune_config(
    name: str,
    dataset: str,
    *,
    freeze_body: bool = False,
    data_dir: str | None = None,
    base=None,
) -> ml_collections.ConfigDict:
    """A config that fine-tunes the shipped `name` on `dataset` with a new head.

    `base` (a config) gives the recipe; by default 2 epochs of SGD with Nesterov
    momentum, learning rate 0.01 (0.1 with a frozen body), cosine decay.
    """
    from dnl_zoo.config import base_config

    config = base_config() if base is None else ml_collections.ConfigDict(base)
    if base is None:
        config.num_epochs = 2.0
        config.batch_size = 128
        config.optimizer.learning_rate = 0.1 if freeze_body else 0.01
        config.progress_bar = False
    config.model.name = name
    config.dataset.name = dataset
    config.dataset.data_dir = data_dir or config.dataset.data_dir
    config.init.update(pretrained=name, new_head=True, freeze_body=freeze_body)
    return config


def finetune(name: str, dataset: str, workdir, **kwargs) -> dict:
    """Fine-tunes the shipped `name` on `dataset` in `workdir` (see finetune_config).

    Returns:
      The final eval metrics, as train_and_evaluate returns them.
    """
    return train_and_evaluate(finetune_config(name, dataset, **kwargs), workdir)


def dataset_info(config) -> data_lib.DatasetInfo:
    """The DatasetInfo of `config.dataset.name`, or the names that exist."""
    if config.dataset.name not in data_lib.DATASETS:
        raise KeyError(
            f"unknown dataset {config.dataset.name!r}; expected one of "
            f"{sorted(data_lib.DATASETS)}"
        )
    return data_lib.DATASETS[config.dataset.name]


def divisible_batch(batch_size: int) -> int:
    """`batch_size` rounded up to a multiple of the device count."""
    devices = jax.device_count()
    return -(-batch_size // devices) * devices


def _total(config, steps_per_epoch: int) -> int:
    if config.num_train_steps > 0:
        return config.num_train_steps
    return math.ceil(config.num_epochs * steps_per_epoch)


def total_steps(config) -> int:
    """Training steps of `config`: num_train_steps, else num_epochs of the data."""
    source = data_lib.load_source(
        config.dataset.name,
        config.dataset.train_split or dataset_info(config).train_split,
        config.dataset.data_dir or None,
        in_memory=False,
    )
    return _total(config, len(source) // config.batch_size)


def train_and_evaluate(config, workdir) -> dict:
    """Trains `config` in `workdir` (resuming if it holds checkpoints).

    Returns:
      The metrics of the final evaluation, with `step`.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _lock_workdir(workdir)
    log = Log(workdir)
    _check_batch(config)
    info = dataset_info(config)
    train_loader = _loader(config, info, train=True)
    eval_loader = _loader(config, info, train=False)
    steps_per_epoch = train_loader.steps_per_epoch
    total = _total(config, steps_per_epoch)
    every_eval = (
        config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch
    )

    trainer, state, schedule, params = build(config, info, total, steps_per_epoch)
    mesh = trainer.mesh
    manager = checkpoint_manager(workdir, config)
    start, seconds_before = 0, 0.0
    if manager.latest_step() is not None:
        state, meta = restore(manager, manager.latest_step(), state)
        start = meta["step"]
        seconds_before = meta.get("wall_seconds", 0.0)
        log.info(f"resumed from {manager.directory / str(start)} at step {start}")
    state = trainer.place_state(state)

    log.info(f"config:\n{config}")
    log.info(
        f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} "
        f"devices, {jax.process_count()} process(es); global batch "
        f"{config.batch_size}, per device {config.batch_size // jax.device_count()}; "
        f"{params:,} trainable parameters; {steps_per_epoch} steps per epoch, "
        f"{total} steps"
    )
    run = _Run(
        config,
        trainer,
        manager,
        log,
        train_loader,
        eval_loader,
        schedule,
        total,
        every_eval,
        seconds_before,
    )
    try:
        return _loop(run, state, start)
    finally:
        if log.enabled:
            (workdir / "run.lock").unlink(missing_ok=True)


@dataclasses.dataclass
class _Run:
    """What the training loop reads besides the state."""

    config: ml_collections.ConfigDict
    trainer: Trainer
    manager: object
    log: Log
    train_loader: object
    eval_loader: object
    schedule: object
    total: int
    every_eval: int
    seconds_before: float  # wall seconds of the earlier runs this one resumes


class RunClock:
    """Seconds of a run that leave out the time it was paused with SIGTSTP.

    `kill -TSTP PID` (or Ctrl-Z) stops the process after the current step and
    `kill -CONT PID` resumes it; the pause counts neither in the checkpoints'
    `wall_seconds` nor in images/s. SIGSTOP cannot be caught: its pauses count.
    A step already dispatched to several CPU devices may log that a collective
    has waited for 20 seconds while the process is stopped; it resumes.
    """

    def __init__(self):
        self.paused = 0.0
        self._previous = None

    def now(self) -> float:
        """A monotonic clock in seconds that stands still while paused."""
        return time.perf_counter() - self.paused

    def _pause(self, signum, frame):
        start = time.perf_counter()
        os.kill(os.getpid(), signal.SIGSTOP)  # returns once SIGCONT arrives
        self.paused += time.perf_counter() - start

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTSTP, self._pause)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTSTP, self._previous)


def _loop(run: _Run, state, start: int) -> dict:
    config, trainer, manager, log = run.config, run.trainer, run.manager, run.log
    train_loader, eval_loader = run.train_loader, run.eval_loader
    schedule, total, every_eval = run.schedule, run.total, run.every_eval

    # Counted in images, so that the bar shows images/s beside its ETA.
    bar = tqdm(
        total=total * config.batch_size,
        initial=start * config.batch_size,
        disable=not (config.progress_bar and log.enabled),
        file=sys.stderr,
        unit="img",
        unit_scale=True,
    )
    with RunClock() as clock:
        run_start = clock.now()
        window_start, window_images, result = run_start, 0, {}
        if start < total:
            batch = trainer.place_batch(train_loader.batch(start))
        for step in range(start, total):
            if step == start:
                log.info(f"compiling the train step (step {step + 1})...")
                compile_start = clock.now()
            state, metrics = trainer.train_step(state, batch)
            if step + 1 < total:  # the host prepares it while the step runs
                batch = trainer.place_batch(train_loader.batch(step + 1))
            loss = float(np.asarray(metrics["loss"]).ravel()[0])
            if step == start:
                log.info(f"compiled and ran in {clock.now() - compile_start:.1f} s")
                window_start = clock.now()
            else:
                window_images += config.batch_size
            if not math.isfinite(loss):
                raise NonFiniteLossError(
                    f"the training loss became {loss} at step {step + 1}; nothing was "
                    f"saved for it, the last good checkpoint is step "
                    f"{manager.latest_step()}. Lower the learning rate or check the "
                    "data."
                )
            done = step + 1
            bar.update(config.batch_size)
            bar.set_postfix(loss=f"{loss:.3f}")
            row = {}
            if done % config.log_every_steps == 0 or done == total:
                seconds = clock.now() - window_start
                row |= {
                    "train_loss": loss,
                    "train_accuracy": float(np.asarray(metrics["accuracy"]).ravel()[0]),
                    "learning_rate": float(schedule(step)),
                    "images_per_sec": round(window_images / seconds)
                    if window_images
                    else 0,
                }
                window_start, window_images = clock.now(), 0
            eval_metrics = None
            if done % every_eval == 0 or done == total:
                eval_metrics = evaluate(trainer, state, eval_loader)
                row |= eval_metrics
                result = {"step": done, **eval_metrics}
            if row:
                bar.clear()
                log.row(done, row)
            if done % config.checkpoint.every_steps == 0 or done == total:
                metrics_for_best = (
                    {"accuracy": eval_metrics["eval_top1"]} if eval_metrics else None
                )
                meta = {
                    "step": done,
                    "epoch": done / train_loader.steps_per_epoch,
                    # Wall time of the whole training so far, over every resume.
                    "wall_seconds": run.seconds_before + clock.now() - run_start,
                    # Where the latest stretch of the run trained.
                    "hardware": hardware.describe(),
                }
                save(manager, done, trainer.host_state(state), meta, metrics_for_best)
            if eval_metrics is not None or done % config.checkpoint.every_steps == 0:
                # Throughput counts training steps only, not evaluation or saving.
                window_start, window_images = clock.now(), 0
    bar.close()
    if start >= total:  # resumed a finished run: report its final metrics again
        log.info(f"the run finished at step {total}; evaluating it")
        result = {"step": total, **evaluate(trainer, state, eval_loader)}
    return result
