"""The export stage: any kept checkpoint of a run → WORKDIR/export/, what the run writes to its export/, while it
trains, from any topology; the folder loads in one line with timm's `local-dir:`.

One reference pre-train (a subprocess, as main.py runs it) serves the pre-train tests but the 2-process one, which
exports conftest's 2-process `pretrain_runs`; the test that exports while a run trains starts a twin of the reference
and compares the two at the end. The bootstrap test exports conftest's `shared_bootstrap_run`.
"""

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import timm
import torch
from conftest import ROOT, TINY_PRETRAIN, assert_one_error, clean_env, csv_rows, main_argv, tiny_bootstrap_config
from onepfrac_jax.configs import export as export_configs
from safetensors import safe_open

from onepfrac_jax import inference
from onepfrac_jax.config import ConfigError
from onepfrac_jax.data.augment import augment_config, eval_transform
from onepfrac_jax.rundir import read_run_config
from onepfrac_jax.stages import export as export_stage
from onepfrac_jax.train import classify, pair
from onepfrac_jax.train.checkpoint import load_variables, read_checkpoint

pytestmark = pytest.mark.slow  # the fast tier leaves this file out (pyproject.toml, markers)

# 40 steps, a checkpoint every 4, the last 2 kept: a second or two of training during which checkpoints appear and
# vanish (and a dozen exports are taken);
# a constant learning rate after the warm-up (cosine from lr to min_lr = lr), so the last steps still move weights.
RUN = {**TINY_PRETRAIN, "total_steps": 40, "checkpoint_every_steps": 4, "keep_checkpoints": 2,
       "log_every_steps": 10, "optim.min_lr": 1e-3}
KEPT = [36, 40]
EXPORT_FILES = ["config.json", "model.pth", "model.safetensors", "timm.json"]
TIMEOUT = 300


class Started:
    """A pre-train run of main.py started in the background; `finished()` waits for it (exit 0) and returns its dir."""

    def __init__(self, workdir: Path, overrides: dict):
        self.workdir = workdir
        self.log = workdir.with_name(workdir.name + ".log")
        with self.log.open("w") as log:
            self.proc = subprocess.Popen([sys.executable, *main_argv("configs/pretrain.py:demo", workdir, overrides)],
                                         cwd=ROOT, env=clean_env(), stdout=log, stderr=subprocess.STDOUT)

    def finished(self) -> Path:
        assert self.proc.wait(timeout=TIMEOUT) == 0, self.log.read_text()[-3000:]
        return self.workdir

    def wait_until_training(self) -> None:
        """Returns once the run has logged a step (its programs compiled and in the session's cache) or has ended."""
        deadline = time.monotonic() + TIMEOUT
        while not re.search(r"\] step \d+/", self.log.read_text()) and self.proc.poll() is None:
            assert time.monotonic() < deadline, f"no step logged after {TIMEOUT} s"
            time.sleep(0.05)

    def wait_for(self, path: Path) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not path.exists():
            assert self.proc.poll() is None, f"the run ended before {path} appeared:\n{self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {path} after {TIMEOUT} s"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Started:
    """Started at once and waited for only where a test needs it finished, so it trains beside the twin run (which
    starts once the reference has compiled, and reads its programs from the cache)."""
    started = Started(tmp_path_factory.mktemp("reference") / "run", RUN)
    yield started
    started.proc.kill()
    started.proc.wait()


