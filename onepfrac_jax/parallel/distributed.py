"""Multi-process start-up: `jax.distributed` from flags, the environment, or a SLURM / OpenMPI launch.

Call `initialize()` once, first thing in `main()`, before anything touches JAX. Every flag can also be set through
the environment as ONEPFRAC_<FLAG NAME IN CAPITALS> (e.g. ONEPFRAC_COORDINATOR_ADDRESS); a flag on the command line
wins over the environment. What is set decides the mode:

- `--num_processes` and `--process_id` (with `--coordinator_address`): explicit, for any scheduler;
- neither, under `srun` (SLURM_NTASKS > 1) or `mpirun` (OMPI_COMM_WORLD_SIZE > 1): counts and ids from the
  launcher; the coordinator address from `--coordinator_address`, else JAX's own detection (first SLURM node, or
  the OpenMPI 4 launcher's host; Open MPI 5 needs the flag). As in JAX, each process then drives the one GPU
  numbered by its local rank unless `--local_device_ids` lists more (one process per node);
- nothing: a plain single process.

A process whose peers have not all joined within --distributed_timeout seconds ends with one `error:` line (exit 2).
When a process dies, the others stop within --heartbeat_timeout seconds; an uncaught exception ends its process at
once (`exit_now`), so that its peers see it gone instead of waiting for it at JAX's shutdown barrier.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import NoReturn

import jax
from absl import flags, logging

from onepfrac_jax.config import ConfigError

_ENV_PREFIX = "ONEPFRAC_"
_EXIT_GRACE = 5.0  # seconds a failing process waits for its peers at the shutdown barrier (see fail)

_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0, where JAX's coordination service listens. "
    "Env: ONEPFRAC_COORDINATOR_ADDRESS.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes in the run (give with --process_id). Env: ONEPFRAC_NUM_PROCESSES.")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's id in [0, num_processes). Env: ONEPFRAC_PROCESS_ID.")
_LOCAL_DEVICE_IDS = flags.DEFINE_string(
    "local_device_ids", None, "Comma-separated GPUs this process drives (default: all; under SLURM/OpenMPI: the "
    "one numbered by the local rank). Multi-process runs only: a single process uses CUDA_VISIBLE_DEVICES. "
    "Env: ONEPFRAC_LOCAL_DEVICE_IDS.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", None, "CPU devices per process (jax_num_cpu_devices): multi-device logic without accelerators. "
    "Env: ONEPFRAC_CPU_DEVICES.")
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout", 300, "Seconds to wait at start-up for the coordinator and for every process to join. "
    "Env: ONEPFRAC_DISTRIBUTED_TIMEOUT.")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout", 30, "Seconds without a heartbeat after which a process counts as dead and all others "
    "stop. Env: ONEPFRAC_HEARTBEAT_TIMEOUT.")

_FLAGS = (_COORDINATOR_ADDRESS, _NUM_PROCESSES, _PROCESS_ID, _LOCAL_DEVICE_IDS, _CPU_DEVICES, _DISTRIBUTED_TIMEOUT,
          _HEARTBEAT_TIMEOUT)


@dataclasses.dataclass(frozen=True)
class Settings:
    """How this process joins the run, resolved from flags, environment and launcher."""

    mode: str  # "single", "explicit", "slurm" or "ompi"
    coordinator_address: str | None  # None: JAX derives it from the launcher's environment
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...] | None  # None: every local device
    cpu_devices: int | None
    timeout: int
    heartbeat_timeout: int


def _env_name(flag: str) -> str:
    return _ENV_PREFIX + flag.upper()


def _raw_settings(environ: Mapping[str, str]) -> dict[str, object]:
    """Each flag's value: from the command line if given there, else from the environment, else its default."""
    values: dict[str, object] = {}
    for holder in _FLAGS:
        flag = flags.FLAGS[holder.name]  # the Flag object: readable before (or without) parsing the command line
        raw = environ.get(_env_name(flag.name), "")
        if flag.present or not raw:
            values[flag.name] = flag.value
            continue
        try:
            values[flag.name] = flag.parser.parse(raw)
        except ValueError as e:
            raise ConfigError(f"{_env_name(flag.name)}={raw!r}: {e}") from None
    return values


def _device_ids(text: str, source: str) -> tuple[int, ...]:
    try:
        ids = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"{source}={text!r} is not a comma-separated list of device numbers") from None
    if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise ConfigError(f"{source}={text!r} must list distinct device numbers ≥ 0")
    return ids


