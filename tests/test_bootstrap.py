"""The bootstrapping stage: configs, bad input, gradient routing per mode, the hint decay, short runs on digits.

The loss terms' hand values live in test_losses.py; here the stage wires them to the models and the loop.
"""

import csv
import dataclasses
import functools
import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import BOOTSTRAP_DEPTH, BOOTSTRAP_DIM
from conftest import tiny_bootstrap_config as tiny_config
from onepfrac_jax.configs import bootstrap as bootstrap_config
from safetensors import safe_open

from onepfrac_jax.config import ConfigError
from onepfrac_jax.data import pipeline
from onepfrac_jax.data.sources import DigitsSource
from onepfrac_jax.models.agent import SharedAgent
from onepfrac_jax.models.vit import create_vit
from onepfrac_jax.parallel.mesh import data_sharding, make_data_mesh
from onepfrac_jax.stages import bootstrap
from onepfrac_jax.train import checkpoint, classify, loop, pair
from onepfrac_jax.train.losses import BootstrapLossWeights

pytestmark = pytest.mark.slow  # the fast tier leaves this file out (pyproject.toml, markers)


@functools.cache
def _sources(image_size=16):
    return DigitsSource("train", image_size), DigitsSource("val", image_size)


def _task(config):
    """The stage's path to its Task: validate, then pair.build_task over host data."""
    bootstrap.validate(config)
    data = pipeline.HostData(*_sources(config.data.image_size), config.data, config.seed, config.batch_size,
                             data_sharding(make_data_mesh()))
    return pair.build_task(config, data)


def _batch_item(batch=32, size=16, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": jnp.asarray(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)),
            "label": jnp.asarray(rng.integers(0, 10, batch), jnp.int32),
            "index": jnp.arange(batch, dtype=jnp.int32)}


def _batch(batch=32, size=16, classes=10, seed=0):
    """A training batch as make_batch leaves it, drawn directly (no augmentation to compile)."""
    rng = np.random.default_rng(seed)
    return {"image": jnp.asarray(rng.standard_normal((batch, size, size, 3)), jnp.float32),
            "target": jax.nn.one_hot(rng.integers(0, classes, batch), classes),
            "decay": jnp.float32(0.75)}


# The terms whose gradients the tests inspect; 'step' is the scalar the train step differentiates.
GRADIENTS = {"joint": ("step", "loss_vit", "loss_cnn", "kd_vit", "kd_cnn", "hint"),
             "shared": ("ce_vit", "ce_cnn", "kd_cnn", "hint")}


def _step(mode):
    """One jitted program: every loss term's gradient w.r.t. all params, the loss, the metrics, the new extra."""
    config = tiny_config(mode)
    task, _, _ = _task(config)
    # the initial state as the stage's run builds it: bootstrap_run's init program, read from the compilation cache
    mesh = make_data_mesh()
    tx = loop.jit_train_step(task, config, mesh, config.total_steps)[1]
    state = loop.init_state(task, tx, config.seed, mesh)
    params, extra = state.params, {"batch_stats": state.extra["batch_stats"]}
    names = GRADIENTS[mode]

    def term(p, name):
        loss, (metrics, _) = task.loss_fn(p, extra, _batch(), jax.random.key(2))
        return loss if name == "step" else metrics[name]

    # One jax.grad per term rather than jax.jacrev: on XLA CPU (jaxlib 0.10.2) jit(jacrev) with 8 output rows
    # mixes rows through the hint's LayerNorm, while plain gradients are exact.
    def everything(p):
        loss, (metrics, new_extra) = task.loss_fn(p, extra, _batch(), jax.random.key(2))
        return loss, metrics, new_extra, {name: jax.grad(term)(p, name) for name in names}

    loss, metrics, new_extra, grads = jax.jit(everything)(params)
    return SimpleNamespace(task=task, params=params, extra=extra, loss=loss, metrics=metrics, new_extra=new_extra,
                           grads=grads)


# Module fixtures, so that conftest's scheduler sends the tests of one mode to one worker: each program is compiled
# once (a process-wide cache would compile it again on the other worker).
@pytest.fixture(scope="module")
def joint_step():
    return _step("joint")


