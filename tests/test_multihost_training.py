"""Training stages under 2 processes x 2 CPU devices, through main.py, against 1 process x 4 devices.

The 2 x 2 runs go through the multi-process harness of conftest (`LocalRun`). The 1 x 4 sides run in the test
process: conftest's `four_device_pretrain_run` (test_stages compares it with 1 device too) and
`four_device_finetune_run` (test_stages' fine-tune), and the generate test's own, rendered while its 2 x 2 run
renders. Runs that do not depend on each other start together to keep the wall time down."""

from __future__ import annotations

import json
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import (
    TINY_FINETUNE,
    TINY_PRETRAIN,
    LocalRun,
    assert_one_error,
    csv_rows,
    main_argv,
)
from onepfrac_jax.configs import generate as generate_configs
from PIL import Image
from test_full_disk_and_rundir import leftovers

from onepfrac_jax.config import apply_overrides
from onepfrac_jax.parallel.mesh import make_data_mesh
from onepfrac_jax.stages import generate
from onepfrac_jax.train.checkpoint import load_variables

GENERATE = {"seed": 2, "num_classes": 8, "image_size": 32, "pad": 2, "num_points": 2000, "classes_per_call": 8,
            "fill_threshold": 0.21}  # one class goes through re-draw rounds (as in test_multihost)
TIMEOUT = 300
pytestmark = pytest.mark.multiprocess


def start(n: int, devices: int, argv: list[str], log_dir: Path) -> LocalRun:
    log_dir.mkdir(parents=True)
    return LocalRun(n, devices, argv, log_dir)


def finish(run: LocalRun, timeout: float = TIMEOUT) -> list[str]:
    """Waits for `run` (as run_processes does); every process must exit 0; their stderr."""
    results = run.wait(timeout)
    for i, result in enumerate(results):
        assert result.returncode == 0, f"process {i} exited with {result.returncode}:\n{run.tail(i)}"
    return [r.stderr for r in results]


def losses(workdir: Path) -> list[float]:
    return [float(r["loss"]) for r in csv_rows(workdir / "metrics.csv")]


def assert_same_params(a: Path, b: Path, atol: float | None) -> None:
    """The latest checkpoints of two runs: equal within `atol`, or bitwise when `atol` is None."""
    x, y = load_variables(a), load_variables(b)
    assert jax.tree.structure(x) == jax.tree.structure(y)
    for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
        if atol is None:
            np.testing.assert_array_equal(u, v)
        else:
            np.testing.assert_allclose(u, v, rtol=0, atol=atol)


def checkpoint_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


# ------------------------------------------------------------------------------------- 2 x 2 against 1 x 4 ----

def test_pretrain_on_2_processes_matches_1_process_of_4_devices(pretrain_runs):
    one, two = pretrain_runs["1x4"], pretrain_runs["2x2"]
    assert len(losses(one)) == 4
    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-5)
    assert_same_params(one, two, atol=1e-5)
    # Only process 0 writes the run directory's files, and both runs hold the same ones.
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert checkpoint_steps(two) == checkpoint_steps(one) == [2, 4]


def test_finetune_on_an_image_folder_on_2_processes_matches_1_process(four_device_finetune_run, image_folder,
                                                                      tiny_pretrain_run, tmp_path):
    """From a pre-train run, as test_stages' fine-tune: four_device_finetune_run is the 1 x 4 side."""
    overrides = {**TINY_FINETUNE, "data.data_dir": image_folder, "init_from": tiny_pretrain_run}
    finish(start(2, 2, main_argv("configs/finetune.py:imagefolder", tmp_path / "2x2", overrides), tmp_path / "logs"))
    one, two = four_device_finetune_run, tmp_path / "2x2"
    assert len(losses(one)) == 6
    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-5)
    # The validation pass too: the same accuracy after each epoch.
    top1 = lambda w: [(r["step"], r["val_top1"]) for r in csv_rows(w / "metrics.csv") if r["val_top1"]]
    assert top1(two) == top1(one) and [s for s, _ in top1(one)] == ["3", "6"]
    assert_same_params(one, two, atol=1e-5)
    result = lambda w: {k: v for k, v in json.loads((w / "result.json").read_text()).items() if k != "files"}
    assert result(two) == result(one)  # accuracies and history; `files` name each run's own paths


# ------------------------------------------------------------------------------------------------ resume ----

def test_a_2_process_checkpoint_resumes_in_a_new_2_process_run_exactly(pretrain_runs, tmp_path):
    """The 2 x 2 run cut back to its checkpoint at step 2 (as if stopped there) and resumed to 4 in a new 2 x 2 run
    ends bit for bit where the uninterrupted run ended."""
    workdir, whole = tmp_path / "run", pretrain_runs["2x2"]
    shutil.copytree(whole, workdir)
    shutil.rmtree(workdir / "checkpoints" / "4")
    (workdir / "result.json").unlink()
    argv = main_argv("configs/pretrain.py:demo", workdir, {**TINY_PRETRAIN, "resume": True})
    stderr = finish(start(2, 2, argv, tmp_path / "logs"))
    for text in stderr:
        assert re.search(r"resumed from \S+ at step 2", text), text[-2000:]
    # Bitwise: same devices, same per-step keys, the same compiled step; the restored state is the saved one.
    assert_same_params(workdir, whole, atol=None)
    assert [int(r["step"]) for r in csv_rows(workdir / "metrics.csv")] == [1, 2, 3, 4]
    assert losses(workdir) == losses(whole)


# ----------------------------------------------------------------------------------------------- SIGTERM ----

