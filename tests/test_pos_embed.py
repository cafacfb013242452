"""Weights of another image size: position embeddings resampled on load as timm's `resample_abs_pos_embed` does
(checked against real timm, up and down), and a 32-px pre-train fine-tuned at 64 and 16 px through the stage."""

import logging
import re

import jax
import numpy as np
import pytest
import safetensors.numpy
import timm
import torch
from conftest import TINY_MODEL, TINY_PRETRAIN
from onepfrac_jax.configs import finetune as finetune_configs
from onepfrac_jax.configs import pretrain as pretrain_configs
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import checkpoint_filter_fn

from onepfrac_jax.config import ConfigError
from onepfrac_jax.export.timm import load_timm_weights, resample_pos_embed, timm_config
from onepfrac_jax.models import create_vit
from onepfrac_jax.parallel.mesh import make_data_mesh
from onepfrac_jax.stages import finetune, pretrain
from onepfrac_jax.train import classify
from onepfrac_jax.train.checkpoint import load_variables

pytestmark = pytest.mark.slow  # the fast tier leaves this file out (pyproject.toml, markers)

# float32 against float32: torch sums the taps in another order than our float64 einsum
TOLERANCE = 1e-5
VIT_64 = create_vit(img_size=64, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_dim=96, num_classes=5)
LOGGER = "onepfrac_jax.export.timm"


def timm_resample(pos_embed: np.ndarray, grid: int) -> np.ndarray:
    """timm's own resampling, as its ViT checkpoint filter calls it (defaults: bicubic, antialias=True)."""
    return resample_abs_pos_embed(torch.from_numpy(pos_embed), [grid, grid], num_prefix_tokens=1).numpy()


# 224 px with 16-px patches (14×14) to 384 px and 32 px, and smaller grids both ways, odd ratios included
@pytest.mark.parametrize(("old", "new"), [(14, 24), (14, 2), (14, 7), (24, 14), (4, 8), (8, 4), (7, 3), (2, 5)])
def test_resampling_matches_timm(old, new):
    pos_embed = np.random.default_rng(old * 100 + new).normal(size=(1, 1 + old * old, 32)).astype(np.float32)
    ours = resample_pos_embed(pos_embed, new)
    theirs = timm_resample(pos_embed, new)
    assert ours.shape == theirs.shape == (1, 1 + new * new, 32) and ours.dtype == np.float32
    assert np.abs(theirs).max() > 1.0
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOLERANCE)
    np.testing.assert_array_equal(ours[:, 0], pos_embed[:, 0])  # the class token is not resampled
    # timm's default is antialiased bicubic (Pillow's a = −0.5), not plain (a = −0.75): they differ well beyond it
    plain = resample_abs_pos_embed(torch.from_numpy(pos_embed), [new, new], antialias=False).numpy()
    assert np.abs(plain - theirs).max() > 100 * TOLERANCE


def test_resampling_to_the_same_grid_changes_nothing_and_bad_input_is_refused():
    pos_embed = np.random.default_rng(0).normal(size=(1, 17, 8)).astype(np.float32)
    np.testing.assert_allclose(resample_pos_embed(pos_embed, 4), pos_embed, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"pos_embed of shape \(1, 18, 8\) is not a class token and a square grid"):
        resample_pos_embed(np.zeros((1, 18, 8), np.float32), 4)
    with pytest.raises(ValueError, match="grid=0 must be ≥ 1"):
        resample_pos_embed(pos_embed, 0)


@pytest.fixture(scope="module")
def timm_64() -> torch.nn.Module:
    """timm's twin of VIT_64 with every tensor perturbed."""
    cfg = timm_config(VIT_64, (0.5,) * 3, (0.5,) * 3)
    torch.manual_seed(0)
    net = timm.create_model(cfg["model_name"], pretrained=False, **cfg["kwargs"]).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


