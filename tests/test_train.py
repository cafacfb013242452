"""The training loop on a toy task: non-finite stop, float16 loss scaling, run-directory rules, schedule, decay mask."""

import itertools
import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from conftest import clean_env
from tensorboardX.proto import event_pb2

from onepfrac_jax.config import ConfigError, to_json
from onepfrac_jax.parallel.mesh import make_data_mesh
from onepfrac_jax.train import classify, loop, optim
from onepfrac_jax.train.checkpoint import Checkpoints
from onepfrac_jax.train.metrics import MetricWriter


def toy_config(**overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = "pretrain"  # any stage name: the run directory only needs one of this project
    loop.default_train_config(c)
    c.batch_size = 4
    c.total_steps = 8
    c.log_every_steps = 1
    c.checkpoint_every_steps = 2
    c.optim.warmup_steps = 0
    c.optim.scale_lr = False
    c.optim.lr = 0.1
    c.optim.weight_decay = 0.0
    c.update(overrides)
    return c


def toy_task(loss_of_step) -> loop.Task:
    """Minimises loss_of_step(w, step) for a scalar w (kept 2-D so weight decay would apply)."""
    return loop.Task(
        init_variables=lambda key: {"params": {"w": jnp.full((1, 1), 3.0)}},
        make_batch=lambda key, inputs, step: {"step": step},
        loss_fn=lambda params, extra, batch, key: (loss_of_step(params["w"][0, 0], batch["step"]), ({}, extra)),
        inputs=lambda start: itertools.repeat(None),
        evaluate=None,
        export=None,
        steps_per_epoch=4,
    )


def run(task, config, workdir):
    with loop.prepare(config, str(workdir), make_data_mesh(jax.devices()[:1])) as prepared:
        return prepared.train(task).state


def test_training_lowers_the_loss_and_writes_metrics(tmp_path):
    state = run(toy_task(lambda w, step: w**2), toy_config(), tmp_path / "run")
    assert abs(float(state.params["w"][0, 0])) < 3.0
    lines = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert lines[0].split(",")[:4] == ["step", "loss", "lr", "images_per_s"]
    losses = [float(line.split(",")[1]) for line in lines[1:]]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert (tmp_path / "run" / "curves.png").exists()
    assert any((tmp_path / "run" / "tensorboard").iterdir())
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["4", "6", "8"]  # keep 3


def test_a_non_finite_loss_names_the_step_and_the_last_good_checkpoint(tmp_path):
    task = toy_task(lambda w, step: jnp.where(step >= 5, jnp.nan, w**2))
    with pytest.raises(loop.NonFiniteLossError, match=r"loss is nan at step 6; last good checkpoint at step 4"):
        run(task, toy_config(log_every_steps=3), tmp_path / "run")
    # nothing after the failure was saved
    assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()) == [2, 4]


def test_float16_loss_scaling_skips_overflowing_steps(tmp_path):
    # at step 2 the loss is finite but its scaled gradient overflows: that update is skipped and the scale halves
    task = toy_task(lambda w, step: jnp.where(step == 2, 1e35, 1.0) * w**2)
    config = toy_config(dtype="float16", total_steps=4, checkpoint_every_steps=1, keep_checkpoints=4)
    run(task, config, tmp_path / "run")
    checkpoints = Checkpoints(tmp_path / "run" / "checkpoints", 4)
    target = loop.init_state(task, optim.make_optimizer(config.optim, optax.constant_schedule(0.1)), 0,
                             make_data_mesh(jax.devices()[:1]))
    before, _ = checkpoints.restore(2, target)  # the state after steps 0 and 1
    after, _ = checkpoints.restore(3, target)  # ... and after step 2, whose gradient is infinite
    checkpoints.close()
    np.testing.assert_array_equal(after.params["w"], before.params["w"])
    assert float(after.loss_scale) == float(before.loss_scale) / 2 == 2.0**14


def test_checkpoints_leave_jaxs_preemption_sync_point_to_the_loop(tmp_path, monkeypatch):
    """Only loop._Stop may pass counters to JAX's preemption sync point: Orbax's manager passes the saved step, from
    the thread that finalises an async save too, after the loop has passed later steps (checkpoint._Manager)."""
    from jax.experimental import multihost_utils

    steps = []
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda step: steps.append(step) or False)
    checkpoints = Checkpoints(tmp_path / "checkpoints", keep=2)
    for step in (2, 4):
        checkpoints.save(step, {"w": jnp.ones((2, 2))}, {"history": []})
    checkpoints.close()
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [2, 4] and steps == []


