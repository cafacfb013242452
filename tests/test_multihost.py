"""Multi-process runs on one machine: N CPU processes joined by jax.distributed, as launch/local.sh starts them.

`run_processes` / `LocalRun` (conftest) are the harness: N local processes of a Python snippet or of main.py, on a
free port, with a time limit and their outputs collected. Settings reach the processes through the ONEPFRAC_*
environment variables; launch/local.sh, tested at the end, passes them as flags.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import ROOT, LocalRun, assert_one_error, clean_env, free_port, main_argv, run_cli, run_processes
from jax.sharding import NamedSharding, PartitionSpec

from onepfrac_jax.config import ConfigError
from onepfrac_jax.fractals.bank import BankSpec, build_bank
from onepfrac_jax.parallel import distributed
from onepfrac_jax.parallel.mesh import make_data_mesh


def last_json(result: subprocess.CompletedProcess) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- settings ----

def test_single_process_when_nothing_is_set():
    settings = distributed.resolve({})
    assert (settings.mode, settings.num_processes, settings.process_id) == ("single", 1, 0)


def test_explicit_settings_from_the_environment():
    settings = distributed.resolve({"ONEPFRAC_COORDINATOR_ADDRESS": "node001:29500", "ONEPFRAC_NUM_PROCESSES": "4",
                                    "ONEPFRAC_PROCESS_ID": "3", "ONEPFRAC_LOCAL_DEVICE_IDS": "0,1",
                                    "ONEPFRAC_CPU_DEVICES": "2", "ONEPFRAC_DISTRIBUTED_TIMEOUT": "7"})
    assert settings == distributed.Settings("explicit", "node001:29500", 4, 3, (0, 1), 2, 7, 30)


def test_slurm_step_is_detected():
    env = {"SLURM_JOB_ID": "123", "SLURM_STEP_NODELIST": "node[001-002]", "SLURM_NTASKS": "8",
           "SLURM_PROCID": "5", "SLURM_LOCALID": "1"}
    settings = distributed.resolve(env)
    assert (settings.mode, settings.coordinator_address, settings.num_processes, settings.process_id,
            settings.local_device_ids) == ("slurm", None, 8, 5, (1,))
    # One process per node names all of its GPUs, as launch/slurm.sbatch does.
    assert distributed.resolve({**env, "ONEPFRAC_LOCAL_DEVICE_IDS": "0,1,2,3"}).local_device_ids == (0, 1, 2, 3)
    # A batch script run without srun has no step: a single process, not a wait for 7 others.
    assert distributed.resolve({k: v for k, v in env.items() if k != "SLURM_STEP_NODELIST"}).mode == "single"
    assert distributed.resolve({**env, "SLURM_NTASKS": "1"}).mode == "single"


def test_mpirun_is_detected_and_open_mpi_5_needs_the_coordinator():
    env = {"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "6", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
           "SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
           "SLURM_LOCALID": "0"}  # mpirun inside a SLURM allocation: the OpenMPI ranks are the processes
    with pytest.raises(ConfigError, match=r"Open MPI 5.*--coordinator_address"):
        distributed.resolve(env)
    settings = distributed.resolve({**env, "OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.0.0.1:34911"})
    assert (settings.mode, settings.coordinator_address, settings.num_processes, settings.process_id,
            settings.local_device_ids) == ("ompi", None, 8, 6, (2,))
    settings = distributed.resolve({**env, "ONEPFRAC_COORDINATOR_ADDRESS": "node001:29500"})
    assert (settings.mode, settings.coordinator_address) == ("ompi", "node001:29500")


@pytest.mark.parametrize(("env", "message"), [
    ({"ONEPFRAC_NUM_PROCESSES": "2"}, "both --num_processes and --process_id, or neither"),
    ({"ONEPFRAC_NUM_PROCESSES": "2", "ONEPFRAC_PROCESS_ID": "2", "ONEPFRAC_COORDINATOR_ADDRESS": "h:1"},
     r"--process_id=2 must lie in \[0, 2\)"),
    ({"ONEPFRAC_NUM_PROCESSES": "0", "ONEPFRAC_PROCESS_ID": "0"}, "--num_processes=0 must be ≥ 1"),
    ({"ONEPFRAC_NUM_PROCESSES": "2", "ONEPFRAC_PROCESS_ID": "0"}, "needs --coordinator_address"),
    ({"ONEPFRAC_COORDINATOR_ADDRESS": "h:1"}, "needs --num_processes and --process_id"),
    ({"ONEPFRAC_COORDINATOR_ADDRESS": "node001", "ONEPFRAC_NUM_PROCESSES": "2", "ONEPFRAC_PROCESS_ID": "0"},
     "is not HOST:PORT"),
    ({"ONEPFRAC_PROCESS_ID": "one"}, "ONEPFRAC_PROCESS_ID='one'"),
    ({"ONEPFRAC_LOCAL_DEVICE_IDS": "0,0"}, "distinct device numbers"),
    ({"ONEPFRAC_LOCAL_DEVICE_IDS": "0"}, "CUDA_VISIBLE_DEVICES"),
    ({"ONEPFRAC_CPU_DEVICES": "0"}, "--cpu_devices=0 must be ≥ 1"),
])
def test_inconsistent_settings_are_one_clear_error(env, message):
    with pytest.raises(ConfigError, match=message):
        distributed.resolve(env)


# ------------------------------------------------------------------------------- 2 processes x 2 devices ----

@pytest.mark.multiprocess
def test_two_processes_of_two_devices_make_one_four_device_mesh():
    program = """
        import json
        import numpy as np
        from jax.experimental import multihost_utils
        from jax.sharding import NamedSharding, PartitionSpec
        from onepfrac_jax.parallel.mesh import make_data_mesh
        mesh = make_data_mesh()
        full = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
        half = full[4 * jax.process_index() : 4 * (jax.process_index() + 1)]
        x = jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec("data")), half)
        print(json.dumps({"devices": jax.device_count(), "processes": jax.process_count(),
                          "local": jax.local_device_count(), "main": distributed.is_main_process(),
                          "shape": list(x.shape), "sum": int(jax.jit(lambda a: (a * a).sum())(x)),
                          "gathered": np.asarray(multihost_utils.process_allgather(x, tiled=True)).tolist()}))
    """
    results = run_processes(2, 2, program, timeout=120)
    outs = [last_json(r) for r in results]
    full = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
    reference = jax.device_put(full, NamedSharding(make_data_mesh(), PartitionSpec("data")))  # 1 process x 4
    for i, out in enumerate(outs):
        assert (out["devices"], out["processes"], out["local"], out["main"]) == (4, 2, 2, i == 0)
        assert out["shape"] == [8, 3]
        assert out["sum"] == int(jax.jit(lambda a: (a * a).sum())(reference))
        assert out["gathered"] == full.tolist()  # process 0's half first: rows follow process order


# fill_threshold 0.21 sends one of these classes through re-draw rounds: both code paths run.
BANK = {"seed": 2, "num_classes": 8, "image_size": 32, "pad": 2, "num_points": 2000, "classes_per_call": 8,
        "fill_threshold": 0.21}


@pytest.mark.multiprocess
def test_class_bank_is_bitwise_the_same_on_two_processes(tmp_path):
    program = f"""
        import hashlib, json
        import numpy as np
        from jax.experimental import multihost_utils
        from onepfrac_jax.fractals.bank import BankSpec, build_bank
        bank = build_bank(BankSpec(**{BANK!r}))
        images = np.asarray(multihost_utils.process_allgather(bank.images, tiled=True))
        data = images.tobytes() + bank.class_params.tobytes() + bank.redraws.tobytes()
        print(json.dumps({{"digest": hashlib.sha256(data).hexdigest(), "redraws": bank.redraws.tolist()}}))
    """
    run = LocalRun(2, 2, program, tmp_path)
    bank = build_bank(BankSpec(**BANK))  # this process, 1 x 4 devices, while the two others render
    assert bank.redraws.any() and not bank.redraws.all()
    reference = hashlib.sha256(np.asarray(bank.images).tobytes() + bank.class_params.tobytes()
                               + bank.redraws.tobytes()).hexdigest()
    results = run.wait(timeout=180)
    assert [r.returncode for r in results] == [0, 0], run.tail(0) + run.tail(1)
    assert [last_json(r)["digest"] for r in results] == [reference, reference]


# ------------------------------------------------------------------------------------------ bad input ----

@pytest.mark.parametrize(("flags", "message"), [
    (("--coordinator_address=localhost:1", "--num_processes=2", "--process_id=2"),
     "--process_id=2 must lie in [0, 2) for --num_processes=2"),
    (("--num_processes=2",), "give both --num_processes and --process_id, or neither"),
])
def test_inconsistent_process_flags_exit_2_with_one_line(flags, message):
    assert_one_error(run_cli("configs/generate.py:demo", "/nonexistent/never", None, *flags), 2, message)


def test_unreachable_coordinator_fails_within_the_timeout_naming_it():
    address = f"localhost:{free_port()}"  # nothing listens there
    start = time.monotonic()
    result = run_cli("configs/generate.py:demo", "/nonexistent/never", None, f"--coordinator_address={address}",
                     "--num_processes=2", "--process_id=1", "--distributed_timeout=4")
    seconds = time.monotonic() - start
    assert_one_error(result, 2, f"coordinator {address} unreachable for 4 s")
    # It waited the 4 s (process 0 may start late) and not JAX's 300; the rest is Python and JAX start-up.
    assert 4 <= seconds < 4 + 30


@pytest.mark.multiprocess
def test_batch_not_divisible_by_the_devices_of_all_processes_exits_2(tmp_path):
    # batch 6: divisible by each process's 2 devices, not by all 4
    argv = main_argv("configs/pretrain.py:demo", tmp_path / "run", {"batch_size": 6})
    for result in run_processes(2, 2, argv, timeout=120, check=False):
        assert_one_error(result, 2, "batch_size=6 is not divisible by the 4 devices of all processes")


# --------------------------------------------------------------------------------------- dying peers ----

LOOP = """
    import time
    import numpy as np
    from onepfrac_jax.parallel.mesh import data_sharding, make_data_mesh
    x = jax.make_array_from_process_local_data(data_sharding(make_data_mesh()), np.ones(2, np.float32))
    total = jax.jit(lambda a: a.sum())
    print("ready", float(total(x)), flush=True)
    start = time.monotonic()
    while time.monotonic() - start < 240:  # longer than the test waits
        if MODE == "raise" and jax.process_index() == 1:
            raise RuntimeError("process 1 fails")
        if MODE != "idle":  # collectives, as in a training loop; "idle": host-side work only
            total(x).block_until_ready()
        time.sleep(0.05)
