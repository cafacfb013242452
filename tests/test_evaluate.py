"""The evaluate stage (runs and weights files → top-1/top-5, confusion matrix) and inference.load of bootstrap runs."""

import json
import logging
import time

import jax
import numpy as np
import pytest
from conftest import assert_one_error, make_image_folder, run_cli
from onepfrac_jax.configs import evaluate as evaluate_configs
from onepfrac_jax.configs import finetune as finetune_configs

from onepfrac_jax import inference
from onepfrac_jax.config import ConfigError, apply_overrides
from onepfrac_jax.data.sources import DigitsSource
from onepfrac_jax.parallel.mesh import make_data_mesh
from onepfrac_jax.stages import evaluate, finetune

pytestmark = pytest.mark.slow  # the fast tier leaves this file out (pyproject.toml, markers)

TINY_VIT = dict(image_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_dim=64)
MESH = lambda: make_data_mesh(jax.devices()[:2])


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A tiny fine-tune on digits: 12 steps, evaluated and checkpointed at steps 6 and 12."""
    workdir = tmp_path_factory.mktemp("evaluate") / "ft"
    c = finetune_configs.get_config("digits_demo")
    c.update(dict(**TINY_VIT, batch_size=32, total_steps=12, log_every_steps=6, checkpoint_every_steps=6,
                  eval_every_steps=6))
    c.data.image_size = 16
    c.optim.update(dict(lr=1e-2, warmup_epochs=0.0))
    finetune.run(c, str(workdir), MESH())
    return workdir


def eval_config(init_from, **overrides):
    c = evaluate_configs.get_config()
    c.init_from = str(init_from)
    c.batch_size = 64  # 360 val images: 6 batches on 2 devices, the last one padded
    return apply_overrides(c, overrides)


def digits_val(size=16):
    source = DigitsSource("val", size)
    return np.stack([source[i]["image"] for i in range(len(source))]), source.labels


def test_a_run_is_scored_on_its_own_eval_data(digits_run, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    result = evaluate.run(eval_config(digits_run), str(tmp_path / "out"), MESH())
    saved = json.loads((tmp_path / "out" / "result.json").read_text())
    trained = json.loads((digits_run / "result.json").read_text())
    # the fine-tune's own last evaluation of the same checkpoint on the same split
    assert saved["top1"] == pytest.approx(trained["val_top1_final"])
    assert saved["step"] == result.step == 12 and saved["examples"] == 360 and saved["data"] == "digits, split val"
    # the same numbers from inference.load over the whole split in one plain batch
    images, labels = digits_val()
    logits = inference.load(digits_run)(images)
    assert saved["top1"] == pytest.approx(100 * np.mean(logits.argmax(1) == labels))
    top5 = np.argsort(-logits, axis=1)[:, :5]
    assert saved["top5"] == pytest.approx(100 * np.mean((top5 == labels[:, None]).any(1)))
    assert saved["top5"] > saved["top1"]
    confusion = np.loadtxt(tmp_path / "out" / "confusion.csv", delimiter=",", skiprows=1, dtype=np.int64)[:, 1:]
    expected = np.zeros((10, 10), np.int64)
    np.add.at(expected, (labels, logits.argmax(1)), 1)
    np.testing.assert_array_equal(confusion, expected)
    assert (tmp_path / "out" / "confusion.png").stat().st_size > 0
    assert "evaluate: 360/360 images" in caplog.text  # the progress line's last report
    assert not (tmp_path / "out" / "checkpoints").exists()  # nothing trained


def test_an_earlier_step_and_the_exported_weights(digits_run, tmp_path):
    trained = json.loads((digits_run / "result.json").read_text())
    evaluate.run(eval_config(digits_run, step=6), str(tmp_path / "early"), MESH())
    early = json.loads((tmp_path / "early" / "result.json").read_text())
    assert early["step"] == 6 and early["top1"] == pytest.approx(trained["history"][0]["val_top1"])
    # the weights file of the same final checkpoint, its ViT described by the model fields: the same score
    weights = eval_config(digits_run / "export" / "model.safetensors", **TINY_VIT, **{"data.image_size": 16})
    evaluate.run(weights, str(tmp_path / "weights"), MESH())
    scored = json.loads((tmp_path / "weights" / "result.json").read_text())
    assert scored["step"] == 0 and scored["top1"] == pytest.approx(trained["val_top1_final"])


def test_bad_input_is_one_clear_error_and_writes_nothing(digits_run, tmp_path):
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "notes.txt").write_text("x")
    (tmp_path / "gen").mkdir()
    (tmp_path / "gen" / "config.json").write_text(json.dumps({"stage": "generate"}))
    make_image_folder(tmp_path / "three")
    cases = [
        (eval_config(""), "init_from is empty"),
        (eval_config(tmp_path / "stray"), "is not a run directory"),
        (eval_config(tmp_path / "gen"), "is a 'generate' run; only pretrain, finetune, bootstrap runs have a model"),
        (eval_config(digits_run, step=4), "keeps no checkpoint at step 4; the kept steps: 6, 12"),
        (eval_config(digits_run, ema=True), "kept no EMA of its weights"),
        (eval_config(digits_run, bootstrap_model="agent"), "whose only model is its ViT"),
        (eval_config(digits_run / "export" / "model.safetensors", step=6, **TINY_VIT), "step and ema select a run"),
        (eval_config(digits_run / "export" / "model.safetensors"), "init_from=.*model.safetensors"),  # not a ViT-Ti
        (eval_config(digits_run, **{"data.name": "imagefolder", "data.data_dir": str(tmp_path / "three")}),
         "the model's head has 10 classes, imagefolder in .* has 3"),
    ]
    for i, (config, message) in enumerate(cases):
        with pytest.raises(ConfigError, match=message):
            evaluate.run(config, str(tmp_path / f"out{i}"), MESH())
        assert not (tmp_path / f"out{i}").exists()


def test_the_command_line(digits_run, tmp_path):
    start = time.perf_counter()
    done = run_cli("configs/evaluate.py", tmp_path / "out", {"init_from": digits_run})
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-2000:]
    assert "top-1" in done.stdout and json.loads((tmp_path / "out" / "result.json").read_text())["stage"] == "evaluate"
    print(f"evaluate of the digits run from the command line: {seconds:.1f} s")
    again = run_cli("configs/evaluate.py", tmp_path / "out", {"init_from": digits_run})
    assert_one_error(again, 2, "already holds an evaluate run; pass --config.overwrite=True")


# ---- inference.load / evaluate serve bootstrap runs: the ViT by default, the agent by argument ----------------

def test_bootstrap_runs_serve_the_vit_and_the_agent(bootstrap_run, tmp_path):
    _, run = bootstrap_run
    trained = json.loads((run / "result.json").read_text())
    images, labels = digits_val()
    for model, name in (("vit", "val_top1_vit_final"), ("agent", "val_top1_agent_final")):
        evaluate.run(eval_config(run, bootstrap_model=model), str(tmp_path / model), MESH())
        scored = json.loads((tmp_path / model / "result.json").read_text())
        # the run's own evaluation (a shared agent computed from the ViT's weights at every call) = the served one
        assert scored["top1"] == pytest.approx(trained[name])
        predict = inference.load(run, model=model) if model == "agent" else inference.load(run)
        assert 100 * np.mean(predict(images).argmax(1) == labels) == pytest.approx(trained[name])
    vit, agent = inference.load(run)(images[:4]), inference.load(run, model="agent")(images[:4])
    assert vit.shape == agent.shape == (4, 10) and not np.allclose(vit, agent)
    with pytest.raises(ConfigError, match="model='cnn' is not one of vit, agent"):
        inference.load(run, model="cnn")