def test_a_replicated_array_is_split_among_replicas_only_from_a_mib_each(tmp_path, monkeypatch):
    """Orbax's replica-parallel write slices each replicated array, one compiled program per shape: only arrays of
    at least checkpoint.REPLICA_PARALLEL_MIN_BYTES per replica are split; what is saved reads back the same."""
    from orbax.checkpoint._src.serialization import replica_slices

    from onepfrac_jax.train import checkpoint

    sliced = []
    original = replica_slices.jax.lax.slice_in_dim
    monkeypatch.setattr(replica_slices.jax.lax, "slice_in_dim",
                        lambda x, *args, **kwargs: sliced.append(x.shape) or original(x, *args, **kwargs))
    replicated = jax.sharding.NamedSharding(make_data_mesh(), jax.sharding.PartitionSpec())
    devices = len(jax.devices())
    big = checkpoint.REPLICA_PARALLEL_MIN_BYTES * devices // 4  # float32: exactly the threshold per replica
    state = {"small": jax.device_put(jnp.arange(256.0).reshape(16, 16), replicated),
             "big": jax.device_put(jnp.arange(big, dtype=jnp.float32).reshape(devices * 8, -1), replicated)}
    checkpoints = Checkpoints(tmp_path / "checkpoints", 1)
    checkpoints.save(1, state, {})
    checkpoints.wait()
    restored, _ = checkpoints.restore(1, state)
    checkpoints.close()
    assert sliced and set(sliced) == {state["big"].shape}
    for name in state:
        np.testing.assert_array_equal(restored[name], state[name])


@pytest.mark.slow
def test_resume_rules(tmp_path):
    workdir = tmp_path / "run"
    config = toy_config()
    run(toy_task(lambda w, step: w**2), config, workdir)
    # the same config resumes (here: already complete, nothing to do) ...
    state = run(toy_task(lambda w, step: w**2), config, workdir)
    assert int(state.step) == 8
    # ... a different one is refused, naming what differs ...
    with pytest.raises(ConfigError, match=r"different config \(differs in: optim, seed\)"):
        run(toy_task(lambda w, step: w**2), toy_config(seed=1, optim=dict(lr=0.2)), workdir)
    # ... unless resuming is asked for: extending a finished run continues from its last checkpoint
    state = run(toy_task(lambda w, step: w**2), toy_config(total_steps=10, resume=True), workdir)
    assert int(state.step) == 10
    # overwrite starts afresh
    state = run(toy_task(lambda w, step: w**2), toy_config(total_steps=2, overwrite=True), workdir)
    assert int(state.step) == 2 and json.loads((workdir / "config.json").read_text())["total_steps"] == 2
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds no run"):
        loop.prepare(toy_config(), str(stranger))


def test_a_resume_restores_into_the_states_layout_without_running_the_initialisation(tmp_path, monkeypatch):
    workdir, inits = tmp_path / "run", []
    run(toy_task(lambda w, step: w**2), toy_config(), workdir)
    real = loop.init_state
    monkeypatch.setattr(loop, "init_state", lambda *args, **kwargs: inits.append(args) or real(*args, **kwargs))
    state = run(toy_task(lambda w, step: w**2), toy_config(total_steps=10, resume=True), workdir)
    assert int(state.step) == 10 and inits == []  # restored from step 8: no init program compiled or run
    shutil.rmtree(workdir / "checkpoints")  # a run stopped before its first checkpoint starts from the init
    state = run(toy_task(lambda w, step: w**2), toy_config(total_steps=10, resume=True), workdir)
    assert int(state.step) == 10 and len(inits) == 1


def test_batch_must_divide_over_devices():
    with pytest.raises(ConfigError, match="batch_size=6 is not divisible by the 4 devices"):
        loop.validate_train_config(toy_config(batch_size=6))
    with pytest.raises(ConfigError, match="dtype='float64'"):
        loop.validate_train_config(toy_config(dtype="float64"))


def test_schedule_warms_up_then_follows_the_cosine_to_min_lr():
    c = optim.default_optim_config()
    c.update(dict(lr=1e-3, warmup_lr=1e-6, min_lr=1e-5, warmup_epochs=5.0))
    lr = optim.schedule(c, total_steps=100, steps_per_epoch=2, global_batch=256)  # scale 0.5, warm-up 10 steps
    assert float(lr(0)) == pytest.approx(0.5e-6, rel=1e-4)  # float32 schedule arithmetic
    assert float(lr(10)) == pytest.approx(0.5e-3)
    assert float(lr(5)) == pytest.approx((0.5e-6 + 0.5e-3) / 2, rel=1e-4)
    assert float(lr(55)) == pytest.approx(0.5e-5 + (0.5e-3 - 0.5e-5) / 2, rel=1e-3)
    assert float(lr(100)) == pytest.approx(0.5e-5, rel=1e-3)
    c.scale_lr = False
    assert float(optim.schedule(c, 100, 2, 256)(10)) == pytest.approx(1e-3)


def test_weight_decay_spares_biases_norms_positions_and_the_cls_token():
    params = {"pos_embed": jnp.zeros((1, 5, 4)), "cls_token": jnp.zeros((1, 1, 4)),
              "blocks_0": {"attn": {"qkv": {"kernel": jnp.zeros((4, 12)), "bias": jnp.zeros(12)}},
                           "norm1": {"scale": jnp.zeros(4), "bias": jnp.zeros(4)}}}
    mask = optim.decay_mask(params)
    assert mask["blocks_0"]["attn"]["qkv"] == {"kernel": True, "bias": False}
    assert not mask["pos_embed"] and not mask["cls_token"] and not any(mask["blocks_0"]["norm1"].values())