# Long enough that it is still running when the signal comes; checkpoints every 10 steps. It continues a copy of the
# 2 x 2 run (resume=True: the config differs), so neither process compiles an initialisation.
ENDLESS = {**TINY_PRETRAIN, "total_steps": 100_000, "checkpoint_every_steps": 10, "log_every_steps": 5, "resume": True}


def endless(pretrain_runs: dict[str, Path], workdir: Path, log_dir: Path) -> LocalRun:
    """2 x 2 processes taking a copy of pretrain_runs' 2 x 2 run (step 4) on to ENDLESS's 100,000 steps in
    `workdir`, returned once the checkpoint at step 10 is written."""
    shutil.copytree(pretrain_runs["2x2"], workdir)
    shutil.rmtree(workdir / "export")  # the finished run's: what a stopped run writes (nothing) is then plain
    (workdir / "result.json").unlink()
    run = start(2, 2, main_argv("configs/pretrain.py:demo", workdir, ENDLESS), log_dir)
    deadline = time.monotonic() + TIMEOUT
    while not (workdir / "checkpoints" / "10").exists():
        assert all(p.poll() is None for p in run.procs), run.tail(0) + run.tail(1)
        assert time.monotonic() < deadline, "no checkpoint at step 10"
        time.sleep(0.05)
    return run


def test_sigterm_saves_one_checkpoint_at_a_step_all_processes_agree_on(pretrain_runs, tmp_path):
    """launch/local.sh (like SLURM) sends SIGTERM to every process, not all at the same instant.

    Here process 1 gets it first and process 0 a second later. JAX's preemption service (loop._Stop) makes both
    stop at one agreed step: both save there (a save is collective) and exit 0. With only a Python handler per
    process, process 1 would stop alone and process 0 would wait for it in the next collective.
    """
    workdir = tmp_path / "run"
    run = endless(pretrain_runs, workdir, tmp_path / "logs")
    run.procs[1].send_signal(signal.SIGTERM)
    time.sleep(1)
    if run.procs[0].poll() is None:
        run.procs[0].send_signal(signal.SIGTERM)
    stderr = finish(run, timeout=120)
    said = [re.search(r"SIGTERM: saved a checkpoint at step (\d+)", text) for text in stderr]
    assert all(said), stderr[0][-2000:] + stderr[1][-2000:]
    step = int(said[0].group(1))
    assert int(said[1].group(1)) == step and 10 <= step < 100_000
    assert checkpoint_steps(workdir)[-1] == step
    assert not (workdir / "export").exists()  # a stopped run does not export
    assert int(csv_rows(workdir / "metrics.csv")[-1]["step"]) <= step


def test_ctrl_c_on_one_process_stops_every_process_at_one_step(pretrain_runs, tmp_path):
    """JAX's preemption service owns SIGTERM here; a Ctrl-C on process 1 alone reaches it as a SIGTERM from process
    1's own handler, so process 0 stops at the same step (the save is collective). Process 1 says so in one line,
    exit 130; process 0, which got no Ctrl-C, stops as on a SIGTERM (exit 0)."""
    workdir = tmp_path / "run"
    run = endless(pretrain_runs, workdir, tmp_path / "logs")
    run.procs[1].send_signal(signal.SIGINT)
    first, second = run.wait(120)
    assert first.returncode == 0, run.tail(0)
    line = assert_one_error(second, 130, "run the same command again to resume")
    step = int(re.search(r"interrupted \(Ctrl-C\) at step (\d+) of", line).group(1))
    said = re.search(r"SIGTERM: saved a checkpoint at step (\d+)", first.stderr)
    assert said and int(said.group(1)) == step and 10 <= step < 100_000, run.tail(0)
    assert checkpoint_steps(workdir)[-1] == step


# ---------------------------------------------------------------------------------------------- generate ----

def test_generate_on_2_processes_writes_the_bank_of_1_process_and_process_0_alone_overwrites_it(tmp_path):
    one, two = tmp_path / "1x4", tmp_path / "2x2"
    run = start(2, 2, main_argv("configs/generate.py:demo", two, GENERATE), tmp_path / "logs_2x2")
    # meanwhile the 1 x 4 side in this process (test_multihost's class bank test has compiled its programs)
    generate.run(apply_overrides(generate_configs.get_config("demo"), GENERATE), str(one),
                 make_data_mesh(jax.devices()[:4]))
    finish(run)
    params = json.loads((one / "params.json").read_text())
    assert any(c["redraws"] for c in params["classes"])  # the re-draw path ran
    assert json.loads((two / "params.json").read_text()) == params
    files = sorted(p.relative_to(one) for p in (one / "images").rglob("*.png"))
    assert len(files) == 8 and files == sorted(p.relative_to(two) for p in (two / "images").rglob("*.png"))
    for file in files:  # both halves of the bank: process 1's rows reached process 0's files
        np.testing.assert_array_equal(np.asarray(Image.open(two / file)), np.asarray(Image.open(one / file)))
    assert sorted(p.name for p in two.iterdir()) == ["config.json", "images", "params.json", "preview.png",
                                                      "result.json"]  # and no .lock: released
    # an overwrite on 2 processes: process 0 replaces the run before either goes on, and nothing is left beside it
    overwrite = {**GENERATE, "seed": 3, "fill_threshold": 0.0, "overwrite": True}  # (seed 3's classes fill less)
    finish(start(2, 2, main_argv("configs/generate.py:demo", two, overwrite), tmp_path / "logs_overwrite"))
    assert json.loads((two / "config.json").read_text())["seed"] == 3
    assert json.loads((two / "params.json").read_text())["spec"]["seed"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1x4", "2x2", "logs_2x2", "logs_overwrite"]
    assert leftovers(two) == []


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
