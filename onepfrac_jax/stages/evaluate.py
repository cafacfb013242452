"""The evaluate stage: a trained run or a timm weights file scored on a dataset (top-1, top-5, confusion matrix).

Nothing is trained and nothing random happens: every image of the split goes once through the model's eval
transform, in global batches split over the `data` mesh (the last one padded and masked). Writes
WORKDIR/result.json, confusion.png (rows: true class, normalised to recall) and confusion.csv (counts).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from onepfrac_jax.config import require, require_choice, require_int, require_path, require_representable
from onepfrac_jax.data import pipeline
from onepfrac_jax.data.sources import Source, make_source, validate_section, verify_source
from onepfrac_jax.files import write_errors, write_file
from onepfrac_jax.inference import MODELS, Classifier, load_classifier, weights_classifier
from onepfrac_jax.parallel.mesh import Mesh, data_sharding, make_data_mesh, to_host
from onepfrac_jax.rundir import Result, RunDir, read_run_config
from onepfrac_jax.train import classify

TOP_K = 5
PROGRESS_EVERY_S = 10.0  # the progress line's interval (and one at the end)


@dataclasses.dataclass
class Scored(Result):
    """A Result whose result.json also holds the scores (top1, top5, ...) at its top level."""

    scores: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        return {**super().to_json(), **self.scores}


def validate_source_fields(config: ml_collections.ConfigDict, devices: int) -> None:
    """The fields of configs/evaluate.py's add_source_fields, before any model or data is read."""
    require(str(config.init_from).strip() != "",
            "init_from is empty; name a run directory or a weights file: --config.init_from=RUN_OR_WEIGHTS")
    require_path("init_from", config.init_from)
    require(config.step >= -1, f"step={config.step} must be a checkpoint's step, or -1 for the latest")
    require_int("step", config.step, -1)
    require(config.batch_size > 0 and config.batch_size % devices == 0,
            f"batch_size={config.batch_size} must be > 0 and divisible by the {devices} devices of all processes")
    require_int("batch_size", config.batch_size, 1)
    classify.validate_model_fields(config)
    validate_section(config.data)


def validate(config: ml_collections.ConfigDict, devices: int | None = None) -> None:
    """Every check that reads no model and no data; `devices`: those of the mesh (default: all of all processes)."""
    validate_source_fields(config, jax.device_count() if devices is None else devices)
    require_choice("bootstrap_model", config.bootstrap_model, MODELS)
    require_representable(config)


def open_classifier(config: ml_collections.ConfigDict,
                    model: str = "vit") -> tuple[Classifier, ml_collections.ConfigDict | None]:
    """The classifier `config.init_from` names and the saved config of its run (None for a weights file).

    A directory holding a config.json of this project is a run (its checkpoint at `config.step`, the EMA with
    `config.ema`); an export folder (an export stage's directory too) or a file is weights, built from the config's
    model fields.
    """
    path = Path(config.init_from).expanduser()
    step = None if config.step == -1 else config.step
    if path.is_dir() and not (path / "model.safetensors").is_file():
        saved = read_run_config(path)
        if saved.stage != "export":
            return load_classifier(path, step, model, config.ema), saved
    require(step is None and not config.ema,
            f"init_from={config.init_from} is weights, not a run: step and ema select a run's checkpoint (an EMA "
            f"export is the folder export/ema)")
    require(model == "vit", f"init_from={config.init_from} is ViT weights; bootstrap_model='agent' needs a bootstrap "
                            f"run directory")
    return weights_classifier(classify.init_weights_path(str(path)), config), None