@pytest.fixture(scope="module")
def shared_step():
    return _step("shared")


def _sum(grads, *names):
    return jax.tree.map(lambda *g: sum(g), *(grads[n] for n in names))


def _is_zero(tree) -> bool:
    return all(bool(jnp.all(leaf == 0)) for leaf in jax.tree.leaves(tree))


def _norm(tree) -> float:
    return float(sum(jnp.abs(leaf).sum() for leaf in jax.tree.leaves(tree)))


# ------------------------------------------------------------------------------------------------ configs


def test_variants_pair_the_papers_models_with_the_modes_weights():
    for variant in [v for v in bootstrap_config.VARIANTS if not v.endswith("_alone")]:  # baselines: test_experiments
        c = bootstrap_config.get_config(variant)
        assert c.stage == "bootstrap" and c.mode == variant.rsplit("_", 1)[1]
        paper = pair.PAPER_WEIGHTS[c.mode]
        # the digits demos divide the hint weight by 10 (docs/stages.md, "bootstrap")
        want = dataclasses.replace(paper, hint=paper.hint / 10) if variant.startswith("digits_demo") else paper
        assert pair.loss_weights(c) == want
        assert c.loss.temperature == 4.0 and pair.hint_layers(c) is None
        if variant.startswith("cifar100"):
            assert (c.augment.crop, c.augment.pad, c.augment.hflip, c.augment.size) == ("pad_crop", 4, 0.5, 224)
            assert (c.batch_size, c.num_epochs, c.optim.lr, c.optim.warmup_epochs) == (64, 240, 1e-3, 0)
    # The paper-size pairs, shapes only: ViT-B/16 against the res_like agent pooled after blocks 2 and 8 gives
    # hint grids 28², 14², 7² against 14² tokens, all within integer ratios.
    vit, agent = pair.build_models(bootstrap_config.get_config("cifar100_base_shared"), 100)
    assert isinstance(agent, SharedAgent) and agent.down_sample_layers == (2, 8)
    assert (agent.embed_dim, agent.depth, agent.num_heads) == (vit.embed_dim, vit.depth, vit.num_heads) == (384, 12, 6)
    assert agent.dropout == vit.drop_rate == 0.0  # the shared agent's MLP is the ViT's, dropout included
    assert bootstrap_config.get_config("imagenet10_joint").data.fraction == 0.1


