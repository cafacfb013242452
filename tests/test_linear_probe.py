"""The linear_probe stage: frozen pre-logits features of a pre-trained ViT, a keyed linear head trained on them."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import csv_rows
from onepfrac_jax.configs import linear_probe as probe_configs

from onepfrac_jax import inference
from onepfrac_jax.config import ConfigError, apply_overrides
from onepfrac_jax.data.augment import eval_transform
from onepfrac_jax.data.sources import DigitsSource
from onepfrac_jax.parallel.mesh import make_data_mesh
from onepfrac_jax.stages import linear_probe

pytestmark = pytest.mark.slow  # the fast tier leaves this file out (pyproject.toml, markers)

MESH = lambda: make_data_mesh(jax.devices()[:2])


def probe_config(init_from, **overrides):
    c = probe_configs.get_config()
    c.init_from = str(init_from)
    return apply_overrides(c, {"data.image_size": 16, "batch_size": 64, "probe.epochs": 20, **overrides})


def test_the_features_are_the_cls_token_after_the_final_layer_norm(tiny_pretrain_run):
    classifier = inference.load_classifier(tiny_pretrain_run)
    source = DigitsSource("val", 16)
    feats, labels = linear_probe.features(classifier, source, 64, MESH())
    assert feats.shape == (len(source), 32) and np.array_equal(labels, source.labels)
    images = jnp.asarray(np.stack([source[i]["image"] for i in range(5)]))
    params = classifier.variables["params"]
    _, blocks = classifier.module.apply({"params": params}, eval_transform(classifier.augment, images),
                                        return_blocks=True)
    normed = nn.LayerNorm(epsilon=1e-6).apply({"params": params["norm"]}, blocks[-1][:, 0])
    np.testing.assert_allclose(feats[:5], normed, atol=1e-5)


def test_the_probe_learns_digits_and_reports_every_epoch(tiny_pretrain_run, tmp_path):
    result = linear_probe.run(probe_config(tiny_pretrain_run), str(tmp_path / "a"), MESH())
    saved = json.loads((tmp_path / "a" / "result.json").read_text())
    rows = csv_rows(tmp_path / "a" / "metrics.csv")
    steps = 1437 // 256  # the train split's full minibatches per epoch
    assert [int(r["step"]) for r in rows] == [steps * (e + 1) for e in range(20)]
    assert saved["val_top1_final"] == pytest.approx(float(rows[-1]["val_top1"]), rel=1e-5)
    assert saved["val_top1_max"] == pytest.approx(max(h["val_top1"] for h in result.history))
    assert saved["feature_dim"] == 32 and saved["train_examples"] == 1437 and saved["val_examples"] == 360
    # a head on 32 frozen features of a 4-step pre-train still reads the digits far above chance (10%)
    assert saved["val_top1_final"] > 40
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    assert not (tmp_path / "a" / "checkpoints").exists()  # nothing of the backbone is trained or saved


def test_the_head_is_keyed_by_the_seed(tiny_pretrain_run, tmp_path):
    runs = [linear_probe.run(probe_config(tiny_pretrain_run, seed=s, **{"probe.epochs": 3}), str(tmp_path / f"s{i}"),
                             MESH()) for i, s in enumerate((0, 0, 1))]
    heads = [np.asarray(r.state["kernel"]) for r in runs]
    np.testing.assert_array_equal(heads[0], heads[1])
    assert not np.allclose(heads[0], heads[2])


def test_bad_input(tiny_pretrain_run, tmp_path):
    for overrides, message in (({"probe.epochs": 0}, "probe.epochs=0 must be > 0"),
                               ({"probe.batch_size": 5000}, "fewer than probe.batch_size=5000"),
                               ({"step": 7}, "keeps no checkpoint at step 7")):
        with pytest.raises(ConfigError, match=message):
            linear_probe.run(probe_config(tiny_pretrain_run, **overrides), str(tmp_path / "out"), MESH())
        assert not (tmp_path / "out").exists()
