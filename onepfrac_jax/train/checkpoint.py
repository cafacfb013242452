"""Orbax checkpoints of the train state and the run's evaluation history, one folder per step under DIR/checkpoints.

Saves are asynchronous and atomic (Orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it). Restoring falls back:
a checkpoint that cannot be read is moved to DIR/damaged-checkpoints/<step> (kept, not deleted) with a one-line
warning, and the one before it is tried. A write that fails (disk full) is one RunError and leaves no temporary folder.
"""

from __future__ import annotations

import contextlib
import functools
import logging as logging_std
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from onepfrac_jax.config import ConfigError, RunError, first_few, require

T = TypeVar("T")

DAMAGED = "damaged-checkpoints"
_TMP_GLOB = "*.orbax-checkpoint-tmp*"


def _shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """Leaf path → (shape, dtype) of a state or of Orbax's metadata of one (the two name their keys alike)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {jax.tree_util.keystr(path, simple=True, separator="/"): (tuple(x.shape), str(np.dtype(x.dtype)))
            for path, x in leaves}


def describe_mismatch(saved: dict, wanted: dict) -> str | None:
    """One line naming how two `_shapes` maps differ (first few differences and a count), or None."""
    diffs = [f"{k} missing here" for k in saved.keys() - wanted.keys()]
    diffs += [f"{k} missing in the checkpoint" for k in wanted.keys() - saved.keys()]
    diffs += [f"{k} is {saved[k][0]} {saved[k][1]} there, {wanted[k][0]} {wanted[k][1]} here"
              for k in saved.keys() & wanted.keys() if saved[k] != wanted[k]]
    if not diffs:
        return None
    diffs.sort(key=lambda d: (not d.startswith("params/"), d))  # the model's own arrays say most
    return first_few(diffs, "; ")


class _Manager(ocp.CheckpointManager):
    """Orbax's manager, except that it leaves JAX's preemption sync point to the training loop (loop._Stop).

    JAX's sync manager keeps the last counter passed to `reached_sync_point` and, on a preemption notice, agrees on
    the largest one every process reported, plus one. Orbax's own manager passes the checkpoint's step, from the
    thread that finalises an asynchronous save too, i.e. after the loop has already passed later steps: that call
    moves the reported counter back, the agreed step can then lie behind the loop on one process, and a SIGTERM
    while a checkpoint is finalised left one process stopped at the agreed step (in the collective save) and the
    other training on. With one caller the counter only grows. Orbax only logs and counts what this returns."""

    def reached_preemption(self, step: int) -> bool:
        return False


class Checkpoints:
    """The run's checkpoint folder: asynchronous saves, a restore that falls back past damaged checkpoints."""

    def __init__(self, directory: Path, keep: int):
        self.directory = directory
        self._keep = keep
        self._failed = False
        _quiet_abandoned_io()  # a failed background write prints before the loop can know of it
        _split_only_large_arrays()
        self.manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        return _Manager(
            self.directory.resolve(), options=ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=True),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()})

    def save(self, step: int, state: Any, data: dict) -> None:
        """Starts an asynchronous save of `state` and the JSON-able `data` at `step`; RunError if writing fails."""
        self._guard(lambda: self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data))),
            f"a checkpoint write failed (by step {step})")

    def restore(self, step: int, target: Any) -> tuple[Any, dict]:
        """The state at `step` laid out like `target`, and its data; ConfigError if its arrays do not fit `target`
        (another model), any other exception if the checkpoint cannot be read."""
        metadata = self.manager.item_metadata(step)["state"]
        if metadata is None:
            raise ValueError("its state has no readable metadata")
        mismatch = describe_mismatch(_shapes(getattr(metadata, "tree", metadata)), _shapes(target))
        if mismatch is not None:
            raise ConfigError(f"the checkpoint at step {step} in {self.directory} does not fit this config's "
                              f"model ({mismatch}); use the run's own config, or --config.overwrite=True to start "
                              f"afresh")
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, target)),
            data=ocp.args.JsonRestore()))
        return restored.state, dict(restored.data)

    def restore_latest(self, target: Any) -> tuple[int, Any, dict] | None:
        """(step, state, data) of the newest readable checkpoint, setting damaged ones aside; None when there is
        none at all, ConfigError when every one is damaged."""
        damaged = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return (step, *self.restore(step, target))
            except ConfigError:
                raise
            except Exception as e:  # Orbax and TensorStore raise many types for unreadable or truncated files
                self._set_aside(step, e)
                damaged.append(step)
        if damaged:
            raise ConfigError(f"no usable checkpoint in {self.directory}: steps {', '.join(map(str, damaged))} are "
                              f"damaged (moved to {self.directory.parent / DAMAGED}); --config.overwrite=True "
                              f"starts afresh")
        return None

    def _set_aside(self, step: int, error: Exception) -> None:
        """Moves a damaged checkpoint out of Orbax's sight, keeping it; every process waits for the move."""
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        target = self.directory.parent / DAMAGED / str(step)
        logging.warning("checkpoint at step %d in %s is unreadable (%s); moved to %s, trying the one before",
                        step, self.directory, first_line, target)
        if jax.process_index() == 0:
            target.parent.mkdir(exist_ok=True)
            if target.exists():
                shutil.rmtree(target)
            shutil.move(str(self.directory / str(step)), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"onepfrac:set_aside:{step}")
        self.manager.reload()

    def _guard(self, action: Any, what: str) -> None:
        try:
            action()
        except Exception as e:  # an async write failure resurfaces here as whatever the writer raised
            self._failed = True
            with contextlib.suppress(Exception):  # let writes still in flight end (they fail alike) before cleaning
                self.manager.wait_until_finished()
            self._remove_temporaries()
            raise RunError(f"{what} in {self.directory}: {_reason(e)}; the checkpoints before it are intact") from e

    def _remove_temporaries(self) -> None:
        if jax.process_index() == 0:
            for tmp in self.directory.glob(_TMP_GLOB):
                shutil.rmtree(tmp, ignore_errors=True)

    def wait(self) -> None:
        self._guard(self.manager.wait_until_finished, "a checkpoint write failed")

    def close(self) -> None:
        """Waits for the last save (RunError if it failed) and closes; after a failure, only closes."""
        try:
            if not self._failed:
                self.wait()
        finally:
            with contextlib.suppress(Exception) if self._failed else contextlib.nullcontext():
                self.manager.close()


