"""dtype='auto': what it resolves to per device, that every stage's config defaults to it, that CPUs keep float32
and that 'auto' meaning float16 turns the loop's loss scaling on; the remat switch of the configs."""

import json
import logging
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest

from onepfrac_jax import inference
from onepfrac_jax.config import ConfigError, to_json
from onepfrac_jax.configs import bootstrap as bootstrap_configs
from onepfrac_jax.configs import finetune as finetune_configs
from onepfrac_jax.configs import pretrain as pretrain_configs
from onepfrac_jax.models import DTYPES, auto_dtype, precision, resolve_dtype
from onepfrac_jax.train import classify, loop

CPU = SimpleNamespace(platform="cpu", device_kind="cpu")
V100 = SimpleNamespace(platform="gpu", device_kind="Tesla V100-SXM2-16GB", compute_capability="7.0")
T4 = SimpleNamespace(platform="gpu", device_kind="Tesla T4", compute_capability="7.5")
A100 = SimpleNamespace(platform="gpu", device_kind="NVIDIA A100-SXM4-40GB", compute_capability="8.0")
H100 = SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3", compute_capability="9.0")
P100 = SimpleNamespace(platform="gpu", device_kind="Tesla P100-PCIE-16GB", compute_capability="6.0")
TPU = SimpleNamespace(platform="tpu", device_kind="TPU v4")
UNKNOWN_GPU = SimpleNamespace(platform="gpu", device_kind="some GPU")  # no compute capability

CONFIGS = {"pretrain": lambda: pretrain_configs.get_config("demo"),
           "finetune": lambda: finetune_configs.get_config("digits_demo"),
           "bootstrap": lambda: bootstrap_configs.get_config("digits_demo_joint")}


@pytest.mark.parametrize("devices, expected", [
    ([CPU], "float32"), ([CPU] * 4, "float32"),
    ([V100], "float16"), ([T4], "float16"),
    ([A100], "bfloat16"), ([H100] * 8, "bfloat16"), ([TPU] * 4, "bfloat16"),
    ([P100], "float32"), ([UNKNOWN_GPU], "float32"), ([SimpleNamespace(platform="metal")], "float32"),
    ([A100, V100], "float16"), ([H100, CPU], "float32"),  # mixed: the most cautious pick
])
def test_auto_picks_per_device(devices, expected):
    assert resolve_dtype("auto", devices) == expected
    assert auto_dtype(devices)[0] == expected
    for name in ("float32", "bfloat16", "float16"):  # an explicit dtype stands whatever the devices
        assert resolve_dtype(name, devices) == name


def test_auto_says_what_it_picked_and_why(caplog, monkeypatch):
    monkeypatch.setattr(precision, "_logged", set())
    with caplog.at_level(logging.INFO):
        resolve_dtype("auto", [V100] * 8)
        resolve_dtype("auto", [V100] * 8)  # once per process per outcome
        resolve_dtype("auto", [A100])
        resolve_dtype("float32", [A100])  # an explicit dtype is not logged
    lines = [r.getMessage() for r in caplog.records if "dtype='auto'" in r.getMessage()]
    assert lines == [
        "dtype='auto' → float16: 8 × Tesla V100-SXM2-16GB: compute capability 7.0 has float16 tensor cores but no "
        "bfloat16; dynamic loss scaling",
        "dtype='auto' → bfloat16: NVIDIA A100-SXM4-40GB: compute capability 8.0 ≥ 8.0 has bfloat16 tensor cores"]
    assert "XLA:CPU" in auto_dtype([CPU])[1] and "set dtype explicitly" in auto_dtype([UNKNOWN_GPU])[1]


def test_unknown_dtype_names_are_refused():
    with pytest.raises(ValueError, match="dtype='float64' is not one of auto, float32, bfloat16, float16"):
        resolve_dtype("float64", [CPU])


@pytest.mark.parametrize("stage", sorted(CONFIGS))
def test_every_stage_defaults_to_auto_and_builds_float32_on_cpu(stage):
    """The CPU demos and tests keep computing in float32: 'auto' stays in the config and the ViT is float32."""
    config = CONFIGS[stage]()
    assert (config.dtype, config.remat) == ("auto", False)
    classify.validate_model_fields(config)
    loop.validate_train_config(config, devices=1)  # the loop takes 'auto' as a dtype name
    assert config.dtype == "auto"
    model = classify.build_vit(config, 10)
    assert (model.dtype, model.remat) == (jnp.float32, False)
    config.remat = True
    assert classify.build_vit(config, 10).remat


def test_auto_meaning_float16_is_written_into_the_config_for_loss_scaling(monkeypatch):
    """On a V100 'auto' is validated into 'float16', the name the loop's dynamic loss scaling keys on (and
    config.json then records); on an A100 it stays 'auto' and the ViT computes in bfloat16."""
    config = CONFIGS["pretrain"]()
    monkeypatch.setattr(jax, "devices", lambda *a: [V100] * 8)
    classify.validate_model_fields(config)
    assert config.dtype == "float16" and classify.build_vit(config, 10).dtype == jnp.float16
    config = CONFIGS["finetune"]()
    monkeypatch.setattr(jax, "devices", lambda *a: [A100] * 8)
    classify.validate_model_fields(config)
    assert config.dtype == "auto" and classify.build_vit(config, 10).dtype == jnp.bfloat16


def test_a_saved_config_with_auto_rebuilds_in_float32_on_cpu(tmp_path):
    """inference/export rebuild a run's ViT from its config.json: 'auto' is resolved here (CPU: float32), and a
    config saved before `remat` existed still builds."""
    saved = json.loads(to_json(CONFIGS["finetune"]()))
    del saved["remat"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    model = classify.build_vit(inference.run_config(tmp_path), 10)
    assert (model.dtype, model.remat) == (jnp.float32, False)


@pytest.mark.parametrize("field, value, message", [
    ("dtype", "float64", "dtype='float64' is not one of auto, float32, bfloat16, float16"),
    ("remat", 1, "remat=1 must be True or False"),
])
def test_bad_precision_fields_are_one_config_error(field, value, message):
    config = CONFIGS["bootstrap"]()
    del config[field]  # past ml_collections' type check, as a config built in code can be
    config[field] = value
    with pytest.raises(ConfigError, match=message):
        classify.validate_model_fields(config)


def test_dtype_names():
    assert list(DTYPES) == ["auto", "float32", "bfloat16", "float16"] and DTYPES["auto"] is None