def _check_address(address: str) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--coordinator_address={address!r} is not HOST:PORT (e.g. node001:29500)")


def _launcher(environ: Mapping[str, str]) -> tuple[str, int, int, int] | None:
    """(mode, processes, this process's id, its local rank) under a multi-process mpirun or srun, else None."""
    # mpirun inside a SLURM allocation sets both: the OpenMPI variables describe the processes actually started.
    if int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return ("ompi", int(environ["OMPI_COMM_WORLD_SIZE"]), int(environ["OMPI_COMM_WORLD_RANK"]),
                int(environ["OMPI_COMM_WORLD_LOCAL_RANK"]))
    # The variables JAX's SLURM detection reads; a batch script run without srun lacks the step's node list.
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(name in environ for name in slurm) and int(environ["SLURM_NTASKS"]) > 1:
        return "slurm", int(environ["SLURM_NTASKS"]), int(environ["SLURM_PROCID"]), int(environ["SLURM_LOCALID"])
    return None


def resolve(environ: Mapping[str, str] | None = None) -> Settings:
    """The settings for this process; ConfigError with one clear line for inconsistent ones."""
    environ = os.environ if environ is None else environ
    raw = _raw_settings(environ)
    coordinator, count, pid = raw["coordinator_address"], raw["num_processes"], raw["process_id"]
    ids = None if raw["local_device_ids"] is None else _device_ids(raw["local_device_ids"], "--local_device_ids")
    cpu_devices, timeout, heartbeat = raw["cpu_devices"], raw["distributed_timeout"], raw["heartbeat_timeout"]
    if cpu_devices is not None and cpu_devices < 1:
        raise ConfigError(f"--cpu_devices={cpu_devices} must be ≥ 1")
    if timeout < 1 or heartbeat < 1:
        raise ConfigError(f"--distributed_timeout={timeout} and --heartbeat_timeout={heartbeat} must be ≥ 1 second")
    if coordinator is not None:
        _check_address(coordinator)
    common = dict(cpu_devices=cpu_devices, timeout=timeout, heartbeat_timeout=heartbeat)

    if (count is None) != (pid is None):
        raise ConfigError("give both --num_processes and --process_id, or neither "
                          f"(got num_processes={count}, process_id={pid})")
    if count is not None:
        if count < 1:
            raise ConfigError(f"--num_processes={count} must be ≥ 1")
        if not 0 <= pid < count:
            raise ConfigError(f"--process_id={pid} must lie in [0, {count}) for --num_processes={count}")
        if count > 1:
            if coordinator is None:
                raise ConfigError(f"--num_processes={count} needs --coordinator_address=HOST:PORT of process 0")
            return Settings("explicit", coordinator, count, pid, ids, **common)
    elif (launch := _launcher(environ)) is not None:
        mode, count, pid, local_rank = launch
        if coordinator is None and mode == "ompi" and "OMPI_MCA_orte_hnp_uri" not in environ:
            raise ConfigError("mpirun without ORTE (Open MPI 5): JAX cannot find the coordinator by itself; pass "
                              "--coordinator_address=HOST:PORT of rank 0's host (launch/mpirun.sh does)")
        return Settings(mode, coordinator, count, pid, (local_rank,) if ids is None else ids, **common)
    elif coordinator is not None:
        raise ConfigError("--coordinator_address needs --num_processes and --process_id (or an srun/mpirun launch)")

    if ids is not None:
        raise ConfigError("--local_device_ids applies to multi-process runs; a single process uses "
                          "CUDA_VISIBLE_DEVICES")
    return Settings("single", None, 1, 0, None, **common)