def _reason(error: BaseException) -> str:
    """The operating system's word for a failed write (TensorStore wraps it as os_error_code), else the first line."""
    for e in (error, error.__cause__, error.__context__):
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
        code = re.search(r"os_error_code='(\d+)'", str(e or ""))
        if code:
            return os.strerror(int(code.group(1)))
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def _is_closed_loop_error(error: BaseException | None) -> bool:
    return isinstance(error, RuntimeError) and "Event loop is closed" in str(error)


# Orbax splits the write of a replicated array among its replicas ("replica-parallel": its default unless
# JAX_PLATFORMS names a GPU). Each split compiles a slice program per array shape at a process's first save: 60
# programs, 2.4 s, for a tiny bootstrap run over 4 CPU devices. Below a MiB per replica, one replica writes it whole.
REPLICA_PARALLEL_MIN_BYTES = 1 << 20


@functools.cache
def _split_only_large_arrays() -> None:
    """Orbax's default jax.Array handler (with its per-host array metadata), with the threshold above, in place of
    its default (quietly: `register_type_handler` would log a warning in every run)."""
    from orbax.checkpoint._src.metadata import array_metadata_store
    from orbax.checkpoint._src.serialization import type_handler_registry

    type_handler_registry.GLOBAL_TYPE_HANDLER_REGISTRY.add(jax.Array, ocp.type_handlers.ArrayHandler(
        array_metadata_store=array_metadata_store.Store(),
        min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES), override=True, ignore_warnings=True)


@functools.cache
def _quiet_abandoned_io() -> None:
    """Once a restore or save has failed, TensorStore's other reads or writes of it end in callbacks to asyncio loops
    that are gone: asyncio logs "Task exception was never retrieved" and Python prints "Event loop is closed"
    tracebacks (through sys.excepthook / sys.unraisablehook) long after the one-line message has said what happened.
    Silence just those, for the rest of the process."""
    import logging as logging_std
    import sys

    logging_std.getLogger("asyncio").setLevel(logging_std.CRITICAL)
    previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook

    def unraisable_hook(unraisable):
        if not _is_closed_loop_error(unraisable.exc_value):
            previous_unraisable(unraisable)

    def except_hook(kind, value, traceback):
        if not _is_closed_loop_error(value):
            previous_except(kind, value, traceback)

    sys.unraisablehook, sys.excepthook = unraisable_hook, except_hook


