"""The one training loop every stage runs: a jitted, data-parallel step over a `data` mesh, Orbax resume.

Every training stage takes the same path from its config to the loop:

    validate the config (cheap) → `with loop.prepare(config, workdir, mesh) as run:` → expensive set-up (bank,
    sources, weights) → `run.train(task)` → Result

`prepare` validates the loop's fields, checks and locks the run directory (rundir.RunDir) and builds the mesh before
any rendering, decoding or weight loading, so a bad workdir fails within seconds whatever the bank size. A stage
describes itself as a `Task` (how to initialise, make a batch on device, compute the loss, evaluate and export);
`Run.train` owns the rest: optimizer, precision, checkpoints, metrics and result.json.

Large arrays the step reads (pre-training's fractal bank) are `Task.resident`: arguments of the jitted step, never
closed over. jit embeds a closed-over array in the program as a constant: lowering and compiling then grow with
its size (and past protobuf's 2 GB limit), and every device holds a second copy.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import struct

from onepfrac_jax.config import (
    INT32_MAX,
    Interrupted,
    require,
    require_choice,
    require_int,
    require_representable,
    require_seed,
    take_ctrl_c,
)
from onepfrac_jax.files import write_errors, write_folder
from onepfrac_jax.models import DTYPES
from onepfrac_jax.parallel.mesh import Mesh, make_data_mesh, replicated
from onepfrac_jax.rundir import Result, RunDir
from onepfrac_jax.train import optim
from onepfrac_jax.train.checkpoint import Checkpoints
from onepfrac_jax.train.metrics import MetricWriter

# float16 dynamic loss scaling: start high, halve on overflow, double after this many finite steps.
_INITIAL_LOSS_SCALE = 2.0**15
_LOSS_SCALE_PERIOD = 2000
# Independent key streams folded from the seed: per-step keys, parameter init; stages use numbers from 2 up.
_STEP_STREAM, _INIT_STREAM = 0, 1


def stream_key(seed: int | jax.Array, stream: int) -> jax.Array:
    """The key of one independent random stream of a run: folded from jax.random.key(seed), or from `seed` itself
    when it is that key already (the jitted step and initialisation get the key as an argument, not the seed as a
    constant, so that runs that differ only in their seed share one compiled program)."""
    return jax.random.fold_in(jax.random.key(seed) if isinstance(seed, int) else seed, stream)


def replicated_key(key: jax.Array, mesh: Mesh) -> jax.Array:
    """`key` on every device of `mesh`, placed from its host data (which every process holds alike: a process can
    place only host data on the devices of the others)."""
    return jax.random.wrap_key_data(jax.device_put(np.asarray(jax.random.key_data(key)), replicated(mesh)))


def step_keys(seed: int | jax.Array, step: jax.Array | int) -> tuple[jax.Array, jax.Array]:
    """(data key, model key) of one training step: make_batch gets the first, the loss the second."""
    data_key, model_key = jax.random.split(jax.random.fold_in(stream_key(seed, _STEP_STREAM), step))
    return data_key, model_key


class NonFiniteLossError(RuntimeError):
    """The loss or the state became NaN or infinite; main.py prints it as one line and exits with code 3."""


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    extra: Any  # non-trainable collections, e.g. {'batch_stats': ...}
    loss_scale: jax.Array  # float16's dynamic loss scale; stays 1 for float32 / bfloat16
    good_steps: jax.Array  # finite steps since the loss scale last changed
    # The exponential moving average of `params` when config.ema_decay > 0 (see `ema_update`), else None: a run
    # without EMA saves the same checkpoint tree as before the field existed.
    ema_params: Any = None


def ema_update(ema: Any, params: Any, decay: float) -> Any:
    """One EMA step, e ← d·e + (1 − d)·p (timm's ModelEmaV2, started from the initial params, no warm-up): after n
    updates e_n = dⁿ·p_0 + (1 − d)·Σ_{k=1..n} d^(n−k)·p_k, p_k the params after update k."""
    return optax.incremental_update(params, ema, 1.0 - decay)


def ema_view(state: TrainState) -> TrainState:
    """The state with its EMA as the params: what evaluation and export see of the averaged model."""
    return state.replace(params=state.ema_params)


@dataclasses.dataclass
class Task:
    """What a stage plugs into the loop (the run's config supplies batch size, steps, seeds and schedules)."""

    # key -> {'params': ..., other collections}; (key, initial) -> ... when `initial` is set
    init_variables: Callable[..., dict]
    # (key, host inputs, step) -> batch, traced in jit; (key, host inputs, step, resident) when `resident` is set
    make_batch: Callable[..., dict]
    loss_fn: Callable[..., tuple[jax.Array, tuple[dict, Any]]]  # (params, extra, batch, key) -> loss, (metrics, extra)
    inputs: Callable[[int], Iterator[Any]]  # first step -> one host-input item per step (None when on-device only)
    evaluate: Callable[[TrainState], dict[str, float]] | None  # full validation pass -> metrics
    export: Callable[[TrainState, Path], dict] | None  # writes workdir/export, returns {name: path}
    steps_per_epoch: float
    metric_names: tuple[str, ...] = ("loss",)  # loss metrics logged (means over the interval)
    eval_names: tuple[str, ...] = ()  # evaluate()'s keys, also CSV columns
    optimizer_labels: Callable[[Any], Any] | None = None  # params -> label tree: one optimizer per label
    # Device arrays make_batch reads every step (a pytree, e.g. the bank), placed with the shardings the stage
    # chose; the step takes them as an argument (not donated), so they are never constants of the program.
    resident: Any = None
    # Host or device arrays init_variables starts from (pre-trained weights): replicated over the mesh and passed
    # to the jitted initialisation as an argument, for the same reason.
    initial: Any = None


def default_train_config(config: ml_collections.ConfigDict) -> None:
    """Adds the loop's fields to a stage config."""
    config.seed = 0  # every random draw of training (init, data order, augmentation, dropout) derives from it
    config.batch_size = 256  # global batch over all devices and processes
    config.total_steps = -1  # -1: derive from num_epochs
    config.num_epochs = 1.0
    config.dtype = "float32"  # computation dtype: float32 | bfloat16 | float16 (dynamic loss scaling); params f32
    # k > 1: each step's gradient is the mean of k micro-batches' (every device's rows split k ways), then one
    # update: the same batch_size, steps and schedule, 1/k of the activations (see `accumulated_gradient`)
    config.accum_steps = 1
    # > 0: keep an exponential moving average of the params (e ← d·e + (1 − d)·p every step, from the initial
    # params), checkpointed, evaluated beside them (`<metric>_ema`) and exported to export/ema/; 0: off
    config.ema_decay = 0.0
    config.optim = optim.default_optim_config()
    config.log_every_steps = 50
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3
    config.eval_every_steps = 0  # 0: once per epoch where the stage evaluates
    # "A,B": a jax.profiler trace of steps A..B (1-based, as logged) in workdir/profile/ (TensorBoard's profile
    # plugin, or Perfetto for its trace.json.gz), written by process 0; "": off
    config.profile_steps = ""
    config.resume = False  # continue the run in workdir even though its config differs
    config.overwrite = False  # delete the run workdir holds (only a run of this project) and start afresh


def validate_train_fields(config: ml_collections.ConfigDict) -> None:
    """The loop's fields, without devices: each training stage's validate() checks them before anything starts."""
    require_seed("seed", config.seed)
    require(config.batch_size > 0, f"batch_size={config.batch_size} must be > 0")
    accum = config.get("accum_steps", 1)
    require(isinstance(accum, int) and accum >= 1, f"accum_steps={accum!r} must be an integer ≥ 1")
    require_choice("dtype", config.dtype, tuple(DTYPES))
    require(config.total_steps == -1 or config.total_steps > 0, f"total_steps={config.total_steps} must be > 0")
    require(config.num_epochs > 0, f"num_epochs={config.num_epochs} must be > 0")
    require(config.log_every_steps > 0, f"log_every_steps={config.log_every_steps} must be > 0")
    require(config.checkpoint_every_steps > 0, f"checkpoint_every_steps={config.checkpoint_every_steps} must be > 0")
    require(config.keep_checkpoints > 0, f"keep_checkpoints={config.keep_checkpoints} must be > 0")
    require(config.eval_every_steps >= 0, f"eval_every_steps={config.eval_every_steps} must be ≥ 0")
    lowest = {"batch_size": 1, "accum_steps": 1, "total_steps": -1, "log_every_steps": 1,
              "checkpoint_every_steps": 1, "keep_checkpoints": 1, "eval_every_steps": 0}
    for name, low in lowest.items():
        require_int(name, config.get(name, 1), low, INT32_MAX, " (an int32 step or row counts it)")
    require(0 <= config.ema_decay < 1, f"ema_decay={config.ema_decay} must lie in [0, 1) (0: no EMA)")
    profile_steps(config)
    optim.validate(config.optim)
    require_representable(config)


def validate_train_config(config: ml_collections.ConfigDict, devices: int | None = None) -> None:
    """validate_train_fields, and `devices` (default: all of every process) must divide the batch."""
    validate_train_fields(config)
    devices = jax.device_count() if devices is None else devices
    require(config.batch_size % devices == 0,
            f"batch_size={config.batch_size} is not divisible by the {devices} devices of all processes")
    accum = config.get("accum_steps", 1)
    require(config.batch_size % (devices * accum) == 0,
            f"batch_size={config.batch_size} does not split into accum_steps={accum} micro-batches over the "
            f"{devices} devices (it must divide by devices × accum_steps = {devices * accum})")


def profile_steps(config: ml_collections.ConfigDict) -> tuple[int, int] | None:
    """config.profile_steps "A,B" as (A, B) with 1 ≤ A ≤ B; None when it is empty (profiling off)."""
    text = str(config.get("profile_steps", "")).strip()
    if not text:
        return None
    parts = text.split(",")
    require(len(parts) == 2 and all(p.strip().isdigit() for p in parts),
            f"profile_steps={text!r} must be two step numbers 'A,B' (trace steps A..B), or '' for none")
    first, last = (int(p) for p in parts)
    require(1 <= first <= last, f"profile_steps={text!r}: need 1 ≤ A ≤ B (steps count from 1, as logged)")
    return first, last


def total_steps(config: ml_collections.ConfigDict, steps_per_epoch: float) -> int:
    if config.total_steps > 0:
        return config.total_steps
    steps = max(1, math.ceil(config.num_epochs * steps_per_epoch))
    require(steps <= INT32_MAX, f"num_epochs={config.num_epochs} makes {steps:,} steps, past the {INT32_MAX:,} "
                                f"an int32 step counter holds; lower num_epochs or set total_steps")
    return steps


def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _build_optimizer(task: Task, config: ml_collections.ConfigDict,
                     total: int) -> tuple[optax.GradientTransformation, Any]:
    lr = optim.schedule(config.optim, total, task.steps_per_epoch, config.batch_size)
    tx = optim.make_optimizer(config.optim, lr)
    if task.optimizer_labels is not None:
        # Separate optimizer states per model (Bootstrapping's joint mode): same settings, own moments.
        tx = optax.multi_transform({"vit": tx, "agent": tx}, task.optimizer_labels)
    return tx, lr


def micro_batches(batch: Any, batch_size: int, k: int) -> Any:
    """The batch's leaves of `batch_size` rows as (k, batch_size / k, ...): micro-batch i holds rows i, i + k, i + 2k
    …, so each takes the same share of every device's contiguous rows (no rows change devices). Other leaves (e.g.
    scalars) are repeated for every micro-batch."""

    def split(x):
        if x.ndim and x.shape[0] == batch_size:
            return jnp.swapaxes(x.reshape(batch_size // k, k, *x.shape[1:]), 0, 1)
        return jnp.broadcast_to(x, (k, *x.shape))

    return jax.tree.map(split, batch)


def accumulated_gradient(task: Task, state: TrainState, batch: Any, model_key: jax.Array, batch_size: int,
                         k: int) -> tuple[Any, tuple[jax.Array, dict, Any]]:
    """(scaled grads, (loss, metrics, extra)) of the batch: with k == 1 one backward pass over it; with k > 1 the
    mean over k micro-batches (`micro_batches`, scanned: one micro-batch's activations live at a time; micro-batch i
    draws its dropout from fold_in(model_key, i)), the other collections (BatchNorm statistics) threaded through
    them in order, metrics averaged. For a loss that is a mean over examples this is the full batch's gradient."""

    def grads_of(params, extra, part, key):
        def scaled(p):
            loss, (metrics, new_extra) = task.loss_fn(p, extra, part, key)
            return loss * state.loss_scale, (loss, metrics, new_extra)

        return jax.grad(scaled, has_aux=True)(params)

    if k == 1:
        return grads_of(state.params, state.extra, batch, model_key)

    def body(carry, xs):
        total, extra = carry
        i, part = xs
        grads, (loss, metrics, extra) = grads_of(state.params, extra, part, jax.random.fold_in(model_key, i))
        return (jax.tree.map(jnp.add, total, grads), extra), (loss, metrics)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (total, extra), (losses, metrics) = jax.lax.scan(body, (zeros, state.extra),
                                                     (jnp.arange(k), micro_batches(batch, batch_size, k)))
    mean = lambda tree: jax.tree.map(lambda x: jnp.mean(x, axis=0), tree)
    return jax.tree.map(lambda g: g / k, total), (jnp.mean(losses), mean(metrics), extra)


def _make_train_step(task: Task, tx: optax.GradientTransformation, lr: optax.Schedule, dynamic_scaling: bool,
                     ema_decay: float = 0.0, batch_size: int = 0, accum_steps: int = 1) -> Callable:
    def train_step(state: TrainState, inputs: Any, resident: Any, root: jax.Array) -> tuple[TrainState, dict]:
        data_key, model_key = step_keys(root, state.step)
        if task.resident is None:
            batch = task.make_batch(data_key, inputs, state.step)
        else:
            batch = task.make_batch(data_key, inputs, state.step, resident)
        grads, (loss, metrics, extra) = accumulated_gradient(task, state, batch, model_key, batch_size, accum_steps)
        grads = jax.tree.map(lambda g: g / state.loss_scale, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, extra=extra)
        if ema_decay > 0:
            new = new.replace(ema_params=ema_update(state.ema_params, params, ema_decay))
        if dynamic_scaling:
            finite = _all_finite(grads)
            keep = lambda a, b: jax.tree.map(lambda x, y: jnp.where(finite, x, y), a, b)
            grow = finite & (state.good_steps + 1 >= _LOSS_SCALE_PERIOD)
            new = new.replace(
                params=keep(new.params, state.params),
                opt_state=keep(new.opt_state, state.opt_state),
                extra=keep(new.extra, state.extra),
                ema_params=keep(new.ema_params, state.ema_params),  # a skipped step moves no average either
                loss_scale=jnp.where(finite, jnp.where(grow, state.loss_scale * 2, state.loss_scale),
                                     jnp.maximum(state.loss_scale / 2, 1.0)),
                good_steps=jnp.where(finite & ~grow, state.good_steps + 1, 0),
            )
            metrics = {**metrics, "loss_scale": state.loss_scale}
        # A finite loss can still give a non-finite update: only a state checked here is ever saved.
        finite_state = _all_finite((new.params, new.opt_state, new.extra, new.ema_params))
        return new, {**metrics, "loss": loss, "lr": lr(state.step), "finite_state": finite_state}

    return train_step


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """The jitted update step with its run's root key, jax.random.key(seed), bound: `step(state, inputs, resident)`
    runs it and `step.lower(...)` lowers it. The key is an argument of the program, not a constant in it, so runs
    that differ only in their seed (a grid's seeds) share one compiled step."""

    jitted: Any  # (state, inputs, resident, root key) -> (state, metrics)
    root: jax.Array

    def __call__(self, state: TrainState, inputs: Any, resident: Any = None) -> tuple[TrainState, dict]:
        return self.jitted(state, inputs, resident, self.root)

    def lower(self, state: Any, inputs: Any, resident: Any = None) -> Any:
        return self.jitted.lower(state, inputs, resident, self.root)


def jit_train_step(task: Task, config: ml_collections.ConfigDict, mesh: Mesh,
                   total: int) -> tuple[TrainStep, optax.GradientTransformation]:
    """The jitted update step `Run.train` runs, `step_fn(state, host inputs, task.resident)`, and its optimizer.

    Public so that benchmarks and tests can lower and compile exactly the program training runs.
    """
    tx, lr = _build_optimizer(task, config, total)
    jitted = jax.jit(
        _make_train_step(task, tx, lr, config.dtype == "float16", config.ema_decay, config.batch_size,
                         config.get("accum_steps", 1)),
        out_shardings=(replicated(mesh), replicated(mesh)),
        donate_argnums=0,
    )
    return TrainStep(jitted, replicated_key(jax.random.key(config.seed), mesh)), tx


def _make_init(task: Task, tx: optax.GradientTransformation,
               ema: bool = False) -> Callable[[Any, jax.Array], TrainState]:
    """(initial, root key) -> the initial state (`task.initial`'s arrays, or None; the key jax.random.key(seed));
    with `ema`, its EMA starts at the params."""

    def init(initial: Any, root: jax.Array) -> TrainState:
        key = stream_key(root, _INIT_STREAM)
        variables = task.init_variables(key) if task.initial is None else task.init_variables(key, initial)
        params = variables["params"]
        extra = {k: v for k, v in variables.items() if k != "params"}
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), extra=extra,
                          loss_scale=jnp.ones((), jnp.float32), good_steps=jnp.zeros((), jnp.int32),
                          ema_params=jax.tree.map(jnp.copy, params) if ema else None)

    return init


def init_state(task: Task, tx: optax.GradientTransformation, seed: int, mesh: Mesh, ema: bool = False) -> TrainState:
    """Initial state, replicated over the mesh; with `ema`, an EMA of the params beside them."""
    initial = None if task.initial is None else jax.device_put(task.initial, replicated(mesh))
    root = replicated_key(jax.random.key(seed), mesh)
    return jax.jit(_make_init(task, tx, ema), out_shardings=replicated(mesh))(initial, root)


def abstract_state(task: Task, tx: optax.GradientTransformation, mesh: Mesh, ema: bool = False) -> TrainState:
    """init_state's shapes, dtypes and (replicated) shardings, from tracing alone: what a resume restores into,
    without compiling or running the initialisation."""
    shapes = jax.eval_shape(_make_init(task, tx, ema), task.initial, jax.random.key(0))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated(mesh)), shapes)


