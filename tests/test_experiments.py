"""The experiment runner: each run once, an interrupted grid resumes, results.md / results.png from the runs."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_MODEL, TINY_PRETRAIN
from onepfrac_jax.configs import bootstrap as bootstrap_config
from PIL import Image

from onepfrac_jax import experiments

pytestmark = pytest.mark.slow  # the fast tier leaves this file out (pyproject.toml, markers)

_FINETUNE = {"image_size": 16, "data.image_size": 16, "batch_size": 16, "total_steps": 4, "log_every_steps": 2,
             "checkpoint_every_steps": 2, "eval_every_steps": 2, **TINY_MODEL}
_PROBE = {"data.image_size": 16, "batch_size": 64, "probe.epochs": 4}


def _flags(overrides: dict) -> tuple[str, ...]:
    return tuple(f"--config.{k}={v}" for k, v in overrides.items())


# fdsl_delta's own arms (experiments.delta_grid) at a tiny budget: one Δ, a fine-tune and a probe sharing its pre-train
TINY = experiments.Grid(
    description="a tiny fdsl grid",
    arms=experiments.delta_grid(
        (0.1,), ("configs/pretrain.py:demo", *_flags(TINY_PRETRAIN)),
        (("digits fine-tune", "configs/finetune.py:digits_demo", _flags(_FINETUNE)),
         ("photos probe", "configs/linear_probe.py:photos_demo", _flags(_PROBE)))),
    early=0.5,
    paper=("the paper", {"scratch": 64.2, "Δ=0.1": 84.2}),
)
ARM = "Δ=0.1 · digits fine-tune"


def test_a_grid_runs_each_run_once_resumes_and_tabulates_its_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(experiments.GRIDS, "tiny", TINY)
    experiments.run_grid("tiny", 2, tmp_path)
    root = tmp_path / "tiny"
    arm = root / experiments._slug(ARM)
    results = [json.loads((arm / f"seed{s}" / "result.json").read_text()) for s in range(2)]
    finals = [r["val_top1_final"] for r in results]
    # the table's numbers are the runs' own
    text = (root / "results.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith(f"| {ARM} |"))
    mean, std = np.mean(finals), np.std(finals, ddof=1)
    assert f"| {mean:.1f} ± {std:.1f} |" in row and " ".join(f"{v:.1f}" for v in finals) in row
    # what ran, from the runs' own configs: the grid's overrides (4 steps of 16), not its configs' defaults
    assert (f"- {ARM}: pre-train 1p-frac Δ=0.1, 8 classes rendered at 32², resized to 16²; 4 steps of 8 — then "
            "digits at 16²; 4 steps of 16\n") in text
    assert ("- Δ=0.1 · photos probe: pre-train 1p-frac Δ=0.1, 8 classes rendered at 32², resized to 16²; 4 steps of "
            "8 — then linear probe on photo_crops decoded at 16²; 4 epochs of 256-feature minibatches (28 steps)\n"
            ) in text
    # the fine-tunes and the probes of Δ=0.1 started from its one pre-train
    pre = root / "pretrain_Δ_0.1"
    for name in (ARM, "Δ=0.1 · photos probe"):
        for s in range(2):
            config = json.loads((root / experiments._slug(name) / f"seed{s}" / "config.json").read_text())
            assert config["init_from"] == str(pre) and config["seed"] == s
    assert len(re.findall(r"--workdir \S*pretrain_Δ_0.1\b", capsys.readouterr().out)) == 1
    # the summary: a row per pre-train, a column per read-out, final (early) and the paper's figure
    early = [next(h["val_top1"] for h in r["history"] if "val_top1" in h and h["step"] >= r["total_steps"] / 2)
             for r in results]
    probes = [json.loads((root / experiments._slug("Δ=0.1 · photos probe") / f"seed{s}" / "result.json").read_text())
              for s in range(2)]
    assert probes[0]["val_top1_final"] != probes[1]["val_top1_final"]  # each seed its own head
    probe = experiments._mean_std([r["val_top1_final"] for r in probes])
    summary = text[text.index("## Summary"):]
    assert "|  | digits fine-tune | photos probe | the paper |" in summary
    assert f"| Δ=0.1 | {mean:.1f} ± {std:.1f} ({experiments._mean_std(early)}) | {probe} (" in summary
    assert re.search(r"\| scratch \| [\d.]+ ± [\d.]+ \([\d.]+ ± [\d.]+\) \| — \| 64\.2 \|", summary)
    assert "| 84.2 |" in summary
    # summary.png has a second panel, the pre-trains' own curves, when its rows have pre-trains
    for chart, width in (("results.png", 300), ("curves.png", 300), ("summary.png", 1000)):
        with Image.open(root / chart) as png:
            assert png.size[0] > width and png.size[1] > 200
    # the curves chart reads each run's eval rows: they end at its final top-1
    steps, values = experiments.eval_curve(arm / "seed0", "val_top1")
    assert steps[-1] == results[0]["total_steps"] and values[-1] == pytest.approx(finals[0], abs=1e-3)

    # again: nothing is re-run
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("result.json")}
    experiments.run_grid("tiny", 2, tmp_path)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("result.json")} == stamps
    assert "running" not in capsys.readouterr().out

    # an interrupted run (no result.json yet) resumes from its checkpoint, to the same result
    (arm / "seed1" / "result.json").unlink()
    experiments.run_grid("tiny", 2, tmp_path)
    again = json.loads((arm / "seed1" / "result.json").read_text())
    assert again["history"] == results[1]["history"]
    assert re.search(r"running: .*seed1", capsys.readouterr().out)


def test_a_failing_run_or_an_unknown_arm_stops_the_grid_with_one_line(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match=r"no arm \['nope'\] in bootstrap_digits; its arms: \['ViT alone'"):
        experiments.run_grid("bootstrap_digits", 1, tmp_path, arms=["nope"])
    monkeypatch.setitem(experiments.GRIDS, "tiny", TINY)
    with pytest.raises(SystemExit, match=r"the run in .*pretrain_Δ_0.1 failed \(exit 2\); its log: .*_0.1\.log"):
        experiments.run_grid("tiny", 1, tmp_path, arms=[ARM], pretrain_extra=("--config.batch_size=0",))
    assert "batch_size" in (tmp_path / "tiny" / "pretrain_Δ_0.1.log").read_text()


def _fake_cifar100(data_dir: Path) -> None:
    """A TFDS 'cifar100' in array_record format with the real one's version and features: 200 train, 100 test."""
    import tensorflow_datasets as tfds

    class Cifar100(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("3.0.2")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(), "image": tfds.features.Image(shape=(32, 32, 3)),
                "label": tfds.features.ClassLabel(num_classes=100),
                "coarse_label": tfds.features.ClassLabel(num_classes=20)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(200, 0), "test": self._generate_examples(100, 1)}

        def _generate_examples(self, n, seed):
            rng = np.random.default_rng(seed)
            for i in range(n):
                pixels = np.clip(rng.normal(2.5 * (i % 100), 20, (32, 32, 3)), 0, 255).astype(np.uint8)
                yield f"{seed}_{i}", {"id": f"{seed}_{i}", "image": Image.fromarray(pixels), "label": i % 100,
                                      "coarse_label": (i % 100) // 5}

    Cifar100(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def test_the_gpu_cifar100_grid_runs_as_written_on_a_tfds_cifar100_folder(tmp_path):
    """fdsl_cifar100 with only its budget and sizes shrunk: the real configs read CIFAR-100 from TFDS, the
    fine-tune starts from its pre-train, and the summary sets the paper's figures beside the runs'."""
    data_dir = tmp_path / "tfds"
    _fake_cifar100(data_dir)
    finetune = {"data.data_dir": data_dir, "image_size": 16, "data.image_size": 16, "batch_size": 16,
                "total_steps": 2, "eval_every_steps": 1, "checkpoint_every_steps": 2, "log_every_steps": 1,
                **TINY_MODEL}
    experiments.main(["fdsl_cifar100", "--seeds", "1", "--out", str(tmp_path), "--arms", "1p-frac Δ=0.1",
                      *(f"--set={k}={v}" for k, v in finetune.items()),
                      *(f"--pretrain_set={k}={v}" for k, v in TINY_PRETRAIN.items())])
    root = tmp_path / "fdsl_cifar100"
    text = (root / "results.md").read_text()
    assert ("- 1p-frac Δ=0.1: pre-train 1p-frac Δ=0.1, 8 classes rendered at 32², rrc crops of 0.08–1 of the area to "
            "16², mixup 0.8 / cutmix 1, rand-m9-mstd0.5-inc1, erasing 0.5; 4 steps of 8 — then tfds:cifar100 at 16²; "
            "2 steps of 16\n") in text
    log = (root / "1p-frac_Δ_0.1" / "seed0.log").read_text()
    assert "tfds:cifar100: 200 train / 100 test examples, 100 classes" in log
    config = json.loads((root / "1p-frac_Δ_0.1" / "seed0" / "config.json").read_text())
    assert config["init_from"] == str(root / "1p-frac_Δ_0.1" / "pretrain") and config["num_epochs"] == 100
    final = json.loads((root / "1p-frac_Δ_0.1" / "seed0" / "result.json").read_text())["val_top1_final"]
    summary = text[text.index("## Summary"):]
    assert "|  | CIFAR-100 fine-tune | paper (full budget) |" in summary
    rows = [line for line in summary.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 1 and rows[0].startswith(f"| 1p-frac Δ=0.1 | {final:.1f} ± 0.0 (")
    assert rows[0].endswith(" 84.2 |")


def test_every_joint_variant_has_its_lone_baseline():
    for name in [n for n in bootstrap_config.VARIANTS if n.endswith("_joint")]:
        joint, alone = (bootstrap_config.get_config(name.removesuffix("_joint") + s) for s in ("_joint", "_alone"))
        assert (alone.loss.kd_vit, alone.loss.kd_cnn, alone.loss.hint) == (0.0, 0.0, 0.0)
        alone.loss.update(dict(kd_vit=joint.loss.kd_vit, kd_cnn=joint.loss.kd_cnn, hint=joint.loss.hint))
        assert alone.to_dict() | {"variant": name} == joint.to_dict()
