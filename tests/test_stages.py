"""Pre-train and fine-tune stages end to end on tiny settings: sharding, run directory, exact resume, bad input."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    ROOT,
    TINY_PRETRAIN,
    assert_one_error,
    clean_env,
    csv_rows,
    main_argv,
    make_image_folder,
    run_cli,
    tiny_finetune_config,
)
from onepfrac_jax.configs import pretrain as pretrain_configs

from onepfrac_jax import inference
from onepfrac_jax.config import ConfigError
from onepfrac_jax.data.augment import augment_config, eval_transform
from onepfrac_jax.parallel.mesh import make_data_mesh
from onepfrac_jax.stages import finetune, pretrain
from onepfrac_jax.train import classify
from onepfrac_jax.train.checkpoint import load_variables

pytestmark = pytest.mark.slow  # the fast tier leaves this file out (pyproject.toml, markers)


def pretrain_config(**overrides):
    c = pretrain_configs.get_config("demo")
    c.update({**TINY_PRETRAIN, **overrides})
    return c


def test_pretrain_gives_the_same_losses_on_1_and_4_devices(tiny_pretrain_run, four_device_pretrain_run):
    one = [float(r["loss"]) for r in csv_rows(tiny_pretrain_run / "metrics.csv")]
    four = [float(r["loss"]) for r in csv_rows(four_device_pretrain_run / "metrics.csv")]
    assert len(one) == 4
    np.testing.assert_allclose(four, one, rtol=1e-5)
    a, b = load_variables(tiny_pretrain_run), load_variables(four_device_pretrain_run)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_run_directory_holds_what_it_promises(tiny_pretrain_run):
    names = {p.name for p in tiny_pretrain_run.iterdir()}
    assert {"config.json", "checkpoints", "tensorboard", "metrics.csv", "curves.png", "export"} <= names
    header = (tiny_pretrain_run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["step", "loss", "lr", "images_per_s"]
    assert sorted(p.name for p in (tiny_pretrain_run / "export").iterdir()) == ["config.json", "model.pth",
                                                                          "model.safetensors", "timm.json"]
    meta = json.loads((tiny_pretrain_run / "export" / "timm.json").read_text())
    assert meta["kwargs"]["img_size"] == 16 and meta["kwargs"]["num_classes"] == 8
    assert meta["mean"] == [0.5, 0.5, 0.5]


def test_the_export_loads_in_timm_and_agrees(tiny_pretrain_run):
    timm = pytest.importorskip("timm", reason="timm is installed by requirements-test.txt")
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    meta = json.loads((tiny_pretrain_run / "export" / "timm.json").read_text())
    model = timm.create_model(meta["model_name"], pretrained=False, **meta["kwargs"]).eval()
    model.load_state_dict(load_file(tiny_pretrain_run / "export" / "model.safetensors"), strict=True)
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        theirs = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    config = pretrain_config()
    vit = classify.build_vit(config, 8)
    ours = vit.apply({"params": load_variables(tiny_pretrain_run)["params"]}, jnp.asarray(x))
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_fresh_mode_in_bfloat16(tmp_path):
    """New chaos-game points per sample, bfloat16 compute: trains, with float32 params."""
    pretrain.run(pretrain_config(data_mode="fresh", total_steps=2, dtype="bfloat16"), str(tmp_path / "run"),
                 make_data_mesh(jax.devices()[:2]))
    losses = [float(r["loss"]) for r in csv_rows(tmp_path / "run" / "metrics.csv")]
    assert len(losses) == 2 and all(abs(x - np.log(8)) < 0.5 for x in losses)
    params = load_variables(tmp_path / "run")["params"]
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))


def cli(workdir: Path, overrides: dict) -> list[str]:
    return [sys.executable, *main_argv("configs/pretrain.py:demo", workdir, overrides)]


# long enough (40 steps, 4 checkpoints) that a signal sent at the first checkpoint lands mid-run
SLOW = {**TINY_PRETRAIN, "total_steps": 40, "checkpoint_every_steps": 10, "log_every_steps": 5}


def started(workdir: Path, overrides: dict) -> subprocess.Popen:
    """main.py pre-training in `workdir` (stderr piped), returned once its checkpoint at step 10 is written."""
    proc = subprocess.Popen(cli(workdir, overrides), cwd=ROOT, env=clean_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (workdir / "checkpoints" / "10").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    return proc


def checkpoint_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_exact_resume_after_sigkill(tmp_path):
    reference = run_cli("configs/pretrain.py:demo", tmp_path / "a", SLOW, timeout=600)
    assert reference.returncode == 0, reference.stderr[-2000:]
    # a run that goes well logs no warning or error line (absl's W/E prefix): one would be noise in every run
    assert not re.findall(r"^[WE]\d{4} .*", reference.stderr, re.MULTILINE)
    proc = started(tmp_path / "b", SLOW)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (tmp_path / "b" / "checkpoints" / "40").exists(), "the run finished before it could be killed"
    resumed = run_cli("configs/pretrain.py:demo", tmp_path / "b", SLOW, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    a, b = load_variables(tmp_path / "a"), load_variables(tmp_path / "b")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    steps = [int(r["step"]) for r in csv_rows(tmp_path / "b" / "metrics.csv")]
    assert steps == sorted(set(steps)) and steps[-1] == 40  # no duplicated rows after the resume


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    proc = started(tmp_path / "run", SLOW)  # SLOW's programs, compiled once for this file's runs
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    said = re.search(r"SIGTERM: saved a checkpoint at step (\d+)", stderr)
    assert said, stderr[-2000:]
    steps = checkpoint_steps(tmp_path / "run")
    assert steps[-1] == int(said.group(1)) and 10 <= steps[-1] < 40
    assert json.loads((tmp_path / "run" / "result.json").read_text())["stopped"] is True


def test_ctrl_c_saves_a_checkpoint_exits_130_and_the_same_command_resumes(tmp_path):
    """SIGINT does what SIGTERM does (stop at a step boundary, checkpoint there), in one line and exit code 130."""
    workdir = tmp_path / "run"
    proc = started(workdir, SLOW)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    line = assert_one_error(subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr), 130,
                            f"saved in {workdir / 'checkpoints'}; run the same command again to resume")
    step = int(re.search(r"interrupted \(Ctrl-C\) at step (\d+) of 40", line).group(1))
    assert 10 <= step < 40 and checkpoint_steps(workdir)[-1] == step
    assert json.loads((workdir / "result.json").read_text())["stopped"] is True
    assert not (workdir / "export").exists() and not (workdir / ".lock").exists()
    resumed = run_cli("configs/pretrain.py:demo", workdir, SLOW, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert re.search(rf"resumed from \S+ at step {step}\b", resumed.stderr), resumed.stderr[-2000:]
    result = json.loads((workdir / "result.json").read_text())
    assert result["stopped"] is False and result["step"] == 40 and (workdir / "export" / "model.safetensors").exists()


def test_a_second_ctrl_c_exits_at_once_and_the_checkpoints_stay_usable(tmp_path):
    """The second Ctrl-C kills the process (the default action), likely while the checkpoint of every step is being
    written: Orbax's write-then-rename keeps the ones before it usable, and the same command resumes and finishes."""
    workdir = tmp_path / "run"
    proc = started(workdir, {**SLOW, "checkpoint_every_steps": 1})
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)  # the first one's handler has run (it rearms the default action) unless the step is still busy
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode in (-signal.SIGINT, 130) and "Traceback" not in stderr, stderr[-2000:]
    assert checkpoint_steps(workdir)[-1] < 40, "the run finished before it was interrupted"
    resumed = run_cli("configs/pretrain.py:demo", workdir, {**SLOW, "checkpoint_every_steps": 1}, timeout=600)
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-2000:]
    assert json.loads((workdir / "result.json").read_text())["step"] == 40


