"""dtype='auto': what it resolves to per device, that every stage's config defaults to it, that CPUs keep float32
and that 'auto' meaning float16 turns the loop's loss scaling on; the remat switch of the configs."""

import json
import logging
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest
from onepfrac_jax.configs import bootstrap as bootstrap_configs
from onepfrac_jax.configs import finetune as finetune_configs
from onepfrac_jax.configs import pretrain as pretrain_configs

from onepfrac_jax.config import ConfigError, to_json
from onepfrac_jax.models import DTYPES, auto_dtype, precision, resolve_dtype
from onepfrac_jax.rundir import read_run_config
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
    model = classify.build_vit(read_run_config(tmp_path), 10)
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


def _probe_that(outcome):
    calls = []

    def probe():
        calls.append(1)
        if outcome is not None:
            raise outcome

    return probe, calls


@pytest.mark.parametrize("devices, dtype, outcome, expected, probed", [
    ([H100] * 8, "bfloat16", None, "cudnn", True),
    ([A100], "float16", None, "cudnn", True),
    ([H100], "bfloat16", NotImplementedError("The head dim must be <= 256"), "xla", True),  # the probe decides
    ([H100], "float32", None, "xla", False),  # cuDNN flash attention has no float32
    ([V100] * 8, "float16", None, "xla", False),  # compute capability 7.0
    ([UNKNOWN_GPU], "bfloat16", None, "xla", False),
    ([CPU] * 4, "float32", None, "xla", False), ([TPU], "bfloat16", None, "xla", False),
    ([H100, CPU], "bfloat16", None, "xla", False),
])
def test_auto_attention_picks_cudnn_only_where_it_runs(devices, dtype, outcome, expected, probed):
    probe, calls = _probe_that(outcome)
    assert precision.resolve_attention("auto", dtype, (197, 12, 64), devices, probe) == expected
    assert bool(calls) == probed
    assert precision.resolve_attention("xla", dtype, (197, 12, 64), devices, probe) == "xla"  # stands for itself
    assert len(calls) == probed  # an explicit name probes nothing


def test_auto_attention_says_why(caplog, monkeypatch):
    monkeypatch.setattr(precision, "_logged", set())
    with caplog.at_level(logging.INFO):
        for _ in range(2):  # once per process per outcome
            precision.resolve_attention("auto", "bfloat16", (197, 12, 64), [H100], _probe_that(None)[0])
        precision.resolve_attention("auto", "bfloat16", (197, 12, 64), [H100],
                                    _probe_that(RuntimeError("cuDNN is not detected.\nmore"))[0])
        precision.resolve_attention("auto", "float16", (197, 12, 64), [V100], _probe_that(None)[0])
    lines = [r.getMessage() for r in caplog.records if "attention='auto'" in r.getMessage()]
    assert lines == [
        "attention='auto' → cudnn: NVIDIA GPUs of compute capability ≥ 8.0; the probe of this shape compiled and "
        "matched XLA's",
        "attention='auto' → xla: the cuDNN probe failed (RuntimeError: cuDNN is not detected.)",
        "attention='auto' → xla: Tesla V100-SXM2-16GB: cuDNN flash attention needs compute capability ≥ 8.0"]


@pytest.mark.parametrize("name, devices, dtype, message", [
    ("flash", [H100], "bfloat16", "attention='flash' is not one of auto, xla, cudnn"),
    ("cudnn", [CPU], "float32", "attention='cudnn' needs NVIDIA GPUs; these devices are cpu"),
    ("cudnn", [TPU], "bfloat16", "attention='cudnn' needs NVIDIA GPUs; these devices are tpu"),
    ("cudnn", [H100], "float32", "attention='cudnn' computes in bfloat16/float16 only; dtype is float32"),
])
def test_attention_values_these_devices_cannot_run_are_refused(name, devices, dtype, message):
    with pytest.raises(ValueError, match=message):
        precision.resolve_attention(name, dtype, (197, 12, 64), devices, _probe_that(None)[0])
    assert precision.resolve_attention("cudnn", "bfloat16", (197, 12, 64), [H100] * 8) == "cudnn"


def test_the_probe_runs_forward_and_backward_and_catches_a_differing_kernel(monkeypatch):
    """XLA against itself passes; cuDNN here (a CPU) fails to run, so 'auto' on a GPU whose cuDNN cannot run the
    shape falls back; a kernel whose output or gradient is off by more than the tolerance fails the probe."""
    precision.attention_probe(17, 2, 8, "bfloat16", candidate="xla")()  # no exception: the two agree
    with pytest.raises((RuntimeError, NotImplementedError, ValueError)):  # jax 0.10: "cuDNN is not detected."
        precision.attention_probe(17, 2, 8, "bfloat16")()
    picked, why = precision.auto_attention("bfloat16", [H100], precision.attention_probe(17, 2, 8, "bfloat16"))
    assert picked == "xla" and why.startswith("the cuDNN probe failed")
    real = jax.nn.dot_product_attention

    def off(q, k, v, implementation=None):  # a 'kernel' 10% off in every output, hence in every gradient
        out = real(q, k, v, implementation="xla")
        return out * 1.1 if implementation == "candidate" else out

    monkeypatch.setattr(jax.nn, "dot_product_attention", off)
    with pytest.raises(ValueError, match=r"candidate's output differs from XLA's by 0\.1"):
        precision.attention_probe(17, 2, 8, "float32", candidate="candidate")()


@pytest.mark.parametrize("stage", sorted(CONFIGS))
def test_every_stage_defaults_to_auto_attention_and_builds_xla_on_cpu(stage):
    config = CONFIGS[stage]()
    assert config.attention == "auto"
    classify.validate_model_fields(config)
    assert classify.build_vit(config, 10).attention_impl == "xla"
    config.attention = "cudnn"
    with pytest.raises(ConfigError, match="attention='cudnn' needs NVIDIA GPUs; these devices are cpu"):
        classify.validate_model_fields(config)