def export(run: Path | str, out: Path, step: int = -1):
    config = export_configs.get_config()
    config.update({"run": str(run), "step": step})
    return export_stage.run(config, str(out))


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root`: relative path → (size, mtime_ns)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def same_bytes(a: Path, b: Path, names: list[str]) -> bool:
    return all((a / name).read_bytes() == (b / name).read_bytes() for name in names)


def agent_file(export_dir: Path) -> tuple[dict, dict]:
    """agent.safetensors' metadata and its tensors as bytes."""
    path = export_dir / "agent.safetensors"
    with safe_open(path, "np") as f:
        metadata = f.metadata()
    return metadata, {k: v.tobytes() for k, v in safetensors.numpy.load_file(path).items()}


def run_all(argvs: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """main.py with each argv (after `python`), all at once; each one's result, in order."""
    procs = [subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for argv in argvs]
    outputs = [p.communicate(timeout=TIMEOUT) for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, *out) for p, out in zip(procs, outputs, strict=True)]


def timm_net(export_dir: Path) -> torch.nn.Module:
    """The exported ViT in real timm, its state dict loaded with strict keys."""
    meta = json.loads((export_dir / "timm.json").read_text())
    net = timm.create_model(meta["model_name"], pretrained=False, **meta["kwargs"]).eval()
    net.load_state_dict(torch.load(export_dir / "model.pth", weights_only=True), strict=True)
    return net


def local_dir_net(export_dir: Path) -> torch.nn.Module:
    """The exported ViT as timm loads a Hub folder, in one line (config.json + model.safetensors, strict keys)."""
    return timm.create_model(f"local-dir:{export_dir}", pretrained=True).eval()


def timm_logits(net: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)).numpy()


# --------------------------------------------------------------------------------------------- while training

def test_exporting_while_the_run_trains_leaves_its_result_bitwise_unchanged(reference, tmp_path):
    reference.wait_until_training()  # the twin then reads the reference's compiled programs from the cache
    twin = Started(tmp_path / "run", RUN)
    twin.wait_for(twin.workdir / "checkpoints" / "4")
    exports = []  # (exported step, whether the run was still training when the export had been written)
    while twin.proc.poll() is None:
        result = export(twin.workdir, tmp_path / f"out_{len(exports)}")
        exports.append((result.step, twin.proc.poll() is None))
        safetensors.numpy.load_file(result.files["safetensors"])  # whole: no torn checkpoint was read
        assert Path(result.files["safetensors"]).parent == tmp_path / f"out_{len(exports) - 1}" / "export"
    during = [step for step, training in exports if training]
    # the run held its lock throughout and was neither blocked nor refused: it ran to its end, exit 0
    assert len(during) >= 2 and during == sorted(during), exports
    mine, theirs = twin.finished(), reference.finished()
    curves = lambda w: [(r["step"], r["loss"], r["lr"]) for r in csv_rows(w / "metrics.csv")]
    assert curves(mine) == curves(theirs) and len(curves(mine)) == 4
    for x, y in zip(jax.tree.leaves(load_variables(mine)), jax.tree.leaves(load_variables(theirs)), strict=True):
        np.testing.assert_array_equal(x, y)
    assert same_bytes(mine / "export", theirs / "export", EXPORT_FILES)
    result = lambda w: {k: v for k, v in json.loads((w / "result.json").read_text()).items() if k != "files"}
    assert result(mine) == result(theirs)
    # nothing was written into the run: the same entries as the twin that nobody exported from
    entries = lambda w: sorted(str(p.relative_to(w)) for p in [*w.iterdir(), *(w / "checkpoints").iterdir()])
    assert entries(mine) == entries(theirs)


# ------------------------------------------------------------------------------------------ any kept step

def test_an_intermediate_step_loads_in_timm_with_that_steps_logits(reference, tmp_path):
    source = reference.finished()
    before = snapshot(source)
    mid, last = export(source, tmp_path / "mid", step=KEPT[0]), export(source, tmp_path / "last")
    assert (mid.step, last.step) == (KEPT[0], KEPT[1])
    assert snapshot(source) == before  # never writes into the run
    # the latest step's export/ is exactly what the run wrote to its export/, beside the stage's own two files
    assert sorted(p.name for p in (tmp_path / "last").iterdir()) == ["config.json", "export", "result.json"]
    assert sorted(p.name for p in (tmp_path / "last" / "export").iterdir()) == EXPORT_FILES
    assert same_bytes(tmp_path / "last" / "export", source / "export", EXPORT_FILES)
    assert set(mid.files) == {"safetensors", "config", "pth", "json"}
    # the workdir is a run directory with an export/, so it serves as a fine-tune's init_from like a run
    assert classify.init_weights_path(str(tmp_path / "mid")) == tmp_path / "mid" / "export" / "model.safetensors"

    images = np.random.default_rng(0).integers(0, 256, (4, 24, 20, 3), dtype=np.uint8)
    ours = inference.load(source, step=KEPT[0])(images)
    x = eval_transform(augment_config(read_run_config(source).augment), jnp.asarray(images))
    for load in (timm_net, local_dir_net):
        np.testing.assert_allclose(timm_logits(load(tmp_path / "mid" / "export"), x), ours, rtol=0, atol=1e-4)
    assert np.abs(ours).max() > 0.1
    # ... and they are not the final step's
    final = inference.load(source)(images)
    np.testing.assert_allclose(timm_logits(local_dir_net(tmp_path / "last" / "export"), x), final, rtol=0, atol=1e-4)
    assert np.abs(final - ours).max() > 1e-3
    a = safetensors.numpy.load_file(tmp_path / "mid" / "export" / "model.safetensors")
    b = safetensors.numpy.load_file(tmp_path / "last" / "export" / "model.safetensors")
    assert a.keys() == b.keys() and any(np.abs(a[k] - b[k]).max() > 1e-4 for k in a)


def test_a_checkpoint_being_written_or_damaged_is_never_read(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference.finished(), run)
    checkpoints = run / "checkpoints"
    # how Orbax writes step 44: a temporary folder, renamed when complete
    shutil.copytree(checkpoints / "40", checkpoints / "44.orbax-checkpoint-tmp-1764660000")
    step, _, _ = read_checkpoint(run)
    assert step == 40
    with pytest.raises(ConfigError, match=r"keeps no checkpoint at step 44; the kept steps: 36, 40$"):
        read_checkpoint(run, 44)
    for data in (checkpoints / "40" / "state").rglob("d/*"):  # truncated arrays
        data.write_bytes(data.read_bytes()[:7])
    before = snapshot(run)
    with pytest.raises(ConfigError, match=r"the checkpoint at step 40 in .* cannot be read"):
        read_checkpoint(run, 40)
    assert read_checkpoint(run)[0] == 36  # the latest readable; reported, not set aside as a resume does
    assert snapshot(run) == before


def test_bad_input_is_one_error_line_and_writes_nothing(reference, tmp_path):
    source = reference.finished()
    before = snapshot(source)
    (tmp_path / "not_a_run").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    export(source, tmp_path / "earlier")
    cases = {
        "not_a_run": ({"run": tmp_path / "not_a_run"}, tmp_path / "a", "is not a run directory"),
        "step": ({"run": source, "step": 7}, tmp_path / "b",
                 f"{source} keeps no checkpoint at step 7; the kept steps: 36, 40"),
        "full": ({"run": source}, tmp_path / "full", "is not empty and holds no run of this project"),
        "earlier": ({"run": source}, tmp_path / "earlier", "already holds an export run; pass --config.overwrite"),
        "nested": ({"run": source, "overwrite": True}, source / "export", "export never writes into the run"),
    }
    results = run_all([main_argv("configs/export.py", out, overrides) for overrides, out, _ in cases.values()])
    for (_, _, needle), result in zip(cases.values(), results, strict=True):
        assert_one_error(result, 2, needle)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["notes.txt"]
    assert snapshot(source) == before
    with pytest.raises(ConfigError, match="run is empty"):
        export("", tmp_path / "c")
    with pytest.raises(ConfigError, match="is a generate run, which has no checkpoints"):
        (tmp_path / "gen").mkdir()
        (tmp_path / "gen" / "config.json").write_text(json.dumps({"stage": "generate"}))
        export(tmp_path / "gen", tmp_path / "d")


# ------------------------------------------------------------------------------------------------ bootstrap

def test_a_shared_bootstrap_run_exports_its_vit_and_materialised_agent(shared_bootstrap_run, tmp_path):
    source = shared_bootstrap_run  # checkpoints at steps 15 and 30, evaluated at 30
    last, first = export(source, tmp_path / "last"), export(source, tmp_path / "first", step=15)
    assert set(last.files) == {"safetensors", "config", "pth", "json", "agent"}
    assert same_bytes(tmp_path / "last" / "export", source / "export", ["agent.pth", *EXPORT_FILES])
    # agent.safetensors: the same tensors and metadata (safetensors orders its metadata keys at random, so not bytes)
    assert agent_file(tmp_path / "last" / "export") == agent_file(source / "export")
    assert agent_file(tmp_path / "first" / "export")[1] != agent_file(source / "export")[1]
    # the ViT loads in one line from timm's local-dir: and gives the run's ViT logits
    x = np.random.default_rng(2).normal(size=(2, 16, 16, 3)).astype(np.float32)
    vit, _ = pair.build_models(tiny_bootstrap_config("shared"), 10)
    ours = vit.apply({"params": load_variables(source)["params"]["vit"]}, jnp.asarray(x))
    assert np.abs(ours).max() > 0.1
    np.testing.assert_allclose(timm_logits(local_dir_net(source / "export"), x), ours, rtol=0, atol=1e-4)
    # the evaluations saved with the checkpoint, up to the exported step
    assert [row["step"] for row in last.history] == [30] and first.history == []
    assert classify.head_classes(load_variables(source, 15)["params"]["vit"]) == 10


# ----------------------------------------------------------------------------------------- 2 processes x 2

@pytest.mark.multiprocess
def test_a_checkpoint_of_2_processes_of_2_devices_exports_on_1_process(pretrain_runs, tmp_path):
    source = pretrain_runs["2x2"]
    # one process of one CPU device each (main.py's default), the two exports at once
    results = run_all([main_argv("configs/export.py", tmp_path / f"out_{step}", {"run": source, "step": step})
                       for step in (2, 4)])
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
        assert "process 0 of 1: 1 local devices" in result.stderr
    assert same_bytes(tmp_path / "out_4" / "export", source / "export", EXPORT_FILES)  # its process 0's, at the end
    x = np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype(np.float32)
    params = load_variables(source, 2)["params"]
    ours = classify.build_vit(read_run_config(source), 8).apply({"params": params}, jnp.asarray(x))
    np.testing.assert_allclose(timm_logits(timm_net(tmp_path / "out_2" / "export"), x), ours, rtol=0, atol=1e-4)