"""


# Seconds without a heartbeat before JAX's coordination service declares a process dead (30 by default).
HEARTBEAT = 5


@pytest.mark.multiprocess
@pytest.mark.parametrize(("victim", "mode"), [(1, "busy"), (0, "busy"), (1, "idle"), (1, "raise")])
def test_when_one_process_dies_the_other_exits_nonzero_within_the_heartbeat_timeout(tmp_path, victim, mode):
    """busy: the peer's collective fails at once. idle: only the heartbeat tells. raise: an uncaught exception."""
    run = LocalRun(2, 1, f"MODE = {mode!r}\n" + textwrap.dedent(LOOP), tmp_path,
                   env={"ONEPFRAC_HEARTBEAT_TIMEOUT": str(HEARTBEAT)})
    survivor = 1 - victim
    for i in range(2):
        run.wait_for_output(i, "ready", timeout=120)
    start = time.monotonic()
    if mode != "raise":
        run.procs[victim].send_signal(signal.SIGKILL)
    results = run.wait(timeout=90)
    seconds = time.monotonic() - start
    assert results[victim].returncode != 0
    assert results[survivor].returncode != 0, run.tail(survivor)
    assert seconds < HEARTBEAT + 15, f"{seconds:.0f} s"
    if mode == "raise":
        # It exits at once (exit_now), not after JAX's 300 s shutdown barrier.
        assert "RuntimeError: process 1 fails" in results[1].stderr
    if mode == "idle":
        assert "stopped sending heartbeats" in results[survivor].stderr