@pytest.mark.parametrize("img_size", [128, 32], ids=["up_8x8_to_16x16", "down_8x8_to_4x4"])
def test_weights_of_another_image_size_load_as_timm_loads_them(timm_64, img_size, caplog):
    sd = {k: v.numpy() for k, v in timm_64.state_dict().items()}
    model = VIT_64.clone(img_size=img_size)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        params = load_timm_weights(sd, model)
    grid = img_size // 8
    said = [r.getMessage() for r in caplog.records if "resampled" in r.getMessage()]
    assert said == [f"state dict: position embeddings resampled from a 8×8 to a {grid}×{grid} patch grid "
                    f"(bicubic, as timm)"]
    assert params["pos_embed"].shape == (1, 1 + grid * grid, 48)
    np.testing.assert_allclose(params["pos_embed"], timm_resample(sd["pos_embed"], grid), rtol=0, atol=TOLERANCE)
    same = load_timm_weights(sd, VIT_64)
    for key in params:
        if key != "pos_embed":
            jax.tree.map(np.testing.assert_array_equal, params[key], same[key])
    # timm's ViT built at the new size, loaded through its own checkpoint filter: the same logits
    cfg = timm_config(model, (0.5,) * 3, (0.5,) * 3)
    net = timm.create_model(cfg["model_name"], pretrained=False, **cfg["kwargs"]).eval()
    net.load_state_dict(checkpoint_filter_fn(timm_64.state_dict(), net), strict=True)
    x = np.random.default_rng(1).normal(size=(2, img_size, img_size, 3)).astype(np.float32)
    with torch.no_grad():
        theirs = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    ours = np.asarray(jax.jit(model.apply)({"params": params}, x))
    assert np.abs(theirs).max() > 0.5
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


def test_positions_of_another_width_or_not_a_square_grid_are_errors(timm_64):
    sd = {k: v.numpy() for k, v in timm_64.state_dict().items()}
    for bad in (np.zeros((1, 51, 48), np.float32), np.zeros((1, 65, 40), np.float32)):
        with pytest.raises(ValueError, match=re.escape(f"wrong shape (1): pos_embed checkpoint {bad.shape} vs model "
                                                       f"(1, 65, 48)")):
            load_timm_weights({**sd, "pos_embed": bad}, VIT_64)


# ----------------------------------------------------------------------------------- through the fine-tune stage

@pytest.fixture(scope="module")
def pretrained_32(tmp_path_factory):
    """A 32-px pre-train of 8-px patches (a 4×4 grid), 2 steps."""
    c = pretrain_configs.get_config("demo")
    c.update({**TINY_PRETRAIN, "image_size": 32, "total_steps": 2, "checkpoint_every_steps": 2})
    workdir = tmp_path_factory.mktemp("pretrain32") / "run"
    pretrain.run(c, str(workdir), make_data_mesh(jax.devices()[:1]))
    return workdir


def test_a_32px_pretrain_fine_tunes_at_64px(pretrained_32, tmp_path, caplog):
    c = finetune_configs.get_config("digits_demo_64")
    # one step at learning rate 0 (the warm-up's start): the run's weights are then exactly what it loaded
    c.update({**TINY_MODEL, "init_from": str(pretrained_32), "batch_size": 8, "total_steps": 1,
              "log_every_steps": 1, "checkpoint_every_steps": 1})
    c.optim.update({"warmup_steps": 1, "warmup_lr": 0.0})
    assert c.augment.size == c.image_size == 64
    with caplog.at_level(logging.INFO, logger=LOGGER):
        finetune.run(c, str(tmp_path / "ft"), make_data_mesh(jax.devices()[:1]))
    assert any("resampled from a 4×4 to a 8×8 patch grid" in r.getMessage() for r in caplog.records)
    source = safetensors.numpy.load_file(pretrained_32 / "export" / "model.safetensors")
    tuned = safetensors.numpy.load_file(tmp_path / "ft" / "export" / "model.safetensors")
    assert tuned["pos_embed"].shape == (1, 65, 32) and tuned["head.weight"].shape == (10, 32)
    np.testing.assert_allclose(tuned["pos_embed"], timm_resample(source["pos_embed"], 8), rtol=0, atol=TOLERANCE)
    for key in source:
        if key not in ("pos_embed", "head.weight", "head.bias"):
            np.testing.assert_array_equal(tuned[key], source[key], err_msg=key)
    assert load_variables(tmp_path / "ft")["params"]["pos_embed"].shape == (1, 65, 32)


def test_init_from_an_export_folder_resamples_down_to_16px(pretrained_32):
    export = pretrained_32 / "export"
    assert classify.init_weights_path(str(export)) == export / "model.safetensors"
    params = classify.load_init_params(str(export), create_vit(img_size=16, num_classes=10, **TINY_MODEL),
                                       jax.random.key(0))
    source = safetensors.numpy.load_file(export / "model.safetensors")
    np.testing.assert_allclose(params["pos_embed"], timm_resample(source["pos_embed"], 2), rtol=0, atol=TOLERANCE)
    with pytest.raises(ConfigError, match="patch_size=8"):
        classify.load_init_params(str(export), create_vit(img_size=32, num_classes=10, **{**TINY_MODEL,
                                                                                           "patch_size": 16}),
                                  jax.random.key(0))
