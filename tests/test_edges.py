"""At the edges (issue 24): inputs that are not regular files, values past what the machine represents, and a bad
value refused within seconds. Each is one `error:` line, exit 2, with nothing written."""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import socket
import time
from pathlib import Path

import jax
import pytest
from conftest import TINY_MODEL, assert_one_error, make_image_folder, run_cli

from onepfrac_jax.config import ConfigError, apply_overrides, require_path
from onepfrac_jax.data.sources import ImageFolderSource
from onepfrac_jax.fractals import bank
from onepfrac_jax.fractals.bank import BankSpec, build_bank, classes_per_device
from onepfrac_jax.parallel.mesh import make_data_mesh
from onepfrac_jax.rundir import RunDir

HUGE = 2**70  # wider than 64 bits
LONG_NAME = "x" * 300  # past the 255 bytes a name may have on Linux filesystems


def config_of(stage: str, variant: str | None, overrides: dict):
    """configs/<stage>.py[:variant] with `overrides` (dotted keys)."""
    module = importlib.import_module(f"onepfrac_jax.configs.{stage}")
    config = module.get_config(variant) if variant else module.get_config()
    return apply_overrides(config, overrides)


def validate(stage: str, variant: str | None, overrides: dict) -> None:
    importlib.import_module(f"onepfrac_jax.stages.{stage}").validate(config_of(stage, variant, overrides))


# ------------------------------------------------------------------------------------- inputs that are not files


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _socket(path: Path) -> None:
    with contextlib.chdir(path.parent), socket.socket(socket.AF_UNIX) as sock:
        sock.bind(path.name)  # relative: an AF_UNIX address holds ~100 bytes; the socket file stays


def _broken_link(path: Path) -> None:
    path.symlink_to(path.parent / "missing.png")


@pytest.mark.parametrize(("make", "kind"), [(_fifo, "is a FIFO"), (_socket, "is a socket"),
                                            (_broken_link, "cannot be read")])
def test_an_image_folder_entry_that_is_no_regular_file_is_refused_when_listed(tmp_path, make, kind):
    make_image_folder(tmp_path)
    odd = tmp_path / "train" / "class_1" / "odd.png"
    make(odd)
    (tmp_path / "train" / "class_2" / "linked.png").symlink_to(tmp_path / "train" / "class_0" / "0.png")
    with pytest.raises(ConfigError, match=rf"ImageFolder file {odd} {kind}"):
        ImageFolderSource(tmp_path / "train", 16)
    odd.unlink()
    source = ImageFolderSource(tmp_path / "train", 16)  # a symlink to an image is an image
    assert tmp_path / "train" / "class_2" / "linked.png" in source.paths


@pytest.mark.slow
def test_a_fifo_in_an_image_folder_is_one_error_line_not_a_hang(tmp_path):
    make_image_folder(tmp_path / "data")
    os.mkfifo(tmp_path / "data" / "train" / "class_1" / "pipe.png")
    workdir = tmp_path / "run"
    start = time.perf_counter()
    result = run_cli("configs/finetune.py:imagefolder", workdir,
                     {"data.data_dir": tmp_path / "data", "data.image_size": 16, "image_size": 16, "batch_size": 8,
                      **TINY_MODEL},
                     timeout=120)  # before the fix: the start-up check waits on the FIFO for ever
    assert_one_error(result, 2, f"{tmp_path / 'data' / 'train' / 'class_1' / 'pipe.png'} is a FIFO")
    assert time.perf_counter() - start < 60
    assert not workdir.exists()


def test_init_from_a_fifo_is_refused_before_it_is_read(tmp_path):
    from onepfrac_jax.train.classify import init_weights_path

    os.mkfifo(tmp_path / "model.safetensors")
    with pytest.raises(ConfigError, match=r"model.safetensors is not a regular file \(a FIFO"):
        init_weights_path(str(tmp_path / "model.safetensors"))
    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / "config.json")  # init_from=RUN reads RUN/config.json
    with pytest.raises(ConfigError, match=r"config.json is not a regular file"):
        init_weights_path(str(run))


# ------------------------------------------------------------------------------------- values past the machine


