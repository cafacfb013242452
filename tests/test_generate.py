"""The generate stage: the files it writes, and its refusals (one clear error, non-zero exit, nothing written)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_one_error, run_cli
from onepfrac_jax.configs import generate as generate_config
from PIL import Image

from onepfrac_jax.config import ConfigError
from onepfrac_jax.fractals import render
from onepfrac_jax.stages import generate

pytestmark = pytest.mark.slow  # the fast tier leaves this file out (pyproject.toml, markers)

# fill_threshold 0.1: a few classes are re-drawn, so re-rendering from params.json covers the re-draw keys too
TINY = {"num_classes": 10, "image_size": 48, "pad": 2, "num_points": 6_000, "seed": 2, "fill_threshold": 0.1}


def tiny_config(**overrides):
    config = generate_config.get_config("demo")
    config.update({**TINY, **overrides})
    return config


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("gen") / "run"
    bank = generate.run(tiny_config(), str(workdir)).state
    return workdir, bank


def test_writes_an_image_folder_tree(generated):
    workdir, bank = generated
    folders = sorted(p.name for p in (workdir / "images").iterdir())
    assert folders == [f"{i:05d}" for i in range(10)]
    for i, folder in enumerate(folders):
        files = list((workdir / "images" / folder).iterdir())
        assert [f.name for f in files] == ["00000.png"]
        with Image.open(files[0]) as img:
            assert img.mode == "L" and img.size == (48, 48)
            np.testing.assert_array_equal(np.asarray(img), np.asarray(bank.images[i]))


def test_torchvision_image_folder_reads_it(generated):
    datasets = pytest.importorskip("torchvision.datasets", reason="torchvision is installed by requirements-test.txt")
    workdir, _ = generated
    folder = datasets.ImageFolder(str(workdir / "images"))
    assert len(folder) == 10 and folder.classes == [f"{i:05d}" for i in range(10)]
    image, label = folder[3]
    assert label == 3 and image.size == (48, 48)


def test_params_json_re_renders_every_class(generated):
    workdir, _ = generated
    params = json.loads((workdir / "params.json").read_text())
    spec = params["spec"]
    assert spec["delta"] == 0.1 and spec["num_classes"] == 10 and len(params["classes"]) == 10
    assert any(c["redraws"] > 0 for c in params["classes"])
    maps = jnp.asarray([c["maps"] for c in params["classes"]], jnp.float32)
    seed = spec["seed"]
    # the keys, derived as params["keys"] says
    assert params["keys"] == {
        "map_choices": f"fold_in(jax.random.key({seed}), 2)",
        "class": f"fold_in(fold_in(fold_in(jax.random.key({seed}), 1), label), redraws)",
        "perturbation, patch_masks": "jax.random.split(class key)",
    }
    root = jax.random.key(seed)
    choices = render.choice_sequence(jax.random.fold_in(root, 2), jnp.asarray(params["map_probabilities"]),
                                     spec["num_points"] - 1)
    mask_keys = jnp.stack([
        jax.random.split(jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(root, 1), c["label"]),
                                            c["redraws"]))[1]
        for c in params["classes"]])
    images, _ = render.render_classes(maps, choices, mask_keys, image_size=spec["image_size"], pad=spec["pad"],
                                      num_points=spec["num_points"], draw_mode=spec["draw_mode"])
    for i in range(10):
        with Image.open(workdir / "images" / f"{i:05d}" / "00000.png") as img:
            np.testing.assert_array_equal(np.asarray(img), np.asarray(images[i]))


def test_preview_and_config(generated):
    workdir, _ = generated
    with Image.open(workdir / "preview.png") as img:
        side = 4 * (generate.PREVIEW_TILE + 2) + 2  # 10 classes → a 4×4 grid
        assert img.size == (side, side)
        assert np.asarray(img).max() == render.VALUE
    config = json.loads((workdir / "config.json").read_text())
    assert config["stage"] == "generate" and config["num_classes"] == 10 and config["seed"] == 2


def test_refuses_a_non_empty_workdir_unless_overwrite(generated, tmp_path):
    workdir, _ = generated
    with pytest.raises(ConfigError, match=r"already holds a generate run; pass --config\.overwrite=True"):
        generate.run(tiny_config(), str(workdir))
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="is not a run of this project"):
        generate.run(tiny_config(num_classes=2, overwrite=True), str(other))
    assert sorted(p.name for p in other.iterdir()) == ["keep.txt"]


def test_overwrite_over_a_larger_set_leaves_no_stale_class(tmp_path):
    generate.run(tiny_config(num_classes=8), str(tmp_path / "run"))
    generate.run(tiny_config(num_classes=3, overwrite=True), str(tmp_path / "run"))
    assert sorted(p.name for p in (tmp_path / "run" / "images").iterdir()) == ["00000", "00001", "00002"]
    assert len(json.loads((tmp_path / "run" / "params.json").read_text())["classes"]) == 3


def test_a_degenerate_base_system_leaves_nothing_behind(tmp_path):
    with pytest.raises(ConfigError, match=r"try another --config\.seed"):
        generate.run(tiny_config(fill_threshold=0.95), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--config.sigma=6", "sigma=6.0 must lie in (0, 3·num_maps) = (0, 6)"),
        ("--config.sigma=0", "sigma=0.0 must lie in"),
        ("--config.delta=-0.5", "delta=-0.5 must be ≥ 0"),
        ("--config.delta=1.5", "delta=1.5 must be ≤ 1 in multiplicative mode"),
        ("--config.num_classes=0", "num_classes=0 must be > 0"),
        ("--config.image_size=8", "image_size=8 must be ≥ 16"),
        ("--config.no_such_key=1", "unknown config key 'no_such_key'"),
        ("--config.stage=train", "config.stage='train' is not one of"),
    ],
)
def test_bad_input_exits_non_zero_and_writes_nothing(tmp_path, override, message):
    assert_one_error(run_cli("configs/generate.py:demo", tmp_path / "run", None, override), 2, message)
    assert not (tmp_path / "run").exists()


def test_a_workdir_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert_one_error(run_cli("configs/generate.py:demo", blocker / "run"), 2, "cannot be created")
