"""Ctrl-C outside the training loop: one line that says what is left and how to go on, exit code 130, nothing that
claims to be complete. Ctrl-C while a model trains (a checkpoint, then the same command resumes) is tested beside
SIGTERM, in test_stages.py (one process) and test_multihost_training.py (two)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import ml_collections
import pytest
from conftest import ROOT, assert_one_error, clean_env, main_argv
from onepfrac_jax.configs import demo as demo_configs
from test_train import run as train_run
from test_train import toy_config, toy_task

from onepfrac_jax.config import ConfigError, Interrupted, on_ctrl_c, to_json
from onepfrac_jax.rundir import LOCK_NAME, RunDir

CONFIG = ml_collections.ConfigDict({"stage": "generate", "overwrite": False})


def test_ctrl_c_before_a_run_begins_leaves_no_trace(tmp_path):
    with pytest.raises(Interrupted) as raised, RunDir.open(CONFIG, tmp_path / "run", resumable=False):
        raise KeyboardInterrupt
    assert str(raised.value) == (f"interrupted (Ctrl-C) before this command wrote anything in {tmp_path / 'run'}; "
                                 f"run it again")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("resumable, says", [
    (True, "interrupted (Ctrl-C); run the same command again to resume the run in {}"),
    (False, "interrupted (Ctrl-C): the generate run in {} is incomplete (no result.json); run the same command with "
            "--config.overwrite=True to start it again"),
])
def test_ctrl_c_in_a_run_says_how_to_go_on_and_releases_the_workdir(tmp_path, resumable, says):
    with pytest.raises(Interrupted) as raised, RunDir.open(CONFIG, tmp_path / "run", resumable=resumable) as run_dir:
        run_dir.begin()
        raise KeyboardInterrupt
    assert str(raised.value) == says.format(tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json"]  # no lock, no result.json


def interrupted(argv: list[str], log: Path, when: str) -> subprocess.CompletedProcess[str]:
    """main.py with `argv`, sent SIGINT once its output (stdout and stderr, in `log`) matches the regex `when`."""
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=clean_env(), stdout=out, stderr=out)
    deadline = time.time() + 300
    while not re.search(when, log.read_text()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", log.read_text())


# 4,000 classes of 64²: the PNGs take seconds to write, the rendering before them a few more
MANY = {"num_classes": 4000, "image_size": 64, "pad": 2, "num_points": 1000, "fill_threshold": 0.0}


@pytest.mark.slow
def test_ctrl_c_while_generate_writes_its_images_leaves_no_result(tmp_path):
    workdir = tmp_path / "run"
    result = interrupted(main_argv("configs/generate.py:demo", workdir, MANY), tmp_path / "log.txt", "wrote 250/")
    assert_one_error(result, 130, f"the generate run in {workdir} is incomplete (no result.json)")
    assert not (workdir / "result.json").exists() and not (workdir / LOCK_NAME).exists()


@pytest.mark.slow
def test_ctrl_c_in_the_demo_checkpoints_its_pretrain_and_the_same_command_goes_on_from_there(tmp_path):
    """Stopped in its pre-training, the demo is resumed by the same command (not refused as a finished demo is): it
    keeps the generated set and resumes the pre-training from the checkpoint; here a second Ctrl-C stops it again."""
    workdir, argv = tmp_path / "demo", main_argv("configs/demo.py", tmp_path / "demo")
    first = interrupted(argv, tmp_path / "first.txt", r"\] step \d+/300")
    line = assert_one_error(first, 130, f"saved in {workdir / 'pretrain' / 'checkpoints'}; run the same command")
    step = re.search(r"at step (\d+) of 300", line).group(1)
    second = interrupted(argv, tmp_path / "second.txt", r"resumed from \S+ at step")
    assert re.search(rf"resumed from \S+ at step {step}\b", second.stderr), second.stderr[-3000:]
    assert "== generate" not in second.stderr and (workdir / "generate" / "result.json").exists()
    assert_one_error(second, 130, "again")


def test_a_ctrl_c_whose_keyboard_interrupt_python_dropped_stops_the_training_loop_at_its_first_step(
        tmp_path, monkeypatch):
    """main.py's handler raises where the signal lands. In a callback Python calls for itself (here a weakref's; in
    CI, an import's module lock) the KeyboardInterrupt is printed and dropped, and the demo went on to its end with
    exit 0. The Ctrl-C stays pending: the training loop, once started, stops at its first step with exit 130."""
    dropped = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: dropped.append(unraisable.exc_type))

    class Anything:
        pass

    thing = Anything()
    reference = weakref.ref(thing, lambda _: on_ctrl_c(signal.SIGINT, None))
    previous = signal.getsignal(signal.SIGINT)
    try:
        del thing
        assert dropped == [KeyboardInterrupt] and reference() is None
        with pytest.raises(Interrupted, match=r"^interrupted \(Ctrl-C\) at step 1 of 8: a checkpoint is saved"):
            train_run(toy_task(lambda w, step: w**2), toy_config(), tmp_path / "run")
        train_run(toy_task(lambda w, step: w**2), toy_config(), tmp_path / "run")  # the same command: it resumes
    finally:
        signal.signal(signal.SIGINT, previous)  # on_ctrl_c and the loop set the default action


def test_a_stopped_demo_with_another_seed_names_only_overwrite(tmp_path):
    """The demo's config has no `resume` key: the refusal offers what it has."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(to_json(demo_configs.get_config()))
    config = demo_configs.get_config()
    config.seed = 1
    with pytest.raises(ConfigError, match=r"differs in: seed\); pass --config.overwrite=True to start afresh$"):
        RunDir.open(config, tmp_path / "run")


@pytest.mark.slow
def test_ctrl_c_while_the_command_starts_is_one_line(tmp_path):
    """Sent while Python still imports JAX (or parses the flags): one line, exit 130, no workdir."""
    proc = subprocess.Popen([sys.executable, *main_argv("configs/generate.py:demo", tmp_path / "run")], cwd=ROOT,
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert_one_error(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), 130, "interrupted")
    assert not (tmp_path / "run").exists()