@pytest.mark.parametrize(("stage", "variant", "overrides", "message"), [
    ("generate", "demo", {"seed": HUGE}, f"seed={HUGE} must lie in [0, 4,294,967,295]"),
    ("generate", "demo", {"seed": -1}, "seed=-1 must lie in [0, 4,294,967,295]"),
    ("generate", "demo", {"image_size": 100_000}, "image_size=100000 must be ≤ 46,340"),
    ("generate", "demo", {"num_classes": 21_000, "image_size": 40_000}, "needs 30.6 TiB on the host that writes it"),
    ("generate", "demo_fractaldb", {"num_classes": 100_000_000}, "bank rows, past the 2,147,483,647"),
    ("generate", "demo", {"perturbation": "additive", "delta": math.inf}, "delta=inf must be a finite number"),
    ("generate", "demo", {"classes_per_call": HUGE}, f"classes_per_call={HUGE} must lie in [0, 2,147,483,647]"),
    ("pretrain", "demo", {"fractal_seed": HUGE}, f"fractal_seed={HUGE} must lie in [0, 4,294,967,295]"),
    ("pretrain", "demo", {"seed": HUGE}, f"seed={HUGE} must be an integer in [0, 4,294,967,295]"),
    ("pretrain", "demo", {"render_size": 100_000}, "render_size=100000 must be ≤ 46,340"),
    ("pretrain", "demo", {"total_steps": 2**40}, "total_steps=1099511627776 must be an integer in [-1, 2,147"),
    ("pretrain", "demo", {"embed_dim": HUGE}, f"embed_dim={HUGE} must be an integer in [-1, 2,147,483,647]"),
    ("finetune", "digits_demo", {"image_size": 100_000}, "image_size=100000 must be an integer in [1, 46,340]"),
    ("finetune", "digits_demo", {"data.image_size": 100_000}, "data.image_size=100000 must be an integer"),
    ("finetune", "digits_demo", {"batch_size": 2**40}, "batch_size=1099511627776 must be an integer"),
    ("finetune", "digits_demo", {"optim.lr": math.inf}, "optim.lr=inf must be a finite number"),
    ("finetune", "digits_demo", {"optim.warmup_steps": 2**40}, "optim.warmup_steps=1099511627776 must be"),
    ("finetune", "digits_demo", {"optim.b2": 1.0}, "optim.b2=1.0 must lie in [0, 1)"),
    ("finetune", "digits_demo", {"init_from": f"/tmp/{LONG_NAME}"}, "init_from: the name xxx"),
    ("finetune", "digits_demo", {"data.data_dir": "/tmp/" + "y/" * 3000}, "a path may have here"),
    ("bootstrap", "digits_demo_joint", {"ema_decay": 0.5}, "bootstrap runs keep no EMA"),
    ("bootstrap", "digits_demo_joint", {"seed": HUGE}, f"seed={HUGE} must be an integer"),
    ("evaluate", "digits_demo", {"init_from": "x", "step": HUGE}, f"step={HUGE} must be an integer in [-1"),
    ("evaluate", "digits_demo", {"init_from": "x", "batch_size": 2**40}, "batch_size=1099511627776 must be an"),
    ("linear_probe", "digits_demo", {"init_from": "x", "seed": HUGE}, f"seed={HUGE} must be an integer"),
    ("linear_probe", "digits_demo", {"init_from": "x", "probe.epochs": 2**40}, "probe.epochs=1099511627776 must"),
    ("export", None, {"run": "x", "step": HUGE}, f"step={HUGE} must be an integer in [-1"),
    ("export", None, {"run": LONG_NAME}, "run: the name xxx"),
    ("demo", None, {"seed": HUGE}, f"seed={HUGE} must"),
])
def test_every_stage_refuses_values_past_the_machine_in_validate(stage, variant, overrides, message):
    with pytest.raises(ConfigError) as refused:
        validate(stage, variant, overrides)
    assert message in str(refused.value)


def test_a_workdir_name_too_long_for_the_filesystem_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=rf"--workdir: the name x+… is 300 bytes long, past the "
                                          rf"{os.pathconf(tmp_path, 'PC_NAME_MAX')} a name may have"):
        RunDir.open(config_of("generate", "demo", {}), tmp_path / LONG_NAME / "run")
    assert list(tmp_path.iterdir()) == []
    require_path("a path", tmp_path / ("x" * 200) / "run")  # long, within the limits


def test_a_bank_that_cannot_fit_on_the_devices_is_refused_before_rendering(monkeypatch):
    spec = BankSpec(num_classes=64, image_size=256, num_points=2000)  # 4 MiB; the devices get 1 MiB here
    monkeypatch.setattr(bank, "device_memory_bytes", lambda mesh: 2**20, raising=False)  # raising: before the fix
    with pytest.raises(ConfigError, match=r"the bank of 64 classes at 256² needs 5.2 MiB on each of the 1 "
                                          r"devices, which has 1.0 MiB: lower the image size or num_classes"):
        build_bank(spec, make_data_mesh(jax.devices()[:1]))


def test_a_render_call_keeps_its_pixels_indexable_in_int32():
    mesh = make_data_mesh(jax.devices()[:1])
    assert classes_per_device(64, mesh, 8192) == 31  # 31 · 8192² < 2³¹ ≤ 32 · 8192²
    assert classes_per_device(0, mesh, 46_340) == 1
    assert classes_per_device(0, mesh, 512) == 4  # CPUs' 4 a call, untouched below the bound


@pytest.mark.slow
@pytest.mark.parametrize(("config", "overrides", "workdir", "message"), [
    ("configs/generate.py:demo", {"seed": HUGE}, "run", f"seed={HUGE} must lie in [0, 4,294,967,295]"),
    ("configs/pretrain.py:demo", {"render_size": 100_000}, "run", "render_size=100000 must be ≤ 46,340"),
    ("configs/generate.py:demo", {}, f"{LONG_NAME}/run", "is 300 bytes long"),
])
def test_a_value_past_the_machine_is_one_error_line_on_the_command_line(tmp_path, config, overrides, workdir,
                                                                          message):
    result = run_cli(config, tmp_path / workdir, overrides, timeout=120)
    assert_one_error(result, 2, message)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.timed
def test_a_bad_training_value_is_refused_within_five_seconds(tmp_path):
    start = time.perf_counter()
    result = run_cli("configs/bootstrap.py:digits_demo_joint", tmp_path / "run", {"ema_decay": 0.5}, timeout=120)
    elapsed = time.perf_counter() - start
    assert_one_error(result, 2, "ema_decay=0.5: bootstrap runs keep no EMA")
    assert elapsed < 5, f"{elapsed:.1f} s to the error line"
    assert not (tmp_path / "run").exists()