class _SkipReadOnlyNotice(logging_std.Filter):
    """Orbax warns that a read-only manager's directory is read only: that is the point of one."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        return not record.getMessage().startswith("Given directory is read only")


@functools.cache
def _quiet_read_only_notice() -> None:
    logging.get_absl_logger().addFilter(_SkipReadOnlyNotice())


def _reader(workdir: Path) -> ocp.CheckpointManager:
    """A read-only manager of `workdir`'s checkpoints: it writes, deletes and cleans nothing there and takes no lock,
    so it can read a run that is still training. Orbax lists only finalised steps (a step being written is a
    `*.orbax-checkpoint-tmp*` folder until its atomic rename), so no half-written checkpoint is ever read."""
    _quiet_read_only_notice()
    _quiet_abandoned_io()  # a damaged checkpoint's failed read prints after its one-line error otherwise
    return _listing(lambda: ocp.CheckpointManager(
        (workdir / "checkpoints").resolve(),
        options=ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}))


def _listing(list_steps: Callable[[], T], tries: int = 20) -> T:
    """list_steps() retried while a running run deletes a step between Orbax listing it and reading its time stamp
    (FileNotFoundError): the next listing no longer holds it."""
    for _ in range(tries - 1):
        with contextlib.suppress(FileNotFoundError):
            return list_steps()
        time.sleep(0.05)
    return list_steps()


def _read(manager: ocp.CheckpointManager, step: int) -> tuple[dict, dict]:
    """The state at `step` as NumPy arrays (targets built from its metadata), and its data."""
    metadata = manager.item_metadata(step)["state"]
    if metadata is None:
        raise ValueError("its state has no readable metadata")
    target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), getattr(metadata, "tree", metadata),
                          is_leaf=lambda m: hasattr(m, "shape"))
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                             data=ocp.args.JsonRestore()))
    return restored.state, dict(restored.data or {})


def read_checkpoint(workdir: Path, step: int | None = None, ema: bool = False) -> tuple[int, dict, dict]:
    """(step, variables, data) of the checkpoint at `step` (None: the newest readable one), whatever topology saved it.

    `variables` are the params and the other collections as NumPy arrays ({'params': ..., 'batch_stats': ...});
    `data` is what the run saved beside them (its evaluation `history`). Restoring onto NumPy targets built from the
    checkpoint's metadata does not depend on the devices of the run that saved it (restoring onto its recorded
    shardings fails elsewhere with "Topology mismatch"). Nothing is written into `workdir`: a damaged checkpoint is
    reported, not set aside as a resume does. ConfigError when there is no such checkpoint, naming the kept steps.
    With `ema`, `variables['params']` are the run's moving average of its params (ConfigError if it kept none).
    """
    directory = workdir / "checkpoints"
    manager = _reader(workdir)
    listed = lambda: ", ".join(map(str, sorted(manager.all_steps()))) or "none"
    try:
        while True:
            kept = sorted(manager.all_steps())
            require(bool(kept), f"{workdir} holds no checkpoint yet (nothing in {directory})")
            require(step is None or step in kept,
                    f"{workdir} keeps no checkpoint at step {step}; the kept steps: {listed()}")
            for candidate in [step] if step is not None else reversed(kept):
                try:
                    state, data = _read(manager, candidate)
                except Exception as e:  # Orbax and TensorStore raise many types for unreadable or vanished files
                    if not (directory / str(candidate)).exists():  # a run still training deleted it meanwhile
                        if step is None:
                            break  # it has saved a newer one: list again
                        _listing(manager.reload)
                        raise ConfigError(f"the checkpoint at step {step} in {workdir} was removed while being read "
                                          f"(the run, still training, keeps only its last keep_checkpoints); the "
                                          f"kept steps now: {listed()}") from e
                    if step is not None:
                        raise ConfigError(f"the checkpoint at step {step} in {directory} cannot be read: "
                                          f"{_reason(e)}") from e
                    logging.warning("checkpoint at step %d in %s is unreadable (%s); trying the one before",
                                    candidate, directory, _reason(e))
                    continue
                if ema:
                    require(state.get("ema_params") is not None,
                            f"the run in {workdir} kept no EMA of its weights (its ema_decay was 0)")
                    state = {**state, "params": state["ema_params"]}
                return candidate, {"params": state["params"], **state["extra"]}, data
            else:
                raise ConfigError(f"no readable checkpoint in {directory} (steps {listed()})")
            _listing(manager.reload)
    finally:
        manager.close()


def load_variables(workdir: Path, step: int | None = None, ema: bool = False) -> dict:
    """The params (with `ema`: their moving average) and other collections of the checkpoint at `step` (None: the
    latest) as NumPy arrays."""
    return read_checkpoint(workdir, step, ema)[1]