def test_loss_weights_override_the_paper_values():
    c = tiny_config("shared", **{"loss.hint": 2.0, "loss.temperature": 3.0})
    assert pair.loss_weights(c) == BootstrapLossWeights(0.5, 0.5, 0.5, 0.5, hint=2.0, temperature=3.0)


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("overrides, message", [
    ({"mode": "mutual"}, "mode='mutual' is not one of joint, shared"),
    ({"agent.embed_dim": 96}, r"agent agent_small \(width 96, 2 blocks.*ViT vit_small_bootstrap \(width 48, 2 blocks"
                              r".*cannot be paired for the hint loss.*width"),
    ({"agent.depth": 3}, r"agent agent_small \(width 48, 3 blocks.*ViT vit_small_bootstrap \(width 48, 2 blocks"
                         r".*equal block counts"),
    ({"loss.hint_layers": (0, 2)}, r"loss.hint_layers=\(0, 2\): \[2\] out of range for agent agent_small \(width 48, "
                                   r"2 blocks.*ViT.*valid block indices are 0..1"),
    ({"loss.hint_layers": (-1,)}, r"loss.hint_layers=\(-1,\): \[-1\] out of range"),
    ({"loss.kd_vit": -2.0}, "loss: loss weight kd_vit must be non-negative"),
    ({"agent.preset": "agent_tiny"}, "agent.preset='agent_tiny' is not one of"),
])
def test_bad_configs_fail_with_one_clear_message(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _task(tiny_config("joint", **overrides))


def test_shared_mode_needs_the_vits_width_depth_and_heads():
    with pytest.raises(ConfigError, match=r"mode=shared computes agent block i from ViT layer i.*agent agent_small "
                                          r"\(width 48, 2 blocks, 8 heads\) and ViT vit_small_bootstrap \(width 48, "
                                          r"2 blocks, 6 heads\)"):
        _task(tiny_config("shared", **{"agent.num_heads": 8}))


def test_partial_hint_layers_allow_unequal_depths():
    task, _, agent = _task(tiny_config("joint", **{"agent.depth": 3, "loss.hint_layers": (0, 1)}))
    assert agent.depth == 3 and task.metric_names == pair.METRICS["joint"]


# ------------------------------------------------------------------------------------------------ the step


def test_hint_decay_steps_once_per_epoch_and_reaches_zero():
    task, _, _ = _task(tiny_config("joint", total_steps=-1, num_epochs=4.0))
    spe = task.steps_per_epoch
    assert spe == len(_sources()[0]) // 32
    decay = jax.jit(lambda s: task.make_batch(jax.random.key(0), _batch_item(), s)["decay"])
    got = [float(decay(jnp.int32(s))) for s in (0, spe - 1, spe, 3 * spe - 1, 3 * spe, 4 * spe, 9 * spe)]
    np.testing.assert_allclose(got, [1, 1, 0.75, 0.5, 0.25, 0, 0])


def test_joint_losses_give_no_gradient_to_the_other_model(joint_step):
    grads = joint_step.grads
    assert _is_zero(grads["loss_vit"]["agent"]) and _norm(grads["loss_vit"]["vit"]) > 0
    assert _is_zero(grads["loss_cnn"]["vit"]) and _norm(grads["loss_cnn"]["agent"]) > 0
    # KD(vit ← cnn) and the hint reach only the ViT, KD(cnn ← vit) only the agent.
    for name in ("kd_vit", "hint"):
        assert _is_zero(grads[name]["agent"]) and _norm(grads[name]["vit"]) > 0
    assert _is_zero(grads["kd_cnn"]["vit"]) and _norm(grads["kd_cnn"]["agent"]) > 0
    # The step's scalar, loss_vit + loss_cnn, hands each model exactly its own loss's gradient.
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7),
                 grads["step"], {"vit": grads["loss_vit"]["vit"], "agent": grads["loss_cnn"]["agent"]})


def test_joint_mode_labels_each_model_for_its_own_optimizer_state(joint_step):
    step = joint_step
    labels = step.task.optimizer_labels(step.params)
    assert set(jax.tree.leaves(labels["vit"])) == {"vit"} and set(jax.tree.leaves(labels["agent"])) == {"agent"}
    assert _task(tiny_config("shared"))[0].optimizer_labels is None  # one tree, one optimizer