def eval_data(config: ml_collections.ConfigDict, saved: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
    """The data section to score on: config.data, or with its name '' the run's own, else digits."""
    if config.data.name:
        return config.data
    if saved is not None and "data" in saved:
        return saved.data
    digits = ml_collections.ConfigDict(config.data.to_dict())
    digits.name = "digits"
    return digits


def _describe(data: ml_collections.ConfigDict) -> str:
    where = f" in {data.data_dir}" if data.get("data_dir") else ""
    return f"{data.name}{where}, split {data.eval_split}"


def score(classifier: Classifier, source: Source, global_batch: int, mesh: Mesh,
          num_threads: int = 2) -> tuple[np.ndarray, int]:
    """(confusion matrix (C, C) int64, rows true and columns predicted class; top-5 hits) over every example."""
    classes = classifier.num_classes
    k = min(TOP_K, classes)
    logits_fn = classifier.logits_fn()

    @jax.jit
    def predict(variables, images, labels):
        logits = logits_fn(variables, images)
        top = jax.lax.top_k(logits, k)[1]
        return top[:, 0], jnp.any(top == labels[:, None], axis=1)

    confusion = np.zeros((classes, classes), np.int64)
    top5 = seen = 0
    start = last = time.perf_counter()
    for batch in pipeline.eval_batches(source, global_batch=global_batch, sharding=data_sharding(mesh),
                                       num_threads=num_threads):
        predicted, hit = predict(classifier.variables, batch["image"], batch["label"])
        predicted, hit, labels, mask = (to_host(x) for x in (predicted, hit, batch["label"], batch["mask"]))
        np.add.at(confusion, (labels[mask], predicted[mask]), 1)
        top5 += int(hit[mask].sum())
        seen += int(mask.sum())
        now = time.perf_counter()
        if now - last >= PROGRESS_EVERY_S or seen == len(source):
            last = now
            logging.info("evaluate: %d/%d images, %.0f images/s, top-1 so far %.2f%%", seen, len(source),
                         seen / (now - start), 100.0 * np.trace(confusion) / seen)
    return confusion, top5


def write_confusion(confusion: np.ndarray, out: Path, title: str) -> dict[str, Path]:
    """confusion.csv (counts) and confusion.png (each row divided by its count: the recall of every class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = len(confusion)
    paths = {"confusion_png": out / "confusion.png", "confusion_csv": out / "confusion.csv"}
    header = "true\\predicted," + ",".join(map(str, range(classes)))
    rows = [f"{c}," + ",".join(map(str, row)) for c, row in enumerate(confusion)]
    write_file(paths["confusion_csv"], "\n".join([header, *rows]) + "\n")
    recall = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    side = min(12.0, 3.0 + classes * 0.35)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    image = ax.imshow(recall, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    if classes <= 20:  # a label per class while they stay legible
        ax.set_xticks(range(classes))
        ax.set_yticks(range(classes))
        for (r, c), value in np.ndenumerate(confusion):
            if value:
                ax.text(c, r, str(value), ha="center", va="center", fontsize=7,
                        color="white" if recall[r, c] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
    fig.tight_layout()
    write_file(paths["confusion_png"], functools.partial(fig.savefig, format="png", dpi=100))
    plt.close(fig)
    return paths


def run(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh | None = None) -> Result:
    mesh = make_data_mesh() if mesh is None else mesh
    validate(config, mesh.devices.size)
    with RunDir.open(config, workdir, resumable=False) as out:
        t0 = time.perf_counter()
        classifier, saved = open_classifier(config, config.bootstrap_model)
        data = eval_data(config, saved)
        source = make_source(data, data.eval_split)
        verify_source(source, max_files=data.get("verify_max_files", 50_000), num_threads=data.num_threads)
        require(classifier.num_classes == source.num_classes,
                f"the model's head has {classifier.num_classes} classes, {_describe(data)} has "
                f"{source.num_classes}: evaluate scores a classifier of the data's classes (choose the data with "
                f"--config.data.name=...; a pre-trained backbone is read out by configs/linear_probe.py)")
        out.begin()
        logging.info("evaluate %s (step %d) on %s: %d images, %d classes", config.init_from, classifier.step,
                     _describe(data), len(source), source.num_classes)
        confusion, top5 = score(classifier, source, config.batch_size, mesh, data.num_threads)
        total = int(confusion.sum())
        scores = {"top1": 100.0 * np.trace(confusion) / total, "top5": 100.0 * top5 / total, "examples": total,
                  "classes": source.num_classes, "top_k": min(TOP_K, source.num_classes),
                  "init_from": str(config.init_from), "data": _describe(data), "seconds": time.perf_counter() - t0}
        files = {}
        if jax.process_index() == 0:
            title = f"{config.init_from} (step {classifier.step}) on {_describe(data)}: top-1 {scores['top1']:.2f}%"
            print(f"top-1 {scores['top1']:.2f}%, top-{scores['top_k']} {scores['top5']:.2f}% on {total} images "
                  f"of {_describe(data)}")
            with write_errors("the scores are printed above; the evaluated run is untouched"):
                files = {name: str(p) for name, p in write_confusion(confusion, out.path, title).items()}
        result = Scored(stage="evaluate", step=classifier.step, total_steps=0, stopped=False, history=[],
                        files=files, state=classifier, scores=scores)
        result.write(out.path)
        return result
