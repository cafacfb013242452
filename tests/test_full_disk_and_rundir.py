"""At the edges: a full disk anywhere, and the run directory's own files (a `.lock` that is no lock file, a workdir
that cannot be written, an overwrite that meets what it cannot delete). Each ends in one line and damages nothing.

A full disk is real: a small tmpfs in a private mount namespace (`unshare -rm`), as tests/test_faults.py's
checkpoint case. The tests may run as root, whom file modes do not stop: a read-only mount and a mount point inside
a run stand in for what root could otherwise write or delete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest
from conftest import ROOT, assert_one_error, clean_env, main_argv
from onepfrac_jax.configs import generate as generate_config
from PIL import Image

from onepfrac_jax.config import ConfigError
from onepfrac_jax.rundir import LOCK_NAME, RunDir
from onepfrac_jax.stages import generate
from onepfrac_jax.train.metrics import MetricWriter

pytestmark = pytest.mark.slow  # the fast tier leaves this file out (pyproject.toml, markers)

GENERATE = {"num_classes": 10, "image_size": 48, "pad": 2, "num_points": 6_000, "seed": 2}


def in_namespace(script: str) -> subprocess.CompletedProcess[str]:
    """`script` (sh) in private user and mount namespaces, where it may mount what only it sees."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("needs unshare(1) with user and mount namespaces to mount a tmpfs")
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                          env=clean_env())


def command(config: str, workdir: Path, overrides: dict) -> str:
    """main.py's command line, for a script that runs it from the repository top."""
    return f"cd {ROOT} && {sys.executable} " + " ".join(main_argv(config, workdir, overrides))


def leftovers(path: Path) -> list[str]:
    """The temporaries a write or an overwrite could leave (`.NAME.tmp-*`, `.NAME.new-*`, `.NAME.replaced-*`)."""
    return sorted(str(p) for p in path.rglob(".*") if p.name != LOCK_NAME)


# ---------------------------------------------------------------------------------------------- a full disk


def on_a_small_disk(tmp_path: Path, size: str, config: str, overrides: dict) -> tuple[
        subprocess.CompletedProcess[str], Path, Path]:
    """main.py with its workdir on a tmpfs of `size`: its result, the workdir, and a copy of what it left there
    (absent when nothing is left), taken before the tmpfs goes with its namespace."""
    mount, kept = tmp_path / "small", tmp_path / "kept"
    mount.mkdir()
    result = in_namespace(f"mount -t tmpfs -o size={size} tmpfs {mount} && "
                          f"{command(config, mount / 'run', overrides)}; code=$?; "
                          f"cp -a {mount}/run {kept} 2>/dev/null; exit $code")
    return result, mount / "run", kept


def test_a_full_disk_while_generate_writes_its_pngs_is_one_line_and_no_broken_png(tmp_path):
    # the lock and config.json fit, then a few of the 10 PNGs
    result, workdir, kept = on_a_small_disk(tmp_path, "16k", "configs/generate.py:demo", GENERATE)
    line = assert_one_error(result, code=4)
    assert line.startswith(f"error: cannot write {workdir}/images/"), line
    assert line.endswith(f".png: No space left on device; the set in {workdir} is incomplete (each file in it "
                         f"whole): make room, then run again with --config.overwrite=True"), line
    assert leftovers(kept) == []
    pngs = sorted(kept.rglob("*.png"))
    for png in pngs:
        with Image.open(png) as image:
            image.load()  # a truncated PNG raises here
    assert len(pngs) < GENERATE["num_classes"] and not (kept / "result.json").exists()


def test_a_full_disk_while_exporting_leaves_no_export_at_all(tmp_path, tiny_pretrain_run):
    # the lock and config.json fit, model.safetensors (~60 KB) does not
    result, workdir, kept = on_a_small_disk(tmp_path, "32k", "configs/export.py", {"run": tiny_pretrain_run})
    line = assert_one_error(result, code=4)
    assert line == (f"error: cannot write {workdir}/export/model.safetensors: No space left on device; no export "
                    f"was written; the run {tiny_pretrain_run} is untouched"), line
    assert sorted(p.name for p in kept.iterdir()) == ["config.json"]  # no export/, no part of one, no result.json


def test_a_full_disk_at_config_json_is_one_line_and_leaves_nothing(tmp_path):
    # one page: the lock's, so config.json finds no room
    result, workdir, kept = on_a_small_disk(tmp_path, "4k", "configs/generate.py:demo", GENERATE)
    line = assert_one_error(result, code=2)
    assert line == (f"error: cannot write {workdir}/config.json: No space left on device; nothing in the workdir "
                    f"was changed"), line
    assert not kept.exists()  # the run's folder, which it had created, was removed