def test_joint_loss_is_the_sum_of_both_models_weighted_terms_and_updates_batch_stats(joint_step):
    step = joint_step
    metrics, w = step.metrics, pair.loss_weights(tiny_config("joint"))
    np.testing.assert_allclose(step.loss, metrics["loss_vit"] + metrics["loss_cnn"], rtol=1e-6)
    np.testing.assert_allclose(metrics["loss_vit"], metrics["ce_vit"] + metrics["kd_vit"] + 0.75 * w.hint
                               * metrics["hint"], rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_cnn"], metrics["ce_cnn"] + metrics["kd_cnn"], rtol=1e-5)
    assert float(metrics["hint_decay"]) == 0.75
    assert not np.allclose(jax.tree.leaves(step.new_extra)[0], jax.tree.leaves(step.extra)[0])


def test_shared_agent_losses_train_the_vits_value_and_output_projections(shared_step):
    step = shared_step
    metrics, grads = step.metrics, step.grads
    agent_side = _sum(grads, "ce_cnn", "kd_cnn")
    assert _norm(agent_side["agent"]) > 0
    for i in range(BOOTSTRAP_DEPTH):
        block = agent_side["vit"][f"blocks_{i}"]
        qkv = block["attn"]["qkv"]["kernel"]
        assert bool(jnp.all(jnp.abs(qkv[:, 2 * BOOTSTRAP_DIM:]).sum(0) > 0))  # every value column
        assert bool(jnp.all(qkv[:, :2 * BOOTSTRAP_DIM] == 0))  # queries and keys are not the agent's
        assert _norm(block["attn"]["proj"]) > 0 and _norm(block["mlp"]) > 0
    # The ViT-only terms leave the agent's own parameters (stem, BatchNorms, head) alone.
    assert _is_zero(grads["ce_vit"]["agent"]) and _is_zero(grads["hint"]["agent"])
    w = pair.loss_weights(tiny_config("shared"))
    want = sum(getattr(w, n) * metrics[n] for n in ("ce_vit", "ce_cnn", "kd_vit", "kd_cnn")) + 0.75 * w.hint * (
        metrics["hint"])
    np.testing.assert_allclose(step.loss, want, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ runs


def _rows(workdir):
    with (workdir / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_a_few_cpu_steps_lower_both_models_losses(bootstrap_run):
    mode, workdir = bootstrap_run
    rows = [{k: float(v) for k, v in r.items() if v} for r in _rows(workdir) if r["ce_vit"]]
    assert [int(r["step"]) for r in rows] == [6, 12, 18, 24, 30]
    w = pair.loss_weights(tiny_config(mode))
    vit_loss = lambda r: w.ce_vit * r["ce_vit"] + w.kd_vit * r["kd_vit"] + w.hint * r["hint_decay"] * r["hint"]
    agent_loss = lambda r: w.ce_cnn * r["ce_cnn"] + w.kd_cnn * r["kd_cnn"]
    if mode == "joint":
        for r in rows:
            assert r["loss_vit"] == pytest.approx(vit_loss(r), rel=1e-4)
            assert r["loss_cnn"] == pytest.approx(agent_loss(r), rel=1e-4)
    first, last = rows[0], rows[-1]
    assert vit_loss(last) < vit_loss(first) and agent_loss(last) < agent_loss(first)
    assert last["ce_cnn"] < first["ce_cnn"]  # the agent is already learning the classes


def test_metrics_checkpoint_export_and_result_hold_both_models(bootstrap_run):
    mode, workdir = bootstrap_run
    rows = _rows(workdir)
    assert {*pair.METRICS[mode], *pair.EVAL_NAMES} <= set(rows[0])
    final = rows[-1]
    assert 0 <= float(final["val_top1_vit"]) <= 100 and 0 <= float(final["val_top1_agent"]) <= 100
    result = json.loads((workdir / "result.json").read_text())
    assert result["val_top1_agent_final"] == pytest.approx(float(final["val_top1_agent"]), rel=1e-5)

    variables = checkpoint.load_variables(workdir)
    assert set(variables["params"]) == {"vit", "agent"} and "batch_stats" in variables
    export = workdir / "export"
    assert {p.name for p in export.iterdir()} >= {"model.safetensors", "model.pth", "timm.json", "agent.safetensors",
                                                  "agent.pth"}
    with safe_open(export / "agent.safetensors", "np") as f:
        agent_config = json.loads(f.metadata()["agent_config"])
        # A shared agent is exported as the plain many-head CNN that the ViT's weights define.
        assert agent_config["conv_type"] == ("many_head" if mode == "shared" else "conv_sl")
        np.testing.assert_array_equal(f.get_tensor("head.bias"), variables["params"]["agent"]["head"]["bias"])


def test_the_run_directory_initialises_the_fine_tune_stage(bootstrap_run):
    _, workdir = bootstrap_run
    assert classify.init_weights_path(str(workdir)) == workdir / "export" / "model.safetensors"
    model = create_vit("vit_small_bootstrap", num_classes=100, img_size=16, patch_size=4, embed_dim=BOOTSTRAP_DIM,
                       depth=BOOTSTRAP_DEPTH, num_heads=6, mlp_dim=2 * BOOTSTRAP_DIM)
    params = classify.load_init_params(str(workdir), model, jax.random.key(0))
    trained = checkpoint.load_variables(workdir)["params"]["vit"]
    np.testing.assert_allclose(params["blocks_1"]["attn"]["qkv"]["kernel"],
                               trained["blocks_1"]["attn"]["qkv"]["kernel"], rtol=1e-6)
    assert params["head"]["kernel"].shape == (BOOTSTRAP_DIM, 100)  # another class count: a fresh head
