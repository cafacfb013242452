"""Pre-training reports whether it learns (bank_top1 on the clean bank) and pictures its first augmented batch."""

import json
import math

import jax
import numpy as np
import pytest
from conftest import TINY_MODEL, TINY_PRETRAIN, csv_rows
from flax import traverse_util
from onepfrac_jax.configs import pretrain as pretrain_configs
from PIL import Image

from onepfrac_jax import experiments, inference
from onepfrac_jax.data.augment import augment_config
from onepfrac_jax.fractals import grid
from onepfrac_jax.fractals.bank import BankSpec, build_bank
from onepfrac_jax.parallel.mesh import make_data_mesh
from onepfrac_jax.stages import pretrain
from onepfrac_jax.train import bank_task, classify

pytestmark = pytest.mark.slow  # the fast tier leaves this file out (pyproject.toml, markers)

# 10 classes in batches of 8 on 4 devices: the last evaluation batch is partly padding
EVAL = {**TINY_PRETRAIN, "num_classes": 10, "total_steps": 4, "eval_every_steps": 2}


def pretrain_config(**overrides):
    c = pretrain_configs.get_config("demo")
    c.update({**EVAL, **overrides})
    return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pretrain") / "run"
    config = pretrain_config(batch_picture=True)  # TINY_PRETRAIN leaves it out; test_the_batch_picture_... reads it
    pretrain.run(config, str(workdir), make_data_mesh(jax.devices()[:4]))
    return workdir, config


def bank_images(config) -> np.ndarray:
    spec = BankSpec.from_config(config, bank_task._RENAMED)
    return np.asarray(build_bank(spec).images)[: spec.num_classes]


def test_bank_top1_is_logged_every_eval_step_and_in_result_json(run):
    workdir, _ = run
    rows = {int(r["step"]): r["bank_top1"] for r in csv_rows(workdir / "metrics.csv")}
    assert [s for s, v in rows.items() if v] == [2, 4]
    result = json.loads((workdir / "result.json").read_text())
    assert [h["step"] for h in result["history"]] == [2, 4]
    assert result["bank_top1_final"] == result["history"][-1]["bank_top1"] == float(rows[4])
    assert result["bank_top1_max"] == max(h["bank_top1"] for h in result["history"])


def test_bank_top1_is_the_checkpoints_accuracy_on_the_clean_bank(run):
    """The same number from the saved weights, the eval transform and the bank's images in one plain batch."""
    workdir, config = run
    gray = bank_images(config)
    logits = inference.load(workdir)(np.repeat(gray[..., None], 3, axis=-1))
    expected = 100.0 * np.mean(np.argmax(logits, axis=-1) == np.arange(len(gray)))
    assert json.loads((workdir / "result.json").read_text())["bank_top1_final"] == pytest.approx(expected)


def test_a_short_pretrain_learns_its_classes(tmp_path):
    """The demo's recipe (whole-image resize, no mixup) on 8 classes: far above the 12.5% of chance."""
    config = pretrain_config(num_classes=8, batch_size=8, total_steps=60, eval_every_steps=60, render_size=32,
                             image_size=32, num_points=3000, embed_dim=64, mlp_dim=128)
    result = pretrain.run(config, str(tmp_path / "run"), make_data_mesh(jax.devices()[:1]))
    assert result.summary["bank_top1_final"] >= 50.0
    assert not (tmp_path / "run" / bank_task.BATCH_PNG).exists()  # batch_picture=False (TINY_PRETRAIN)


def test_the_cpu_paper_aug_variant_is_the_demo_under_the_papers_crops_and_mixup(tmp_path):
    """configs/pretrain.py:cpu_paper_aug differs from the demo where its comment says, and a run of it trains with
    them (its config.json says so); what it reaches comes from the real run (docs/reproducing.md)."""
    demo, crops = (traverse_util.flatten_dict(pretrain_configs.get_config(v).to_dict(), sep=".")
                   for v in ("demo", "cpu_paper_aug"))
    assert {k: v for k, v in crops.items() if demo[k] != v} == {
        "variant": "cpu_paper_aug", "render_size": 64, "pad": 2, "num_points": 20_000, "augment.crop": "rrc",
        "augment.scale": (0.35, 1.0), "augment.mixup_alpha": 0.8, "augment.cutmix_alpha": 1.0, "total_steps": 12_000,
        "eval_every_steps": 1000, "checkpoint_every_steps": 2000, "log_every_steps": 200}
    config = pretrain_configs.get_config("cpu_paper_aug")
    config.update({**TINY_MODEL, "num_classes": 8, "num_points": 2000, "image_size": 16, "batch_size": 8,
                   "total_steps": 2, "eval_every_steps": 2, "checkpoint_every_steps": 2})
    result = pretrain.run(config, str(tmp_path / "run"), make_data_mesh(jax.devices()[:1]))
    assert "bank_top1_final" in result.summary
    assert experiments.describe_run(tmp_path / "run") == (
        "1p-frac Δ=0.1, 8 classes rendered at 64², rrc crops of 0.35–1 of the area to 16², mixup 0.8 / cutmix 1; "
        "2 steps of 8")


def test_the_batch_picture_is_the_first_batch_de_normalised(run):
    workdir, config = run
    mesh = make_data_mesh(jax.devices()[:4])
    spec = BankSpec.from_config(config, bank_task._RENAMED)
    augment = augment_config(config.augment)
    model = classify.build_vit(config, spec.num_classes)
    bank = build_bank(spec, mesh)
    task = bank_task.make_task(config, spec, model, augment, mesh, bank_task.packed_bank(bank.images, mesh),
                              bank.class_params, bank.probs)
    # the loop's step 0 key, derived here by hand: fold_in(fold_in(key(seed), step stream 0), step 0), first half
    data_key = jax.random.split(jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 0), 0))[0]
    batch = jax.jit(task.make_batch)(data_key, None, 0, task.resident)
    x = np.asarray(batch["image"])
    expected = np.clip(np.rint((x * 0.5 + 0.5) * 255), 0, 255).astype(np.uint8)  # the demo's mean = std = 0.5
    assert expected.std() > 0
    with Image.open(workdir / bank_task.BATCH_PNG) as img:
        picture = np.asarray(img.convert("RGB"))
    size = config.image_size
    factor = math.ceil(bank_task.BATCH_PNG_TILE / size)
    side = grid.grid_side(len(x))
    assert side == 3  # 8 examples
    for i in range(len(x)):
        left, top = grid.tile_origin(i, side, size * factor, captioned=True)
        tile = picture[top : top + size * factor, left : left + size * factor]
        np.testing.assert_array_equal(tile[::factor, ::factor], expected[i])
        np.testing.assert_array_equal(tile, np.repeat(np.repeat(expected[i], factor, 0), factor, 1))
        caption = picture[top + size * factor : top + size * factor + grid.CAPTION, left : left + size * factor]
        assert caption.max() > 200  # a caption (white, anti-aliased) under every tile


def test_grid_refuses_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        grid.image_grid(np.zeros((2, 4, 4), np.float32), 4)
    with pytest.raises(ValueError, match="1 captions for 2 images"):
        grid.image_grid(np.zeros((2, 4, 4), np.uint8), 4, ["a"])
