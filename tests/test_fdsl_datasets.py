"""OFDB and FractalDB rendered by the same engine: the category search and its filter, FractalDB's instance
weighting and flips, the generate tree, and pre-training on every dataset."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from onepfrac_jax.configs import generate as generate_configs
from onepfrac_jax.configs import pretrain as pretrain_configs
from PIL import Image

from onepfrac_jax.config import ConfigError
from onepfrac_jax.fractals import fdsl, render
from onepfrac_jax.parallel.mesh import make_data_mesh
from onepfrac_jax.stages import generate, pretrain
from onepfrac_jax.train import bank_task

pytestmark = pytest.mark.slow  # the fast tier leaves this file out (pyproject.toml, markers)

TINY = dict(num_classes=6, image_size=24, pad=1, num_points=1500, instances=2, seed=3)
# The public FractalDB repository's fractal_renderer/weights/weights_0.4.csv, its first rows and its last
PUBLIC_04_HEAD = [[0.2, 1, 1, 1, 1, 1], [0.6, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [1.4, 1, 1, 1, 1, 1],
                  [1.8, 1, 1, 1, 1, 1], [1, 0.2, 1, 1, 1, 1]]
PUBLIC_04_LAST = [1, 1, 1, 1, 1, 1.8]


@pytest.fixture(scope="module")
def fractaldb():
    return fdsl.build_fdsl_bank(fdsl.FdslSpec(dataset="fractaldb", **TINY))


def test_the_weighting_grid_is_fractaldbs():
    grid = fdsl.weight_grid(0.4)
    assert grid.shape == (25, 6)
    np.testing.assert_allclose(grid[:6], PUBLIC_04_HEAD, rtol=1e-6)
    np.testing.assert_allclose(grid[-1], PUBLIC_04_LAST, rtol=1e-6)
    np.testing.assert_array_equal(grid[fdsl.IDENTITY_ROW], np.ones(6))
    assert ((grid != 1).sum(axis=1) <= 1).all()  # one parameter scaled per row
    for p in range(6):  # every parameter gets the four factors 1 ± s, 1 ± 2s
        np.testing.assert_allclose(sorted(grid[grid[:, p] != 1, p]), [0.2, 0.6, 1.4, 1.8], rtol=1e-6)


def test_class_and_instance_counts(fractaldb):
    assert fractaldb.images.shape == (6 * 25 * 2, 24, 24)
    assert fractaldb.spec.instances_per_class == 25 * 2 * 4
    ofdb = fdsl.FdslSpec(dataset="ofdb", **TINY)
    assert ofdb.stored_per_class == ofdb.instances_per_class == 1
    assert fdsl.FdslSpec(dataset="fractaldb").instances_per_class == 1000  # the public --instance 10: FractalDB-1k


def test_every_instance_is_the_class_system_weighted_by_its_grid_row(fractaldb):
    """Re-rendered here from the spec's keys, the plain way: system × grid row, the shared uniforms, cdf choices."""
    spec = fractaldb.spec
    grid = fdsl.weight_grid(spec.weight_step)
    uniforms = jax.random.uniform(fdsl.choice_key(spec.seed), (spec.num_points - 1,))
    label = 4
    probs = jnp.asarray(fractaldb.probs[label])
    choices = render.choices_from_uniforms(uniforms, probs)
    assert int(choices.max()) < int((probs > 0).sum())  # padded maps are never chosen
    for stored in (0, 2 * fdsl.IDENTITY_ROW, 2 * 7 + 1, 2 * 24 + 1):
        params = fractaldb.systems[label] * grid[stored // spec.instances][None, :]
        masks = fdsl.mask_key(spec.seed, label, stored)[None]
        image, _ = render.render_classes(jnp.asarray(params)[None], choices, masks, image_size=spec.image_size,
                                         pad=spec.pad, num_points=spec.num_points)
        np.testing.assert_array_equal(np.asarray(fractaldb.images[label * spec.stored_per_class + stored]), image[0])
    rows = np.asarray(fractaldb.images[label * 50 : label * 50 + 50:2])  # first draw of each grid row
    assert len({r.tobytes() for r in rows}) > 20  # the weighting changes the images


def test_the_search_keeps_the_first_candidates_that_pass_the_fill_filter(fractaldb):
    spec = fractaldb.spec
    index = jnp.arange(fractaldb.tried)
    params, probs = fdsl.candidates(spec.seed, index, spec.max_maps)
    counts = np.asarray((probs > 0).sum(axis=1))
    assert counts.min() >= 2 and counts.max() <= spec.max_maps and len(set(counts)) > 2
    assert np.abs(np.asarray(params)).max() <= 1
    renderer = fdsl.own_choice_renderer(make_data_mesh(), spec.image_size, spec.pad, spec.num_points, "point")
    keys = jax.random.key_data(fdsl.search_choice_keys(spec.seed, index))
    _, _, fill = renderer(params, probs, keys, keys)
    passing = np.flatnonzero(np.asarray(fill) >= spec.search_fill)
    np.testing.assert_array_equal(fractaldb.candidate, passing[: spec.num_classes])
    assert fractaldb.tried > spec.num_classes and len(passing) < fractaldb.tried  # the filter rejected some
    assert (fractaldb.search_fill >= spec.search_fill).all()
    stricter = fdsl.build_fdsl_bank(fdsl.FdslSpec(dataset="ofdb", **{**TINY, "search_fill": 0.35}))
    assert stricter.search_fill.min() >= 0.35 and stricter.tried > fractaldb.tried


def test_flips_follow_the_public_codes():
    image = jnp.arange(6, dtype=jnp.uint8).reshape(1, 2, 3)
    flipped = fdsl.flip(jnp.repeat(image, 4, axis=0), jnp.arange(4))
    np.testing.assert_array_equal(flipped[1], image[0, ::-1])
    np.testing.assert_array_equal(flipped[2], image[0, :, ::-1])
    np.testing.assert_array_equal(flipped[3], image[0, ::-1, ::-1])


def test_generate_writes_the_fractaldb_tree(tmp_path):
    config = generate_configs.get_config("demo_fractaldb")
    config.update({**TINY, "num_classes": 3, "instances": 1})
    bank = generate.run(config, str(tmp_path / "run")).state
    root = tmp_path / "run" / "images"
    assert sorted(p.name for p in root.iterdir()) == ["00000", "00001", "00002"]
    files = sorted(p.name for p in (root / "00001").iterdir())
    assert len(files) == 100 and "00001_02_count_0_flip3.png" in files
    with Image.open(root / "00001" / "00001_07_count_0_flip0.png") as a, \
            Image.open(root / "00001" / "00001_07_count_0_flip3.png") as b:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(bank.images[25 + 7]))
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a)[::-1, ::-1])
    params = json.loads((tmp_path / "run" / "params.json").read_text())
    assert params["spec"]["dataset"] == "fractaldb" and len(params["classes"]) == 3
    assert params["weights"][fdsl.IDENTITY_ROW] == [1.0] * 6
    assert (tmp_path / "run" / "preview.png").exists()