# --------------------------------------------------------------------------------------- launch/local.sh ----

ENTRY = """
import sys, time
import jax
from absl import app
from onepfrac_jax.parallel import distributed

def main(argv):
    distributed.initialize()
    settings = distributed.resolve()
    print(f"process {jax.process_index()} of {jax.process_count()}, {jax.device_count()} devices, args {argv[1:]}, "
          f"mode {settings.mode}, GPUs {settings.local_device_ids}")
    if "fail" in argv and jax.process_index() == 1:
        distributed.exit_now(3)
    if "fail" in argv:
        time.sleep(120)

app.run(main)
"""


def launch(tmp_path: Path, script: str, *args: str, env: Mapping[str, str] | None = None,
           ) -> tuple[subprocess.CompletedProcess, float]:
    """Runs launch/`script` with ENTRY in place of main.py; its result and wall time."""
    entry = tmp_path / "entry.py"
    entry.write_text(ENTRY)
    env = clean_env({"ENTRY": str(entry), "PYTHON": sys.executable, "LOG_DIR": str(tmp_path / "logs"),
                     "PYTHONPATH": str(ROOT), **(env or {})})
    start = time.monotonic()
    result = subprocess.run([f"launch/{script}", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=150)
    return result, time.monotonic() - start


@pytest.mark.multiprocess
def test_local_sh_runs_processes_with_process_0_on_the_console(tmp_path):
    result, _ = launch(tmp_path, "local.sh", "2", "3", "hello")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "process 0 of 2, 6 devices, args ['hello'], mode explicit, GPUs None" in result.stdout
    assert "process 1" not in result.stdout
    log = (tmp_path / "logs" / "process_1.log").read_text()
    assert "process 1 of 2, 6 devices, args ['hello'], mode explicit, GPUs None" in log
    assert "process 1 of 2: 3 local devices (cpu), 6 devices in all" in log  # what initialize() logs


@pytest.mark.multiprocess
def test_local_sh_stops_the_others_and_fails_when_one_process_fails(tmp_path):
    # process 0 sleeps 120 s with SIGTERM owned by JAX's preemption service: only the SIGKILL after STOP_GRACE ends it
    result, seconds = launch(tmp_path, "local.sh", "2", "1", "fail", env={"STOP_GRACE": "1"})
    assert result.returncode == 3, result.stderr[-3000:]
    assert f"process 1 exited with status 3 (its output: {tmp_path / 'logs' / 'process_1.log'})" in result.stderr
    assert seconds < 60


def test_local_sh_usage():
    result = subprocess.run(["launch/local.sh", "two"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "usage:" in result.stderr
    result = subprocess.run(["launch/local.sh", "2", "1"], cwd=ROOT, capture_output=True, text=True,
                            env=clean_env({"STOP_GRACE": "soon"}))
    assert result.returncode == 2 and "STOP_GRACE=soon must be a whole number of seconds" in result.stderr


# Stand-ins for srun and mpirun: N local tasks with the variables each launcher gives its tasks (one node).
FAKE_SRUN = """#!/usr/bin/env bash
[[ $1 == --kill-on-bad-exit=1 ]] || { echo "fake srun: expected --kill-on-bad-exit=1" >&2; exit 99; }
shift
for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_STEP_NODELIST=localhost "$@" & done
status=0
for pid in $(jobs -p); do wait "$pid" || status=$?; done
exit $status
"""
FAKE_MPIRUN = """#!/usr/bin/env bash
while [[ $1 == -* ]]; do
  case $1 in -np) np=$2 ;; esac
  shift 2
done
for ((i = 0; i < np; i++)); do
  OMPI_COMM_WORLD_SIZE=$np OMPI_COMM_WORLD_RANK=$i OMPI_COMM_WORLD_LOCAL_RANK=$i "$@" &
done
status=0
for pid in $(jobs -p); do wait "$pid" || status=$?; done
exit $status
"""
# The launch scripts run `$PYTHON main.py ARGS`: this interpreter runs ENTRY with ARGS instead.
FAKE_PYTHON = """#!/usr/bin/env bash
shift
exec "$REAL_PYTHON" "$ENTRY" "$@"
"""


def fake_launcher_env(tmp_path: Path, name: str, script: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for file, text in ((name, script), ("python", FAKE_PYTHON)):
        (bin_dir / file).write_text(text)
        (bin_dir / file).chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "REAL_PYTHON": sys.executable,
            "PYTHON": str(bin_dir / "python"), "ONEPFRAC_CPU_DEVICES": "2"}


@pytest.mark.multiprocess
def test_slurm_sbatch_one_process_per_node_is_detected_by_jax(tmp_path):
    env = {**fake_launcher_env(tmp_path, "srun", FAKE_SRUN), "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_JOB_ID": "4242",
           "SLURM_NTASKS": "2", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "1",
           "SLURM_GPUS_ON_NODE": "4", "JAX_COORDINATOR_PORT": str(free_port())}
    result, _ = launch(tmp_path, "slurm.sbatch", "hello", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    # One process per node drives all 4 GPUs: the script names them, since JAX would give it only the first.
    assert "process 0 of 2, 4 devices, args ['hello'], mode slurm, GPUs (0, 1, 2, 3)" in result.stdout
    log = (tmp_path / "logs" / "process_1.log").read_text()
    assert "process 1 of 2, 4 devices, args ['hello'], mode slurm, GPUs (0, 1, 2, 3)" in log
    assert "process 1 of 2 (slurm): joining the coordinator named by the slurm environment" in log


@pytest.mark.multiprocess
def test_mpirun_sh_passes_the_coordinator_for_open_mpi_5(tmp_path):
    port = free_port()
    env = {**fake_launcher_env(tmp_path, "mpirun", FAKE_MPIRUN), "COORDINATOR": "localhost", "PORT": str(port)}
    result, _ = launch(tmp_path, "mpirun.sh", "2", "2", "hello", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    # Two processes per node: each drives the GPU of its local rank, as JAX does under mpirun.
    assert "process 0 of 2, 4 devices, args ['hello'], mode ompi, GPUs (0,)" in result.stdout
    log = (tmp_path / "logs" / "process_1.log").read_text()
    assert "process 1 of 2, 4 devices, args ['hello'], mode ompi, GPUs (1,)" in log
    assert f"process 1 of 2 (ompi): joining localhost:{port}" in log