def _wait_for_coordinator(address: str, timeout: float) -> None:
    """Returns once `address` accepts TCP connections; ConfigError naming it after `timeout` seconds."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")  # IPv6 literals come bracketed: [::1]:1234
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=min(5.0, timeout)).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ConfigError(f"coordinator {address} unreachable for {timeout:g} s ({e.strerror or e}): is "
                                  f"process 0 running, is the address its host's, and is the port open from "
                                  f"here? (--distributed_timeout sets the wait)") from None
        time.sleep(0.5)


def exit_now(code: int) -> NoReturn:
    """Exits with `code`; a failing process of a multi-process run skips JAX's shutdown barrier.

    At that barrier a process waits up to 300 s (JAX's shutdown timeout) for peers that may be blocked in a
    collective with it and never arrive. A process that is gone is seen by all others within --heartbeat_timeout,
    and they stop too. Python's own clean-up is skipped, so call this after files are closed and saves are done.
    """
    if code == 0 or not jax.distributed.is_initialized():
        sys.exit(code)
    _exit_at_once(code)


def _exit_at_once(code: int) -> NoReturn:
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def fail(message: object, code: int, *, at_once: bool = False) -> NoReturn:
    """Ends the process with `code` after `error: message` on stderr (`at_once`: right away, from any thread).

    In a multi-process run, the processes that fail alike (bad input) within _EXIT_GRACE s of each other leave
    together, through JAX's shutdown barrier: process 0, whose coordination service they all use, leaving first
    would abort the others (SIGABRT) on their way out. A peer that does not come (blocked in a collective) holds
    this process _EXIT_GRACE s there, not JAX's 300; as in exit_now, Python's own clean-up is skipped.
    """
    print(f"error: {message}", file=sys.stderr)
    if at_once:
        _exit_at_once(code)
    if not jax.distributed.is_initialized():
        sys.exit(code)
    threading.Timer(_EXIT_GRACE, _exit_at_once, (code,)).start()
    try:
        jax.distributed.shutdown()
    finally:
        _exit_at_once(code)


@contextlib.contextmanager
def _fail_unless_done_within(seconds: float, message: str) -> Iterator[None]:
    """Ends the process with `error: message` (exit 2) if the block is still running after `seconds`."""
    timer = threading.Timer(seconds, fail, (message, 2), {"at_once": True})
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _exit_now_on_uncaught_exception() -> None:
    """Makes an uncaught exception, after its traceback, end the process through `exit_now(1)`."""
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, traceback: TracebackType | None) -> None:
        previous(kind, value, traceback)
        exit_now(1)

    sys.excepthook = hook


def initialize(environ: Mapping[str, str] | None = None, default_cpu_devices: int | None = None) -> None:
    """Joins the run described by flags / environment / launcher (see the module docstring); logs what it found.

    `default_cpu_devices` is the CPU device count of a single-process run that sets none (`--cpu_devices`).
    """
    settings = resolve(environ)
    cpu_devices = settings.cpu_devices
    if cpu_devices is None and settings.mode == "single":
        cpu_devices = default_cpu_devices
    if cpu_devices is not None:
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    if settings.mode != "single":
        where = settings.coordinator_address or f"the coordinator named by the {settings.mode} environment"
        logging.info("process %d of %d (%s): joining %s, waiting up to %d s for all processes",
                     settings.process_id, settings.num_processes, settings.mode, where, settings.timeout)
        if settings.process_id != 0 and settings.coordinator_address is not None:
            # JAX aborts the process with a bare DEADLINE_EXCEEDED when the coordinator never answers: probing
            # first turns that into an error that names the address.
            _wait_for_coordinator(settings.coordinator_address, settings.timeout)
        # JAX itself aborts the process (SIGABRT and a C++ trace) when not all processes register in time, and does
        # not say how many did. This timer ends it first with one line; JAX's own deadline, twice as far, is a backstop.
        missing = (f"process {settings.process_id} of {settings.num_processes}: not all {settings.num_processes} "
                   f"processes joined {where} within {settings.timeout} s: are they all started, with the same "
                   f"--num_processes and coordinator? (--distributed_timeout sets the wait)")
        try:
            with _fail_unless_done_within(settings.timeout, missing):
                jax.distributed.initialize(
                    coordinator_address=settings.coordinator_address,
                    num_processes=settings.num_processes,
                    process_id=settings.process_id,
                    local_device_ids=list(settings.local_device_ids) if settings.local_device_ids else None,
                    cluster_detection_method="deactivate" if settings.coordinator_address else settings.mode,
                    initialization_timeout=2 * settings.timeout,
                    heartbeat_timeout_seconds=settings.heartbeat_timeout,
                )
        except jax.errors.JaxRuntimeError as e:
            if settings.process_id != 0:
                raise
            # Process 0 starts the coordination service: what fails here is binding its port.
            raise ConfigError(f"process 0 cannot start the coordinator for {where} (port in use?): {e}") from None
        _exit_now_on_uncaught_exception()
    logging.info("process %d of %d: %d local devices (%s), %d devices in all", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.local_devices()[0].platform, jax.device_count())


def is_main_process() -> bool:
    """True on the process that writes files and prints summaries (process 0)."""
    return jax.process_index() == 0