def test_finetune_from_a_pretrain_run_on_an_image_folder(four_device_finetune_run, image_folder):
    workdir = four_device_finetune_run  # from tiny_pretrain_run, on 4 devices: tiny_finetune_config's run
    rows = csv_rows(workdir / "metrics.csv")
    assert [r["step"] for r in rows if r["val_top1"]] == ["3", "6"]  # one epoch = 3 steps of 8 from 24 images
    result = json.loads((workdir / "result.json").read_text())
    assert result["val_top1_final"] == pytest.approx(float(rows[-1]["val_top1"]), rel=1e-5)
    assert [h["step"] for h in result["history"]] == [3, 6]
    tuned = load_variables(workdir)["params"]
    assert tuned["head"]["kernel"].shape == (32, 3)  # the 8-class head was replaced
    # inference.load serves the run: the same logits as the model on the eval transform
    predict = inference.load(workdir)
    images = np.random.default_rng(1).integers(0, 255, (3, 20, 20, 3), dtype=np.uint8)
    config = tiny_finetune_config(image_folder)
    model = classify.build_vit(config, 3)
    expected = model.apply({"params": tuned}, eval_transform(augment_config(config.augment), jnp.asarray(images)))
    np.testing.assert_allclose(predict(images), expected, atol=1e-5)


def test_finetune_bad_input(tiny_pretrain_run, tmp_path):
    make_image_folder(tmp_path / "data")
    with pytest.raises(ConfigError, match=r"does not exist"):
        finetune.run(tiny_finetune_config(tmp_path / "missing"), str(tmp_path / "a"))
    with pytest.raises(ConfigError, match=r"cifar"):
        finetune.run(tiny_finetune_config(tmp_path / "data", data={"name": "cifar"}), str(tmp_path / "b"))
    # a checkpoint of another architecture: the error lists the mismatched keys
    with pytest.raises(ConfigError, match=r"init_from=.* does not fit ViT\(.*wrong shape \(17\): "
                                          r"blocks.0.attn.proj.bias checkpoint \(32,\) vs model \(48,\)"):
        finetune.run(tiny_finetune_config(tmp_path / "data", init_from=str(tiny_pretrain_run), depth=2, embed_dim=48),
                     str(tmp_path / "c"))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"empty|no class"):
        finetune.run(tiny_finetune_config(tmp_path / "empty"), str(tmp_path / "d"))
    for name in ("a", "b", "c", "d"):
        assert not (tmp_path / name).exists()


def test_a_corrupt_image_is_named_before_the_first_step(tmp_path):
    make_image_folder(tmp_path / "data")
    bad = tmp_path / "data" / "train" / "class_1" / "3.png"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(ConfigError, match=r"1 of 24 images under .* cannot be decoded: .*class_1/3\.png"):
        finetune.run(tiny_finetune_config(tmp_path / "data"), str(tmp_path / "run"), make_data_mesh(jax.devices()[:1]))
    assert not (tmp_path / "run").exists()  # found at start-up, before the run directory was written


def test_main_reports_a_non_finite_loss_with_exit_code_3(tmp_path):
    result = run_cli("configs/pretrain.py:demo", tmp_path / "run",
                     {**TINY_PRETRAIN, "optim.lr": 1e30, "total_steps": 6, "checkpoint_every_steps": 3}, timeout=300)
    line = assert_one_error(result, 3, "error: loss is nan")
    assert "no checkpoint yet" in line