def _preemption_sync_manager() -> Any:
    """JAX's preemption service of this multi-process run, or None (single process, or the service is off)."""
    from jax._src import distributed as jax_distributed  # no public accessor; absent in other versions: None

    state = getattr(jax_distributed, "global_state", None)
    return getattr(state, "preemption_sync_manager", None) if jax.process_count() > 1 else None


# Calls of `_Stop.agreed` over the process's lifetime: the counter JAX's preemption sync point is agreed on. It
# only grows (a second train() in one process goes on from it), as the protocol needs, and every process makes the
# same calls in the same order. It is the only caller: the checkpoint manager leaves the sync point alone
# (checkpoint._Manager).
_sync_calls = 0


class _Stop:
    """SIGTERM or Ctrl-C asks the loop to checkpoint and leave at a step boundary that every process agrees on.

    A checkpoint save is collective, so all processes must stop at the same step even when only some of them got
    the signal. One process: a Python handler sets a flag. Several (after jax.distributed.initialize): JAX's
    preemption service has installed its own SIGTERM handler in C++, which tells the coordination service; all
    processes then reach the same sync point (`reached_preemption_sync_point`, a cheap local check each step). Our
    handler is not installed there, as it would replace JAX's. Several processes without that service
    (jax_enable_preemption_service=False): our handler, and each step an all-gather of the flags.

    Ctrl-C stops the same way (where JAX's service owns SIGTERM, our SIGINT handler passes it on as a SIGTERM to this
    process); `interrupted` tells it apart, for exit code 130. A second Ctrl-C ends the process at once (the default
    action): Orbax writes a checkpoint under a temporary name and renames it, so the ones before it stay usable.
    """

    def __init__(self):
        self.requested = False
        self.interrupted = False  # by Ctrl-C on this process
        self._sync = _preemption_sync_manager()
        self._received = False
        self.previous = None
        if self._sync is None:
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        self.previous_interrupt = signal.signal(signal.SIGINT, self._interrupt)
        if take_ctrl_c():  # one whose KeyboardInterrupt was lost before the loop began (config.on_ctrl_c)
            self._interrupt(signal.SIGINT, None)

    def _handle(self, signum, frame):
        self._received = True

    def _interrupt(self, signum, frame):
        self.interrupted = True
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if self._sync is None:
            self._received = True
        else:
            os.kill(os.getpid(), signal.SIGTERM)  # JAX's handler tells every process

    def agreed(self) -> bool:
        """Whether to stop now; the same answer on every process. Call once per step on every process."""
        global _sync_calls
        if self._sync is not None:
            _sync_calls += 1
            self.requested = self._sync.reached_sync_point(_sync_calls)
        elif jax.process_count() > 1:
            from jax.experimental import multihost_utils

            self.requested = bool(np.any(multihost_utils.process_allgather(np.array(self._received))))
        else:
            self.requested = self._received
        return self.requested

    def restore(self):
        # After a stop the process is on its way out: a later SIGTERM (a launcher signals each process in turn)
        # must not kill it while its peers still wait for it at JAX's shutdown barrier, so ours stays; a Ctrl-C then
        # (or a second one) exits at once.
        if self.previous is not None and not self.requested:
            signal.signal(signal.SIGTERM, self.previous)
        leaving = self.requested or self.interrupted
        signal.signal(signal.SIGINT, signal.SIG_DFL if leaving else self.previous_interrupt)