def test_per_epoch_schedule_holds_each_epochs_first_value():
    """PyTorch's CosineAnnealingLR stepped after every epoch: lr_min + (lr − lr_min)(1 + cos(π e / E)) / 2."""
    c = optim.default_optim_config()
    c.update(dict(lr=1e-3, min_lr=0.0, warmup_epochs=0.0, scale_lr=False, per_epoch=True))
    epochs, per_epoch = 8, 5
    lr = optim.schedule(c, total_steps=epochs * per_epoch, steps_per_epoch=per_epoch, global_batch=64)
    for e in range(epochs):
        want = 1e-3 * (1 + np.cos(np.pi * e / epochs)) / 2
        got = [float(lr(e * per_epoch + i)) for i in range(per_epoch)]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
    c.per_epoch = False
    assert float(optim.schedule(c, epochs * per_epoch, per_epoch, 64)(1)) < 1e-3  # per step: already lower


def test_decay_all_decays_every_parameter_as_torch_adamw():
    params = {"pos_embed": jnp.ones((1, 2, 4)), "w": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}}
    c = optim.default_optim_config()
    c.update(dict(weight_decay=0.5))
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    for decay_all, decayed in ((False, {"w/kernel"}), (True, {"w/kernel", "w/bias", "pos_embed"})):
        c.decay_all = decay_all
        tx = optim.make_optimizer(c, optax.constant_schedule(0.1))
        updates, _ = tx.update(zero_grads, tx.init(params), params)
        moved = {"/".join(getattr(k, "key", str(k)) for k in path)
                 for path, u in jax.tree_util.tree_flatten_with_path(updates)[0] if float(jnp.abs(u).max()) > 0}
        assert moved == decayed


def test_saved_config_is_the_resolved_config(tmp_path):
    config = toy_config()
    run(toy_task(lambda w, step: w**2), config, tmp_path / "run")
    assert (tmp_path / "run" / "config.json").read_text() == to_json(config)


@pytest.mark.parametrize(("stage", "message"), [
    ("pretrain", r"the run has no export yet \(.*export/model.safetensors is missing\); let it finish"),
    ("generate", r"is a generate run, which trains no model \(init_from takes a pretrain, finetune, bootstrap run"),
    ("evaluate", r"is an evaluate run, which trains no model"),
    ("demo", r"is a demo run, which trains no model; its pretrain/ and finetune/ are"),
])
def test_init_from_a_run_without_weights_says_what_the_run_is(tmp_path, stage, message):
    (tmp_path / "config.json").write_text(json.dumps({"stage": stage}))
    with pytest.raises(ConfigError, match=message):
        classify.init_weights_path(str(tmp_path))


@pytest.mark.slow  # starts a process
def test_the_metric_writer_logs_to_tensorboard_without_importing_torch(tmp_path):
    """tensorboardX imports PyTorch, where installed, to accept its tensors: 1.5 s of every run's start. The writer
    gives it floats and keeps torch out; the events hold the scalars written."""
    program = ("import importlib.util, sys\nfrom pathlib import Path\n"
               "from onepfrac_jax.train.metrics import MetricWriter\n"
               "w = MetricWriter(Path(sys.argv[1]), ['loss'], total_steps=2, enabled=True, resume=False)\n"
               "w.write(1, {'loss': 1.5}); w.write(2, {'loss': 0.5}); w.close()\n"
               "print(importlib.util.find_spec('torch') is not None, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", program, str(tmp_path)], env=clean_env(), capture_output=True,
                         text=True, timeout=60)
    assert out.stdout.split() == ["True", "False"], out.stderr[-2000:]  # installed, and not imported
    (events,) = (tmp_path / "tensorboard").iterdir()
    data, scalars = events.read_bytes(), []
    while data:  # TFRecords: length (8 bytes), its CRC (4), the Event, its CRC (4)
        n = int.from_bytes(data[:8], "little")
        event = event_pb2.Event.FromString(data[12:12 + n])
        scalars += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
        data = data[16 + n:]
    assert scalars == [(1, "loss", 1.5), (2, "loss", 0.5)]


@pytest.mark.parametrize("damage", ["deleted", "garbled"])
def test_a_lost_metrics_csv_costs_the_curves_not_the_run(tmp_path, damage, caplog):
    """metrics.csv deleted or overwritten while the run trains: closing the writer (the run's end) still succeeds."""
    writer = MetricWriter(tmp_path, ["loss"], total_steps=2, enabled=True, resume=False)
    writer.write(1, {"loss": 1.0})
    if damage == "deleted":
        (tmp_path / "metrics.csv").unlink()
    else:
        (tmp_path / "metrics.csv").write_text("step,loss\none,1.0\n")
    writer.write(2, {"loss": 0.5})
    writer.close()
    assert not (tmp_path / "curves.png").exists()
    assert any("no curves.png" in r.getMessage() for r in caplog.records)

