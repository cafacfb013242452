"""What the ViT classification stages (pre-train, fine-tune) share: the model fields, loss, evaluation, export."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections

from onepfrac_jax.config import ConfigError, require
from onepfrac_jax.data.augment import AugmentConfig, eval_transform
from onepfrac_jax.export.timm import export_vit
from onepfrac_jax.models import DTYPES, VIT_PRESETS, ViT, create_vit
from onepfrac_jax.train.loop import TrainState
from onepfrac_jax.train.losses import soft_cross_entropy, top1_correct

# Free ViT dimensions: -1 keeps the preset's value.
FREE_DIMS = ("embed_dim", "depth", "num_heads", "mlp_dim", "patch_size")


def add_model_fields(config: ml_collections.ConfigDict, model: str) -> None:
    config.model = model  # a ViT preset: vit_tiny_patch16_224, vit_small_patch16_224, vit_base_patch16_224, ...
    for name in FREE_DIMS:
        setattr(config, name, -1)  # overrides the preset's dimension when > 0
    config.drop_path = 0.1  # stochastic depth of the last block (linear over depth, as timm)
    config.dropout = 0.0


def build_vit(config: ml_collections.ConfigDict, num_classes: int) -> ViT:
    """The configured ViT at config.image_size; a bad preset name or shape is one ConfigError."""
    overrides = {name: config[name] for name in FREE_DIMS if config[name] > 0}
    try:
        return create_vit(config.model, num_classes=num_classes, img_size=config.image_size,
                          drop_path_rate=config.drop_path, drop_rate=config.dropout, dtype=DTYPES[config.dtype],
                          **overrides)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from e


def validate_model_fields(config: ml_collections.ConfigDict) -> None:
    require(config.model in VIT_PRESETS, f"model={config.model!r} is not one of {', '.join(sorted(VIT_PRESETS))}")
    for name in FREE_DIMS:
        require(config[name] == -1 or config[name] > 0, f"{name}={config[name]} must be > 0 (or -1: the preset's)")
    require(0 <= config.drop_path < 1 and 0 <= config.dropout < 1, "drop_path and dropout must lie in [0, 1)")


def soft_target_loss(model: ViT) -> Callable:
    """The Task loss: cross-entropy against the augmentation's soft targets (mixup/cutmix, label smoothing)."""

    def loss_fn(params, extra, batch, key):
        dropout_key, path_key = jax.random.split(key)
        logits = model.apply({"params": params}, batch["image"], train=True,
                             rngs={"dropout": dropout_key, "drop_path": path_key})
        return soft_cross_entropy(logits, batch["target"]), ({}, extra)

    return loss_fn


def make_evaluate(model: ViT, augment: AugmentConfig, batches: Callable[[], Iterable[dict]]) -> Callable:
    """Top-1 over a full pass of `batches` (image, label, mask), with the deterministic eval transform."""

    @jax.jit
    def counts(params, batch):
        logits = model.apply({"params": params}, eval_transform(augment, batch["image"], model.dtype))
        return top1_correct(logits, batch["label"], batch["mask"])

    def evaluate(state: TrainState) -> dict[str, float]:
        correct = total = 0
        for batch in batches():
            c, n = counts(state.params, batch)
            correct, total = correct + int(c), total + int(n)
        return {"val_top1": 100.0 * correct / max(total, 1)}

    return evaluate


def make_export(model: ViT, augment: AugmentConfig) -> Callable[[TrainState, Path], dict]:
    def export(state: TrainState, out_dir: Path) -> dict:
        params = jax.device_get(state.params)
        return export_vit(params, model.clone(dtype=jnp.float32), out_dir, augment.mean, augment.std, overwrite=True)

    return export