def test_generate_writes_ofdb_one_image_a_class(tmp_path):
    config = generate_configs.get_config("ofdb_1k")
    config.update({**TINY, "num_classes": 4})
    generate.run(config, str(tmp_path / "run"))
    root = tmp_path / "run" / "images"
    assert [sorted(p.name for p in d.iterdir()) for d in sorted(root.iterdir())] == [
        [f"{c:05d}_00_count_0_flip0.png"] for c in range(4)]


def test_a_bad_dataset_is_one_clear_error(tmp_path):
    config = generate_configs.get_config("demo")
    config.dataset = "imagenet"
    with pytest.raises(ConfigError, match=r"dataset='imagenet' is not one of"):
        generate.run(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    config = pretrain_configs.get_config("demo")
    config.update(dict(dataset="ofdb", data_mode="fresh"))
    with pytest.raises(ConfigError, match="data_mode='fresh' renders 1p-frac classes only"):
        pretrain.validate(config)
    config.update(dict(data_mode="bank", weight_step=0.5))
    with pytest.raises(ConfigError, match=r"weight_step=0.5 must lie in \(0, 0.5\)"):
        pretrain.validate(config)
    config.weight_step = 0.2
    del config["batch_picture"]  # past ml_collections' type check, as a config built in code can be
    config.batch_picture = "yes"
    with pytest.raises(ConfigError, match=r"batch_picture='yes' must be True or False"):
        pretrain.validate(config)


@pytest.mark.parametrize("dataset", ["1p-frac", "ofdb", "fractaldb"])
def test_a_short_pretrain_on_each_dataset_logs_bank_top1(tmp_path, dataset):
    config = pretrain_configs.get_config("demo")
    config.update(dict(dataset=dataset, num_classes=8, render_size=24, pad=1, num_points=1500, instances=1,
                       image_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_dim=64, batch_size=8,
                       total_steps=4, eval_every_steps=2, log_every_steps=2, checkpoint_every_steps=4))
    pretrain.run(config, str(tmp_path / "run"), make_data_mesh(jax.devices()[:2]))
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert [h["step"] for h in result["history"]] == [2, 4]
    assert 0 <= result["bank_top1_final"] <= 100
    assert (tmp_path / "run" / bank_task.BATCH_PNG).exists()  # batch_picture's default
