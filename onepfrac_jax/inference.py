"""Use a trained run: `load(workdir)` returns a function from uint8 images to logits."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import jax
import ml_collections
import numpy as np

from onepfrac_jax.config import ConfigError
from onepfrac_jax.data.augment import augment_config, eval_transform
from onepfrac_jax.train import classify
from onepfrac_jax.train.checkpoint import load_variables

CLASSIFY_STAGES = ("pretrain", "finetune")


def load(workdir: str | Path) -> Callable[[np.ndarray], np.ndarray]:
    """Latest checkpoint of a pre-train or fine-tune run → f(images uint8 (N, H, W, 3)) -> logits (N, classes).

    Images go through the run's eval transform (resize / centre crop to the run's image size, normalisation).
    """
    workdir = Path(workdir)
    config_path = workdir / "config.json"
    if not config_path.exists():
        raise ConfigError(f"{workdir} is not a run directory (no config.json)")
    config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
    if config.stage not in CLASSIFY_STAGES:
        raise ConfigError(f"{workdir} is a {config.stage!r} run; load() serves {', '.join(CLASSIFY_STAGES)} runs")
    variables = load_variables(workdir)
    num_classes = int(np.shape(variables["params"]["head"]["bias"])[0])
    model = classify.build_vit(config, num_classes)
    augment = augment_config(config.augment)

    @jax.jit
    def logits(params, images):
        return model.apply({"params": params}, eval_transform(augment, images, model.dtype))

    def predict(images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
        return np.asarray(logits(variables["params"], images), np.float32)

    return predict