def write_export(out: Path, export: Callable[[Path], dict], export_ema: Callable[[Path], dict] | None,
                 intact: str) -> dict[str, str]:
    """`out` (a run's or the export stage's export/) written whole or not at all (files.write_folder): `export`'s
    files, and `export_ema`'s in out/ema/ for the averaged weights (named ema_<name>); an OSError is one RunError
    line ending in `intact`. Returns {name: path}."""

    def fill(folder: Path) -> dict[str, Path]:
        exported = export(folder)
        if export_ema is not None:
            exported.update({f"ema_{name}": file for name, file in export_ema(folder / "ema").items()})
        return exported

    with write_errors(intact):
        return {name: str(file) for name, file in write_folder(out, fill).items()}


def prepare(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh | None = None) -> Run:
    """The loop's checks, the locked run directory and the mesh: the first thing a training stage does."""
    mesh = make_data_mesh() if mesh is None else mesh
    validate_train_config(config, mesh.devices.size)
    return Run(config, RunDir.open(config, workdir), mesh)


class Run:
    """A prepared run: `train(task)` runs or resumes it; as a context manager it releases the workdir at the end."""

    def __init__(self, config: ml_collections.ConfigDict, rundir: RunDir, mesh: Mesh):
        self.config = config
        self.rundir = rundir
        self.path = rundir.path
        self.mesh = mesh
        logging.info("mesh: %d devices over %d processes, global batch %d; run directory %s%s", mesh.devices.size,
                     jax.process_count(), config.batch_size, self.path, " (resuming)" if rundir.resuming else "")

    def __enter__(self) -> Run:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.rundir.__exit__(kind, value, traceback)

    def _restore(self, checkpoints: Checkpoints, target: TrainState,
                 fresh: Callable[[], TrainState]) -> tuple[int, TrainState, list[dict]]:
        """(start step, state, evaluation history) of the newest usable checkpoint restored into `target`'s layout,
        or step 0 of `fresh()`."""
        found = checkpoints.restore_latest(target)
        if found is None:
            return 0, fresh(), []
        step, state, data = found
        logging.info("resumed from %s at step %d", checkpoints.directory, step)
        return step, state, list(data.get("history", []))

    def train(self, task: Task) -> Result:
        """Runs (or resumes) the task to its last step; writes result.json and returns the Result."""
        config, path, mesh = self.config, self.path, self.mesh
        main_process = jax.process_index() == 0
        total = total_steps(config, task.steps_per_epoch)

        # ---- model, optimizer, state, the update step ----------------------------------------------------------
        step_fn, tx = jit_train_step(task, config, mesh, total)
        ema = config.ema_decay > 0

        def fresh() -> TrainState:
            state = init_state(task, tx, config.seed, mesh, ema)
            if config.dtype == "float16":
                state = state.replace(loss_scale=jnp.full((), _INITIAL_LOSS_SCALE, jnp.float32))
            return state

        # A resume restores into the state's layout: the initialisation is compiled and run only without a checkpoint.
        state = abstract_state(task, tx, mesh, ema) if self.rundir.resuming else fresh()
        # An average of the weights beside the live BatchNorm statistics (the bootstrap agent's) would be a model
        # nobody trained: the EMA serves models whose only variables are their params.
        require(not (ema and jax.tree.leaves(state.extra)),
                f"ema_decay={config.ema_decay}: this stage's model keeps {', '.join(state.extra)} beside its params, "
                f"which the EMA does not average; set ema_decay=0 (pretrain and finetune have the EMA)")
        logging.info("%s parameters", f"{sum(x.size for x in jax.tree.leaves(state.params)):,}")

        # ---- checkpoints: resume where a previous process left off; only then is config.json (re)written ------
        if not self.rundir.resuming:
            self.rundir.begin()  # an overwrite clears the old run here, before Orbax creates checkpoints/
        checkpoints = Checkpoints(path / "checkpoints", config.keep_checkpoints)
        start, state, history = self._restore(checkpoints, state, fresh) if self.rundir.resuming else (0, state, [])
        require(start <= total, f"the run in {path} is at step {start}, past total_steps={total}")
        self.rundir.begin()  # a resume commits only once its checkpoint is restored (begin() runs once)

        # input_wait: the fraction of the interval spent waiting for the host pipeline
        eval_names = (*task.eval_names, *(f"{name}_ema" for name in task.eval_names if ema))
        writer = MetricWriter(path, [*task.metric_names, "lr", "images_per_s", "input_wait", *eval_names],
                              total, enabled=main_process, resume=self.rundir.resuming)
        writer.truncate_after(start)
        eval_every = config.eval_every_steps or max(1, round(task.steps_per_epoch))

        # ---- the loop ----------------------------------------------------------------------------------------------
        stop, stopped = _Stop(), False
        pending: list[tuple[int, dict]] = []  # the steps' metrics, still on the device
        interval: list[dict] = []  # fetched and checked, not yet logged
        last_saved = start if start > 0 else None
        tick, wait, interval_start = time.perf_counter(), 0.0, start
        done = start

        def check() -> None:
            """Fetches the metrics of the steps not yet fetched; stops on a non-finite loss or state."""
            nonlocal pending
            fetched = [(s, jax.device_get(m)) for s, m in pending]
            pending = []
            for s, m in fetched:
                where = (f"last good checkpoint at step {last_saved}" if last_saved is not None
                         else "no checkpoint yet") + f" in {path / 'checkpoints'}"
                # Under float16 scaling an overflow only skips that step and halves the scale; it is fatal once the
                # scale has bottomed out at 1.
                if not np.isfinite(m["loss"]) and m.get("loss_scale", 1.0) <= 1.0:
                    raise NonFiniteLossError(f"loss is {m['loss']} at step {s}; {where}")
                if not m["finite_state"]:
                    raise NonFiniteLossError(f"the update of step {s} made the parameters or optimizer state "
                                             f"non-finite (loss {m['loss']:.4g}); {where}")
                interval.append(m)

        def interval_means() -> dict[str, float]:
            check()
            means = {k: float(np.mean([m[k] for m in interval])) for k in interval[-1] if k != "finite_state"}
            interval.clear()
            return means

        def save(step: int) -> None:
            nonlocal last_saved
            check()  # a state is saved only once it is known finite
            checkpoints.save(step, state, {"history": history})
            last_saved = step

        profile = profile_steps(config) if main_process else None
        tracing = False

        def stop_trace() -> None:
            nonlocal tracing
            jax.block_until_ready(state)  # the traced steps' device work belongs in the trace
            jax.profiler.stop_trace()
            tracing = False
            logging.info("profile of steps %d..%d written to %s", *profile, path / "profile")

        inputs = task.inputs(start)
        try:
            for step in range(start, total):
                if profile is not None and step + 1 == profile[0]:
                    jax.profiler.start_trace(str(path / "profile"))
                    tracing = True
                t0 = time.perf_counter()
                item = next(inputs)
                wait += time.perf_counter() - t0
                state, metrics = step_fn(state, item, task.resident)
                pending.append((step + 1, metrics))
                done = step + 1
                if tracing and done == profile[1]:
                    stop_trace()
                row: dict[str, float] = {}
                if done % config.log_every_steps == 0 or done == total:
                    row = interval_means()
                    elapsed = time.perf_counter() - tick
                    row["images_per_s"] = (done - interval_start) * config.batch_size / elapsed
                    row["input_wait"] = wait / elapsed
                    tick, wait, interval_start = time.perf_counter(), 0.0, done
                if task.evaluate is not None and (done % eval_every == 0 or done == total):
                    check()
                    scores = task.evaluate(state)
                    if ema:
                        scores.update({f"{k}_ema": v for k, v in task.evaluate(ema_view(state)).items()})
                    history.append({"step": done, **scores})
                    row.update(scores)
                if row:
                    writer.write(done, row)
                    writer.progress(done, {k: v for k, v in row.items() if k in (*task.metric_names, "lr",
                                                                                    "images_per_s", *eval_names)})
                if done % config.checkpoint_every_steps == 0 or done == total:
                    save(done)
                # Every process asks every step (the answer is collective); at the last step the run is complete.
                if stop.agreed() and done < total:
                    if last_saved != done:  # not saved just above as a regular checkpoint
                        save(done)
                    checkpoints.wait()
                    if not stop.interrupted:  # Ctrl-C's line is the Interrupted below
                        logging.info("SIGTERM: saved a checkpoint at step %d in %s; exiting", done,
                                     path / "checkpoints")
                    stopped = True
                    break
        finally:
            if tracing:  # the run ended (or failed) inside the traced steps
                stop_trace()
            stop.restore()
            try:
                checkpoints.close()
            finally:
                writer.close()

        files = {}
        if not stopped and task.export is not None and main_process:
            files = write_export(path / "export", functools.partial(task.export, state),
                                 functools.partial(task.export, ema_view(state)) if ema else None,
                                 "no export was written; the checkpoints are intact: the same command, run again "
                                 "once there is room, resumes at the last step and exports")
        result = Result(stage=config.stage, step=done, total_steps=total, stopped=stopped, history=history,
                        files=files, state=state)
        result.write(path)
        if stopped and stop.interrupted:
            raise Interrupted(f"interrupted (Ctrl-C) at step {done} of {total}: a checkpoint is saved in "
                              f"{path / 'checkpoints'}; run the same command again to resume")
        return result
