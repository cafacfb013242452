"""Use a trained run: `load(workdir, step=None, model="vit", ema=False)` returns a function from uint8 images to logits.

It serves pre-train and fine-tune runs (their ViT) and bootstrap runs (the ViT, or with model="agent" the CNN agent;
a shared agent is served as the plain CNN its ViT weights define). `load_classifier` is the same model as a
`Classifier` (module, variables, eval transform), and `weights_classifier` builds one from a timm weights file:
the evaluate and linear_probe stages use both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from onepfrac_jax.config import TRAINING_STAGES, ConfigError, require, require_choice
from onepfrac_jax.data.augment import AugmentConfig, augment_config, eval_transform
from onepfrac_jax.export.timm import load_timm_weights, read_state_dict
from onepfrac_jax.models.agent import SharedAgent, materialize_shared_agent
from onepfrac_jax.rundir import read_run_config
from onepfrac_jax.train import classify, pair
from onepfrac_jax.train.checkpoint import read_checkpoint

# each of config.TRAINING_STAGES, in its order, -> (its run's config, checkpoint variables, out dir) -> {name: path}:
# the files of the run's export/, written by the run's own end and by the export stage
EXPORTERS = dict(zip(TRAINING_STAGES, (classify.export_checkpoint, classify.export_checkpoint, pair.export_checkpoint),
                     strict=True))
MODELS = ("vit", "agent")  # what a bootstrap run serves


@dataclasses.dataclass(frozen=True)
class Classifier:
    """A trained classifier: `module.apply(variables, eval_transform(augment, images), train=False)` are its logits."""

    module: nn.Module  # a ViT or a CNN agent
    variables: dict  # {'params': ...} and, for an agent, its 'batch_stats'
    augment: AugmentConfig  # the eval transform of the run (resize / centre crop to its size, normalisation)
    step: int  # the checkpoint's step (0 for a weights file)

    @property
    def num_classes(self) -> int:
        return int(self.module.num_classes)

    def logits_fn(self) -> Callable[[Any, jax.Array], jax.Array]:
        """jit((variables, uint8 images (N, H, W, 3)) -> float32 logits (N, classes)), device arrays in and out."""

        @jax.jit
        def logits(variables, images):
            return self.module.apply(variables, eval_transform(self.augment, images, self.module.dtype), train=False)

        return logits


def load_classifier(workdir: str | Path, step: int | None = None, model: str = "vit",
                    ema: bool = False) -> Classifier:
    """The classifier of a run's checkpoint at `step` (None: the latest kept); ConfigError for anything else.

    `model`: 'vit', or for a bootstrap run 'agent'. `ema`: the moving average of the weights (runs with
    ema_decay > 0) instead of the weights.
    """
    workdir = Path(workdir)
    require_choice("model", model, MODELS)
    config = read_run_config(workdir)
    require(config.stage in TRAINING_STAGES,
            f"{workdir} is a {config.stage!r} run; only {', '.join(TRAINING_STAGES)} runs have a model to serve")
    require(model == "vit" or config.stage == "bootstrap",
            f"{workdir} is a {config.stage} run, whose only model is its ViT; model='agent' serves a bootstrap run's")
    found, variables, _ = read_checkpoint(workdir, step, ema)
    augment = augment_config(config.augment)
    if config.stage != "bootstrap":
        vit = classify.build_vit(config, classify.head_classes(variables["params"]))
        return Classifier(vit, {"params": variables["params"]}, augment, found)
    params = variables["params"]
    vit, agent = pair.build_models(config, classify.head_classes(params["vit"]))
    if model == "vit":
        return Classifier(vit, {"params": params["vit"]}, augment, found)
    agent_variables = {"params": params["agent"], "batch_stats": variables["batch_stats"]}
    if isinstance(agent, SharedAgent):  # its convs and MLPs are computed from the ViT's weights, once, here
        agent, agent_variables = materialize_shared_agent(agent, agent_variables, params["vit"])
    return Classifier(agent, agent_variables, augment, found)


def weights_classifier(path: Path, config: ml_collections.ConfigDict) -> Classifier:
    """The ViT of a timm weights file (.safetensors / .pth), built from `config`'s model fields (model, dimensions,
    image_size) with the class count of the file's head (0: no head, the model returns its features), and the eval
    transform of `config.augment`."""
    try:
        state_dict = read_state_dict(path)
        head = state_dict.get("head.weight", state_dict.get("module.head.weight"))
        vit = classify.build_vit(config, 0 if head is None else int(np.shape(head)[0]))
        params = load_timm_weights(state_dict, vit)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"init_from={path}: {e}") from e
    return Classifier(vit, {"params": params}, augment_config(config.augment), 0)


def load(workdir: str | Path, step: int | None = None, model: str = "vit",
         ema: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    """A run's checkpoint at `step` (None: the latest; any kept step, also while the run trains) → f(images uint8
    (N, H, W, 3)) -> logits (N, classes): a pre-train or fine-tune run's ViT, a bootstrap run's ViT or (model="agent")
    its agent; `ema`: the moving average of the weights.

    Images go through the run's eval transform (resize / centre crop to the run's image size, normalisation).
    """
    classifier = load_classifier(workdir, step, model, ema)
    logits = classifier.logits_fn()

    def predict(images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
        return np.asarray(logits(classifier.variables, images), np.float32)

    return predict
