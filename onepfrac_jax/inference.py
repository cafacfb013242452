"""Use a trained run: `load(workdir, step=None)` returns a function from uint8 images to logits."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import jax
import ml_collections
import numpy as np

from onepfrac_jax.config import STAGES, ConfigError, require
from onepfrac_jax.data.augment import augment_config, eval_transform
from onepfrac_jax.rundir import CONFIG_NAME
from onepfrac_jax.train import classify
from onepfrac_jax.train.checkpoint import load_variables

CLASSIFY_STAGES = ("pretrain", "finetune")


def run_config(workdir: Path) -> ml_collections.ConfigDict:
    """The saved config of the run in `workdir`; ConfigError when workdir holds no run of this project."""
    path = workdir / CONFIG_NAME
    try:
        saved = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"{workdir} is not a run directory (no readable {CONFIG_NAME}: {e.strerror})") from e
    except ValueError as e:
        raise ConfigError(f"{workdir} is not a run directory ({path} is not JSON: {e})") from e
    require(isinstance(saved, dict) and saved.get("stage") in STAGES,
            f"{workdir} is not a run directory of this project ({path} names none of its stages)")
    return ml_collections.ConfigDict(saved)


def load(workdir: str | Path, step: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """A pre-train or fine-tune run's checkpoint at `step` (None: the latest; any kept step, also while the run
    trains) → f(images uint8 (N, H, W, 3)) -> logits (N, classes).

    Images go through the run's eval transform (resize / centre crop to the run's image size, normalisation).
    """
    workdir = Path(workdir)
    config = run_config(workdir)
    if config.stage not in CLASSIFY_STAGES:
        raise ConfigError(f"{workdir} is a {config.stage!r} run; load() serves {', '.join(CLASSIFY_STAGES)} runs")
    variables = load_variables(workdir, step)
    model = classify.build_vit(config, classify.head_classes(variables["params"]))
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