def test_a_full_disk_costs_metrics_csv_its_rows_not_the_run(tmp_path, caplog):
    (tmp_path / "metrics.csv").symlink_to("/dev/full")  # every write to it fails: No space left on device
    writer = MetricWriter(tmp_path, ["loss"], total_steps=2, enabled=True, resume=False)
    writer.write(1, {"loss": 1.0})
    writer.write(2, {"loss": 0.5})
    (tmp_path / "metrics.csv").unlink()  # /dev/full reads as endless zeros: no curves from it
    writer.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"{tmp_path / 'metrics.csv'} has no rows from step 1 on: No space left on device" in warnings, warnings


# -------------------------------------------------------------------------------------- the run directory's files


def _config(**fields) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"stage": "generate", "overwrite": False, **fields})


@pytest.mark.parametrize(("kind", "message"), [
    ("a symlink to a file", "is a symbolic link, not a run's lock file"),
    ("a dangling symlink", "is a symbolic link, not a run's lock file"),
    ("a directory", "is a directory, not a run's lock file"),
    ("a FIFO", "is not a regular file, not a run's lock file"),
])
def test_a_lock_that_is_no_regular_file_is_refused_and_nothing_is_touched(tmp_path, kind, message):
    outside, workdir = tmp_path / "precious.txt", tmp_path / "run"
    outside.write_bytes(b"someone else's file\n")
    workdir.mkdir()
    lock = workdir / LOCK_NAME
    if kind == "a symlink to a file":
        lock.symlink_to(outside)
    elif kind == "a dangling symlink":
        lock.symlink_to(tmp_path / "nowhere")
    elif kind == "a directory":
        lock.mkdir()
    else:
        os.mkfifo(lock)
    with pytest.raises(ConfigError, match=re.escape(f"{lock} {message}; remove it, or choose another workdir")):
        RunDir.open(_config(), workdir)
    assert outside.read_bytes() == b"someone else's file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt", "run"]  # the dangling link made nothing
    assert os.path.lexists(lock) and [p.name for p in workdir.iterdir()] == [LOCK_NAME]


def test_a_workdir_on_a_read_only_filesystem_is_one_line(tmp_path):
    mount = tmp_path / "readonly"
    mount.mkdir()
    result = in_namespace(f"mount -t tmpfs -o ro tmpfs {mount} && "
                          f"{command('configs/generate.py:demo', mount, GENERATE)}")
    line = assert_one_error(result, code=2)
    assert line == (f"error: workdir {mount} is not writable ({mount}/{LOCK_NAME}: Read-only file system); choose "
                    f"another workdir"), line


def test_an_overwrite_replaces_the_run_whole_and_keeps_it_locked(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps({"stage": "generate"}))
    (workdir / "result.json").write_text("{}")
    (workdir / "images" / "00000").mkdir(parents=True)
    with RunDir.open(_config(overwrite=True, seed=3), workdir) as run:
        run.begin()
        assert sorted(p.name for p in workdir.iterdir()) == [LOCK_NAME, "config.json"]
        assert json.loads((workdir / "config.json").read_text())["seed"] == 3
        assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing aside: the old run was removed
        with pytest.raises(ConfigError, match="is in use by another run"):  # the new directory's lock is held
            RunDir.open(_config(overwrite=True), workdir)
    assert sorted(p.name for p in workdir.iterdir()) == ["config.json"]


def test_an_overwrite_that_cannot_delete_the_old_run_sets_it_aside_and_says_where(tmp_path):
    workdir = tmp_path / "run"
    config = generate_config.get_config("demo")
    config.update(GENERATE)
    generate.run(config, str(workdir))
    # a mount point inside the old run: not removable, whoever runs the test (root included)
    result = in_namespace(f"mkdir {workdir}/images/stuck && mount -t tmpfs tmpfs {workdir}/images/stuck && "
                          f"{command('configs/generate.py:demo', workdir, {**GENERATE, 'seed': 3, 'overwrite': True})}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(".run.replaced-")]
    assert len(aside) == 1, sorted(tmp_path.iterdir())
    warning = [line for line in result.stderr.splitlines() if f"moved aside to {aside[0]}" in line]
    assert len(warning) == 1 and "remove it yourself" in warning[0], result.stderr[-3000:]
    # the workdir holds the new run, complete; the old one is only ever under its hidden name
    assert json.loads((workdir / "config.json").read_text())["seed"] == 3
    assert json.loads((workdir / "result.json").read_text())["stage"] == "generate"
    assert not (workdir / "images" / "stuck").exists()

