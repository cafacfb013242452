"""The EMA of the weights (config.ema_decay): the closed form, checkpointed and resumed exactly, evaluated, exported."""

import itertools
import json
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import TINY_MODEL, csv_rows, make_image_folder
from onepfrac_jax.configs import export as export_configs
from onepfrac_jax.configs import finetune as finetune_configs

from onepfrac_jax import inference
from onepfrac_jax.config import ConfigError
from onepfrac_jax.data.augment import augment_config, eval_transform
from onepfrac_jax.export.timm import load_timm_weights
from onepfrac_jax.parallel.mesh import make_data_mesh
from onepfrac_jax.stages import export as export_stage
from onepfrac_jax.stages import finetune
from onepfrac_jax.train import classify, loop
from onepfrac_jax.train.checkpoint import read_checkpoint

pytestmark = pytest.mark.slow  # the fast tier leaves this file out (pyproject.toml, markers)

DECAY = 0.7
W0 = 3.0


def toy_config(**overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = "pretrain"  # any stage name: the run directory only needs one of this project
    loop.default_train_config(c)
    c.update(dict(batch_size=4, total_steps=6, log_every_steps=1, checkpoint_every_steps=1, keep_checkpoints=10,
                  eval_every_steps=2, ema_decay=DECAY))
    c.optim.update(dict(warmup_steps=0, scale_lr=False, lr=0.1, weight_decay=0.0))
    c.update(overrides)
    return c


def toy_task(export_log: dict | None = None, **fields) -> loop.Task:
    """Minimises (w − 1)² · (1 + step mod 3) for a scalar w: the params move by a different amount every step.
    evaluate() reports w; export() records the w it was given under its folder's name."""

    def export(state, out_dir):
        export_log[out_dir.name] = float(state.params["w"][0, 0])
        out_dir.mkdir(parents=True, exist_ok=True)
        return {"w": out_dir / "w.txt"}

    task = dict(
        init_variables=lambda key: {"params": {"w": jnp.full((1, 1), W0)}},
        make_batch=lambda key, inputs, step: {"step": step},
        loss_fn=lambda params, extra, batch, key: ((params["w"][0, 0] - 1.0) ** 2 * (1 + batch["step"] % 3),
                                                   ({}, extra)),
        inputs=lambda start: itertools.repeat(None),
        evaluate=lambda state: {"w": float(state.params["w"][0, 0])},
        export=None if export_log is None else export,
        steps_per_epoch=2,
        eval_names=("w",),
    )
    return loop.Task(**{**task, **fields})


def train(task, config, workdir):
    with loop.prepare(config, str(workdir), make_data_mesh(jax.devices()[:1])) as prepared:
        return prepared.train(task)


def w_at(workdir, step, ema=False) -> float:
    return float(read_checkpoint(workdir, step, ema)[1]["params"]["w"][0, 0])


def test_the_ema_is_the_closed_form_of_the_logged_params(tmp_path):
    exported = {}
    result = train(toy_task(exported), toy_config(), tmp_path / "run")
    n = 6
    p = [W0] + [w_at(tmp_path / "run", k) for k in range(1, n + 1)]  # the params after each update
    assert len(set(p)) == n + 1  # every step moved them
    for t in range(1, n + 1):  # e_t = dᵗ·p_0 + (1 − d)·Σ_{k=1..t} d^(t−k)·p_k
        closed = DECAY**t * p[0] + (1 - DECAY) * sum(DECAY ** (t - k) * p[k] for k in range(1, t + 1))
        assert w_at(tmp_path / "run", t, ema=True) == pytest.approx(closed, rel=1e-6)
    final = float(result.state.ema_params["w"][0, 0])
    assert final == pytest.approx(w_at(tmp_path / "run", n, ema=True))
    assert abs(final - p[n]) > 0.01  # the average lags the params: the test can tell them apart

    # evaluated beside the params (metrics.csv, result.json) and exported to export/ema beside export/
    rows = {int(r["step"]): r for r in csv_rows(tmp_path / "run" / "metrics.csv")}
    for step in (2, 4, 6):
        assert float(rows[step]["w"]) == pytest.approx(p[step], rel=1e-5)
        assert float(rows[step]["w_ema"]) == pytest.approx(w_at(tmp_path / "run", step, ema=True), rel=1e-5)
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["w_ema_final"] == pytest.approx(final)
    assert exported == {"export": pytest.approx(p[n]), "ema": pytest.approx(final)}
    assert saved["files"] == {"w": str(tmp_path / "run" / "export" / "w.txt"),
                              "ema_w": str(tmp_path / "run" / "export" / "ema" / "w.txt")}


def test_resume_continues_the_ema_exactly(tmp_path):
    config = toy_config(total_steps=8, checkpoint_every_steps=4, keep_checkpoints=3)
    straight = train(toy_task(), config, tmp_path / "a").state
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "8")  # as if killed after the checkpoint at step 4
    resumed = train(toy_task(), config, tmp_path / "b").state
    assert int(resumed.step) == 8
    for a, b in zip(jax.tree.leaves((straight.params, straight.ema_params)),
                    jax.tree.leaves((resumed.params, resumed.ema_params)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_off_by_default_and_the_checkpoint_tree_is_unchanged(tmp_path):
    defaults = ml_collections.ConfigDict()
    loop.default_train_config(defaults)
    assert defaults.ema_decay == 0.0
    state = train(toy_task(), toy_config(ema_decay=0.0), tmp_path / "run").state
    assert state.ema_params is None
    assert "w_ema" not in csv_rows(tmp_path / "run" / "metrics.csv")[0]
    with pytest.raises(ConfigError, match="kept no EMA"):
        read_checkpoint(tmp_path / "run", ema=True)


def test_bad_decay_and_models_with_other_collections_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"ema_decay=1.0 must lie in \[0, 1\)"):
        train(toy_task(), toy_config(ema_decay=1.0), tmp_path / "a")
    stats = toy_task(init_variables=lambda key: {"params": {"w": jnp.full((1, 1), W0)},
                                                 "batch_stats": {"mean": jnp.zeros(3)}})
    with pytest.raises(ConfigError, match="keeps batch_stats beside its params"):
        train(stats, toy_config(), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing written


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A tiny fine-tune on an image folder (3 classes) with the EMA on."""
    root = tmp_path_factory.mktemp("ema")
    make_image_folder(root / "data")
    c = finetune_configs.get_config("imagefolder")
    c.update(dict(image_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_dim=64, batch_size=8,
                  num_epochs=2.0, log_every_steps=1, checkpoint_every_steps=3, ema_decay=0.5))
    c.data.update(dict(data_dir=str(root / "data"), image_size=20))
    c.augment.update(dict(crop="resize", auto_augment="", re_prob=0.0, mixup_alpha=0.0, cutmix_alpha=0.0))
    c.optim.update(dict(name="adamw", lr=1e-2, warmup_epochs=0.0))
    finetune.run(c, str(root / "run"), make_data_mesh(jax.devices()[:2]))
    return root / "run", c


def test_finetune_evaluates_and_exports_the_ema(finetuned):
    workdir, config = finetuned
    rows = csv_rows(workdir / "metrics.csv")
    assert [r["step"] for r in rows if r["val_top1_ema"]] == ["3", "6"]
    result = json.loads((workdir / "result.json").read_text())
    assert result["val_top1_ema_final"] == pytest.approx(float(rows[-1]["val_top1_ema"]), rel=1e-5)
    # export/ema holds the timm files of the averaged weights, which are not the weights
    ema = read_checkpoint(workdir, ema=True)[1]["params"]
    raw = read_checkpoint(workdir)[1]["params"]
    assert result["files"]["ema_safetensors"] == str(workdir / "export" / "ema" / "model.safetensors")
    model = classify.build_vit(config, 3)
    loaded = load_timm_weights(workdir / "export" / "ema" / "model.safetensors", model)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(ema), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert not np.allclose(ema["head"]["kernel"], raw["head"]["kernel"])
    # inference.load(ema=True) serves the average
    images = np.random.default_rng(0).integers(0, 255, (2, 20, 20, 3), dtype=np.uint8)
    expected = model.apply({"params": ema}, eval_transform(augment_config(config.augment), jnp.asarray(images)))
    np.testing.assert_allclose(inference.load(workdir, ema=True)(images), expected, atol=1e-5)


def test_the_export_stage_writes_the_ema_of_a_kept_step_beside_its_weights(finetuned, tmp_path):
    workdir, config = finetuned
    c = export_configs.get_config()
    c.update({"run": str(workdir), "step": 3})
    files = export_stage.run(c, str(tmp_path / "out")).files
    assert files["ema_safetensors"] == str(tmp_path / "out" / "export" / "ema" / "model.safetensors")
    model = classify.build_vit(config, 3)
    for folder, ema in (("export", False), ("export/ema", True)):
        loaded = load_timm_weights(tmp_path / "out" / folder / "model.safetensors", model)
        for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(read_checkpoint(workdir, 3, ema)[1]["params"]),
                        strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6)
    # step 3's average, not the run's final one
    final = load_timm_weights(workdir / "export" / "ema" / "model.safetensors", model)
    at_3 = load_timm_weights(tmp_path / "out" / "export" / "ema" / "model.safetensors", model)
    assert not np.allclose(final["head"]["kernel"], at_3["head"]["kernel"])


def test_the_digits_demo_ema_variant_is_the_demo_with_an_ema(tmp_path):
    demo, variant = finetune_configs.get_config("digits_demo"), finetune_configs.get_config("digits_demo_ema")
    differing = {k for k in variant.to_dict() if k != "variant" and variant.to_dict()[k] != demo.to_dict()[k]}
    assert differing == {"ema_decay"} and 0 < variant.ema_decay < 1
    variant.update(dict(total_steps=4, eval_every_steps=2, log_every_steps=2, **TINY_MODEL))
    result = finetune.run(variant, str(tmp_path / "run"), make_data_mesh(jax.devices()[:2]))
    assert 0 <= result.summary["val_top1_ema_final"] <= 100
    assert (tmp_path / "run" / "export" / "ema" / "model.safetensors").exists()
