"""Every test session sees 4 CPU devices, so sharding logic is exercised on a laptop and in CI; and the shared helpers.

Helpers (import them: `from conftest import run_cli`): main.py as a subprocess (`main_argv`, `run_cli`,
`assert_one_error`), N local processes of one multi-process run (`LocalRun`, `run_processes`), and the tiny
settings and files the stage tests train on.
"""

from __future__ import annotations

import csv
import fcntl
import inspect
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

jax.config.update("jax_num_cpu_devices", 4)

# One persistent compilation cache for the session, shared by this process, the other pytest-xdist workers and every
# process a test starts (they inherit the environment), removed when the session ends: the suite compiles the same
# small programs again and again, in fresh processes too, and on CPUs they take well under JAX's default thresholds,
# lowered here to cache all. tests/test_compile_cache.py checks that a program read from the cache computes bitwise
# what a fresh compile does. The session directory also holds the locks of `timed` tests (pytest_runtest_protocol).
_SESSION_VAR = "ONEPFRAC_TEST_SESSION"  # set by the process that started the session; its xdist workers inherit it
_OWNS_SESSION = _SESSION_VAR not in os.environ
SESSION_DIR = Path(os.environ.setdefault(_SESSION_VAR, tempfile.mkdtemp(prefix="onepfrac-test-session-")))
COMPILE_CACHE = {"JAX_COMPILATION_CACHE_DIR": str(SESSION_DIR / "jit-cache"),
                 "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
os.environ.update(COMPILE_CACHE)
# this process imported jax before the lines above: its settings are set directly
jax.config.update("jax_compilation_cache_dir", COMPILE_CACHE["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_unconfigure(config) -> None:
    if _OWNS_SESSION:
        shutil.rmtree(SESSION_DIR, ignore_errors=True)
        os.environ.pop(_SESSION_VAR, None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Under pytest-xdist, a `timed` test (one that asserts a wall-time bound) runs alone: it takes the session's
    lock exclusively, every other test shares it. Waiting writers go first (the `intent` lock), so a timed test is
    not starved by the other workers' stream of tests. Set-up and teardown, session fixtures included, run inside."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        yield
        return
    exclusive = item.get_closest_marker("timed") is not None
    with open(SESSION_DIR / "intent.lock", "a") as intent, open(SESSION_DIR / "run.lock", "a") as run:
        fcntl.flock(intent, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        fcntl.flock(run, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        if not exclusive:
            fcntl.flock(intent, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(run, fcntl.LOCK_UN)
            fcntl.flock(intent, fcntl.LOCK_UN)


TESTS = Path(__file__).resolve().parent
_GROUPS = SESSION_DIR / "xdist-groups.json"


def _shared_work(item: pytest.Item) -> list[str]:
    """What this test shares with others that one process does once: the module- and session-scoped fixtures of
    this suite it uses, and the programs its parametrized function compiles (its other cases read them from the
    cache when they run after it, not beside it on the other worker)."""
    shared = []
    for name in sorted(item.fixturenames):
        defs = item._fixtureinfo.name2fixturedefs.get(name)
        if defs and defs[-1].scope != "function" and Path(inspect.getfile(defs[-1].func)).parent == TESTS:
            shared.append(name)
    if hasattr(item, "callspec"):
        shared.append(f"{item.module.__name__}.{item.originalname}")
    return shared


def _work_units(items: Sequence[pytest.Item]) -> dict[str, str]:
    """node id → its unit of work, for the tests that share work: the tests joined by what they share (directly or
    through another test) are one unit, named by one of its tests."""
    parent: dict[str, str] = {}

    def root(key: str) -> str:
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    sharing = []
    for item in items:
        for shared in _shared_work(item):
            parent[root(shared)] = root(item.nodeid)
            sharing.append(item.nodeid)
    return {nodeid: root(nodeid) for nodeid in sharing}


def pytest_collection_modifyitems(config, items) -> None:
    """Under pytest-xdist (pyproject's addopts: `-n 2`) the slow tests are handed out first, so that the last ones
    left are short and both workers end together; and each worker writes which tests share work (a module or
    session fixture's run, a parametrized function's programs), for pytest_xdist_make_scheduler to send them to
    one worker."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return
    items.sort(key=lambda item: 0 if item.get_closest_marker("multiprocess") else
               1 if item.get_closest_marker("slow") else 2)
    part = _GROUPS.with_name(f"{_GROUPS.name}.{os.getpid()}")  # the workers write the same: each renames its own
    part.write_text(json.dumps(_work_units(items)))
    part.replace(_GROUPS)


def pytest_xdist_make_scheduler(config, log):
    """xdist's `load` scheduling, except that the tests sharing work (`_work_units`) are one unit of work.

    (xdist's own `--dist loadgroup` groups by renaming node ids, which pytest 9.2 no longer reads: pytest-xdist
    issue #1386.) The controller collects nothing; it reads the groups its workers wrote once they have collected.
    """
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedRuns(LoadScopeScheduling):
        def __init__(self, config, log=None):
            super().__init__(config, log)
            self.groups: dict[str, str] = {}

        def schedule(self) -> None:
            if self.collection is None and _GROUPS.exists():
                self.groups = json.loads(_GROUPS.read_text())
            super().schedule()

        def _split_scope(self, nodeid: str) -> str:
            return self.groups.get(nodeid, nodeid)

    return SharedRuns(config, log)


ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64}
# No augmented_batch.png (its batch maker compiles apart from the step): test_pretrain_eval and test_fdsl_datasets
# check the picture.
TINY_PRETRAIN = {"num_classes": 8, "render_size": 32, "num_points": 2000, "image_size": 16, "batch_size": 8,
                 "total_steps": 4, "log_every_steps": 1, "checkpoint_every_steps": 2, "batch_picture": False,
                 **TINY_MODEL}
TINY_PRETRAIN_RUN = {**TINY_PRETRAIN, "keep_checkpoints": 5}  # tiny_pretrain_run's overrides of the demo
# configs/finetune.py:imagefolder on make_image_folder's tree: one epoch is 3 steps of 8, two epochs
TINY_FINETUNE = {"image_size": 16, "batch_size": 8, "total_steps": 6, "log_every_steps": 1, "checkpoint_every_steps": 3,
                 **TINY_MODEL, "data.image_size": 20, "augment.auto_augment": "", "augment.mixup_alpha": 0.0,
                 "augment.cutmix_alpha": 0.0, "augment.re_prob": 0.0}
BOOTSTRAP_DIM, BOOTSTRAP_DEPTH = 48, 2  # tiny_bootstrap_config's ViT and agent
# Every snippet a LocalRun starts begins by joining the run its environment describes.
PRELUDE = "import jax\nfrom onepfrac_jax.parallel import distributed\ndistributed.initialize()\n"
# A fresh process's environment: nothing inherited may make it join some other run, or claim a GPU.
_FOREIGN_ENV = ("ONEPFRAC_", "SLURM_", "OMPI_", "PMI_", "PMIX_", "JAX_COORDINATOR", "JAX_LOCAL_DEVICE_IDS")


def csv_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def make_image_folder(root: Path, classes: int = 3, per_class: int = 8) -> None:
    """An ImageFolder tree (train/ and val/, class_<c>/<i>.png) of 20x24 images whose brightness gives the class."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", per_class // 2)):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.full((20, 24, 3), 60 * c, np.uint8) + rng.integers(0, 30, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN_ENV)}
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **(extra or {}))
    return env


def tiny_bootstrap_config(mode: str, /, **overrides):
    """configs/bootstrap.py's digits demo shrunk to 16² images, width 48, 2 blocks, 30 steps of 32 (checkpoints at
    steps 15 and 30; one evaluation, at the end: an epoch of digits is 45 steps)."""
    from onepfrac_jax.configs import bootstrap as bootstrap_configs

    from onepfrac_jax.config import apply_overrides

    c = bootstrap_configs.get_config(f"digits_demo_{mode}")
    dims = dict(embed_dim=BOOTSTRAP_DIM, depth=BOOTSTRAP_DEPTH, num_heads=6)
    c.update(dict(image_size=16, patch_size=4, mlp_dim=2 * BOOTSTRAP_DIM, batch_size=32, total_steps=30,
                  log_every_steps=6, checkpoint_every_steps=15, **dims))
    c.data.image_size = 16
    c.agent.update(dims)
    return apply_overrides(c, overrides)


# ------------------------------------------------------------------------------------------- shared runs ----
# Runs that several test files read, trained once per session (a test that changes a run copies it first).

def _tiny_pretrain(workdir: Path, overrides: Mapping[str, object], devices: int) -> Path:
    """configs/pretrain.py:demo with `overrides`, trained in this process on its first `devices` devices."""
    from onepfrac_jax.configs import pretrain as pretrain_configs

    from onepfrac_jax.config import apply_overrides
    from onepfrac_jax.parallel.mesh import make_data_mesh
    from onepfrac_jax.stages import pretrain

    pretrain.run(apply_overrides(pretrain_configs.get_config("demo"), overrides), str(workdir),
                 make_data_mesh(jax.devices()[:devices]))
    return workdir


@pytest.fixture(scope="session")
def tiny_pretrain_run(tmp_path_factory) -> Path:
    """A finished configs/pretrain.py:demo run with TINY_PRETRAIN_RUN (checkpoints at steps 2 and 4), one device."""
    return _tiny_pretrain(tmp_path_factory.mktemp("tiny_pretrain") / "run", TINY_PRETRAIN_RUN, 1)


@pytest.fixture(scope="session")
def four_device_pretrain_run(tmp_path_factory) -> Path:
    """The same run as tiny_pretrain_run (TINY_PRETRAIN) on 4 devices of this process."""
    return _tiny_pretrain(tmp_path_factory.mktemp("four_device_pretrain") / "run", TINY_PRETRAIN, 4)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """make_image_folder's tree: 3 classes of 8 training and 4 validation images."""
    root = tmp_path_factory.mktemp("image_folder") / "data"
    make_image_folder(root)
    return root


def tiny_finetune_config(data_dir: Path, **overrides):
    """configs/finetune.py:imagefolder with TINY_FINETUNE on the image folder `data_dir`; `overrides` by field."""
    from onepfrac_jax.configs import finetune as finetune_configs

    from onepfrac_jax.config import apply_overrides

    c = apply_overrides(finetune_configs.get_config("imagefolder"), {**TINY_FINETUNE, "data.data_dir": str(data_dir)})
    c.update(overrides)
    return c


@pytest.fixture(scope="session")
def four_device_finetune_run(tiny_pretrain_run, image_folder, tmp_path_factory) -> Path:
    """tiny_finetune_config on image_folder, from tiny_pretrain_run, on 4 devices of this process."""
    from onepfrac_jax.parallel.mesh import make_data_mesh
    from onepfrac_jax.stages import finetune

    workdir = tmp_path_factory.mktemp("four_device_finetune") / "run"
    finetune.run(tiny_finetune_config(image_folder, init_from=str(tiny_pretrain_run)), str(workdir),
                 make_data_mesh(jax.devices()[:4]))
    return workdir


@pytest.fixture(scope="session")
def pretrain_runs(four_device_pretrain_run, tmp_path_factory) -> dict[str, Path]:
    """configs/pretrain.py:demo with TINY_PRETRAIN (checkpoints at steps 2 and 4) as 1 process of 4 devices ('1x4':
    four_device_pretrain_run) and as 2 processes of 2 devices ('2x2': main.py through LocalRun)."""
    root = tmp_path_factory.mktemp("pretrain_runs")
    (root / "logs_2x2").mkdir()
    run = LocalRun(2, 2, main_argv("configs/pretrain.py:demo", root / "2x2", TINY_PRETRAIN), root / "logs_2x2")
    for i, result in enumerate(run.wait(300)):
        assert result.returncode == 0, f"2x2, process {i} exited with {result.returncode}:\n{run.tail(i)}"
    return {"1x4": four_device_pretrain_run, "2x2": root / "2x2"}


def _bootstrap(mode: str, tmp_path_factory) -> Path:
    from onepfrac_jax.stages import bootstrap

    workdir = tmp_path_factory.mktemp(f"bootstrap_{mode}") / "run"
    bootstrap.run(tiny_bootstrap_config(mode), str(workdir))
    return workdir


@pytest.fixture(scope="session")
def shared_bootstrap_run(tmp_path_factory) -> Path:
    """A finished tiny_bootstrap_config('shared') run on digits, over all devices."""
    return _bootstrap("shared", tmp_path_factory)


@pytest.fixture(scope="session", params=["joint", "shared"])
def bootstrap_run(request, shared_bootstrap_run, tmp_path_factory) -> tuple[str, Path]:
    """(mode, workdir) of a finished tiny_bootstrap_config run on digits, over all devices (the shared one is
    shared_bootstrap_run)."""
    return request.param, shared_bootstrap_run if request.param == "shared" else _bootstrap("joint", tmp_path_factory)


# ------------------------------------------------------------------------------------------------ main.py ----

def main_argv(config: str, workdir: Path | str, overrides: Mapping[str, object] | None = None) -> list[str]:
    """`main.py --config CONFIG --workdir=WORKDIR --config.KEY=VALUE...`, the argv after `python`."""
    return ["main.py", "--config", config, f"--workdir={workdir}",
            *(f"--config.{k}={v}" for k, v in (overrides or {}).items())]


def run_cli(config: str, workdir: Path | str, overrides: Mapping[str, object] | None = None, *extra_args: str,
            timeout: float = 120, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """main.py run to the end in ROOT, in clean_env(env), `extra_args` after the overrides; its output captured."""
    return subprocess.run([sys.executable, *main_argv(config, workdir, overrides), *extra_args], cwd=ROOT,
                          env=clean_env(env), capture_output=True, text=True, timeout=timeout)


def assert_one_error(result: subprocess.CompletedProcess[str], code: int = 2, needle: str | None = None) -> str:
    """Checks `result` exited with `code` after exactly one `error:` line and no traceback; returns that line.

    absl's own log lines (`E1201 12:00:00 ...`) may repeat the message: they do not start with `error:`.
    """
    tail = f"exit code {result.returncode}, stderr:\n{result.stderr[-3000:]}"
    assert result.returncode == code, tail
    assert "Traceback" not in result.stderr, tail
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, tail
    assert needle is None or needle in errors[0], f"{needle!r} not in the error line; {tail}"
    return errors[0]


# ------------------------------------------------------------------------------------------ multi-process ----

class LocalRun:
    """`n` processes of one run on localhost, `devices_per_process` CPU devices each; outputs go to `log_dir`.

    `program` is a Python snippet (run after PRELUDE) or the argv after `python`, e.g. main_argv(...). Settings
    reach the processes through the ONEPFRAC_* environment variables; `env` adds to them or overrides them.
    """

    def __init__(self, n: int, devices_per_process: int, program: str | Sequence[str], log_dir: Path,
                 env: Mapping[str, str] | None = None):
        argv = ["-c", PRELUDE + textwrap.dedent(program)] if isinstance(program, str) else list(program)
        port = free_port()
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen] = []
        for i in range(n):
            settings = {"ONEPFRAC_COORDINATOR_ADDRESS": f"localhost:{port}", "ONEPFRAC_NUM_PROCESSES": str(n),
                        "ONEPFRAC_PROCESS_ID": str(i), "ONEPFRAC_CPU_DEVICES": str(devices_per_process)}
            with open(self.stdout_path(i), "w") as out, open(self.stderr_path(i), "w") as err:
                self.procs.append(subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=out, stderr=err,
                                                   env=clean_env({**settings, **(env or {})})))

    def stdout_path(self, i: int) -> Path:
        return self.log_dir / f"process_{i}.out"

    def stderr_path(self, i: int) -> Path:
        return self.log_dir / f"process_{i}.err"

    def wait_for_output(self, i: int, text: str, timeout: float) -> None:
        """Returns once process `i` has printed `text`; AssertionError after `timeout` s or if it exits first."""
        deadline = time.monotonic() + timeout
        while text not in self.stdout_path(i).read_text():
            assert self.procs[i].poll() is None, f"process {i} exited before printing {text!r}:\n{self.tail(i)}"
            assert time.monotonic() < deadline, f"process {i} did not print {text!r} in {timeout} s:\n{self.tail(i)}"
            time.sleep(0.2)

    def tail(self, i: int, chars: int = 3000) -> str:
        return (self.stdout_path(i).read_text() + self.stderr_path(i).read_text())[-chars:]

    def wait(self, timeout: float) -> list[subprocess.CompletedProcess]:
        """Every process's result; kills all and raises AssertionError if any is still running after `timeout` s."""
        deadline = time.monotonic() + timeout
        for i, proc in enumerate(self.procs):
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for other in self.procs:
                    other.kill()
                    other.wait()
                raise AssertionError(f"process {i} still running after {timeout} s:\n{self.tail(i)}") from None
        return [subprocess.CompletedProcess(proc.args, proc.returncode, self.stdout_path(i).read_text(),
                                            self.stderr_path(i).read_text()) for i, proc in enumerate(self.procs)]


def run_processes(n: int, devices_per_process: int, program: str | Sequence[str], timeout: float,
                  env: Mapping[str, str] | None = None, check: bool = True) -> list[subprocess.CompletedProcess]:
    """Runs one `n`-process run to the end (see LocalRun); with `check`, every process must exit 0."""
    with tempfile.TemporaryDirectory(prefix="onepfrac-mh-") as log_dir:
        run = LocalRun(n, devices_per_process, program, Path(log_dir), env)
        results = run.wait(timeout)
        if check:
            for i, result in enumerate(results):
                assert result.returncode == 0, f"process {i} exited with {result.returncode}:\n{run.tail(i)}"
        return results
