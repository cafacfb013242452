"""What the ViT classification stages (pre-train, fine-tune) share: the model fields, loss, evaluation, export, and
the pre-trained weights a run starts from (`init_from`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from onepfrac_jax.config import MAX_IMAGE_SIDE, TRAINING_STAGES, ConfigError, require, require_int
from onepfrac_jax.data.augment import AugmentConfig, augment_config, eval_transform
from onepfrac_jax.export.timm import export_vit, load_timm_weights
from onepfrac_jax.models import DTYPES, VIT_PRESETS, ViT, create_vit, resolve_attention, resolve_dtype
from onepfrac_jax.models.precision import validate_attention
from onepfrac_jax.rundir import read_run_config, without_model
from onepfrac_jax.train.loop import TrainState
from onepfrac_jax.train.losses import soft_cross_entropy, top1_correct

# Free ViT dimensions: -1 keeps the preset's value.
FREE_DIMS = ("embed_dim", "depth", "num_heads", "mlp_dim", "patch_size")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def add_model_fields(config: ml_collections.ConfigDict, model: str) -> None:
    config.model = model  # a ViT preset: vit_tiny_patch16_224, vit_small_patch16_224, vit_base_patch16_224, ...
    for name in FREE_DIMS:
        setattr(config, name, -1)  # overrides the preset's dimension when > 0
    config.drop_path = 0.1  # stochastic depth of the last block (linear over depth, as timm)
    config.dropout = 0.0
    # replaces the loop's float32: bfloat16 on TPUs and GPUs of compute capability ≥ 8.0, float16 (dynamic loss
    # scaling) on 7.x (V100), float32 on CPUs; the log says which (models.precision)
    config.dtype = "auto"
    config.remat = False  # recompute each block in the backward pass: less activation memory, ~1/3 more compute
    # attention kernel: 'auto' (cuDNN flash attention on NVIDIA GPUs of compute capability ≥ 8.0 in bfloat16/
    # float16, where a probe of the model's shape runs and matches XLA's; XLA elsewhere; logged), 'xla' or 'cudnn'
    config.attention = "auto"


def build_vit(config: ml_collections.ConfigDict, num_classes: int) -> ViT:
    """The configured ViT at config.image_size; a bad preset name or shape is one ConfigError."""
    overrides = {name: config[name] for name in FREE_DIMS if config[name] > 0}
    try:
        # A run's saved config rebuilt elsewhere (inference, export) takes 'auto' as these devices resolve it;
        # configs saved before `remat` existed have none.
        dtype = resolve_dtype(config.dtype)
        model = create_vit(config.model, num_classes=num_classes, img_size=config.image_size,
                           drop_path_rate=config.drop_path, drop_rate=config.dropout, dtype=DTYPES[dtype],
                           remat=config.get("remat", False), **overrides)
        shape = (model.num_patches + 1, model.num_heads, model.embed_dim // model.num_heads)
        # configs saved before `attention` existed have none: 'auto' (the kernel changes no parameter)
        return model.clone(attention_impl=resolve_attention(config.get("attention", "auto"), dtype, shape))
    except ValueError as e:
        raise ConfigError(f"model: {e}") from e


def validate_model_fields(config: ml_collections.ConfigDict) -> None:
    """The ViT fields of add_model_fields, and the augmentation's size against image_size."""
    require(config.model in VIT_PRESETS, f"model={config.model!r} is not one of {', '.join(sorted(VIT_PRESETS))}")
    for name in FREE_DIMS:
        require(config[name] == -1 or config[name] > 0, f"{name}={config[name]} must be > 0 (or -1: the preset's)")
        require_int(name, config[name], -1)
    require_int("image_size", config.image_size, 1, MAX_IMAGE_SIDE, " (an image's pixels are indexed in int32)")
    require(0 <= config.drop_path < 1 and 0 <= config.dropout < 1, "drop_path and dropout must lie in [0, 1)")
    require(isinstance(config.remat, bool), f"remat={config.remat!r} must be True or False")
    require(config.dtype in DTYPES, f"dtype={config.dtype!r} is not one of {', '.join(DTYPES)}")
    require(augment_config(config.augment).size == config.image_size,
            f"augment.size={config.augment.size} must equal image_size={config.image_size}")
    try:
        validate_attention(config.attention, resolve_dtype(config.dtype))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    # The loop turns float16's dynamic loss scaling on by the config's name, so 'auto' that means float16 (V100)
    # is written as 'float16' before the run directory is opened: config.json then says so, and a resume on
    # other hardware is a config change. 'auto' that means float32 or bfloat16 stays 'auto'.
    if config.dtype == "auto" and resolve_dtype(config.dtype) == "float16":
        config.dtype = "float16"


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
        correct = total = 0  # summed on the device: one fetch per evaluation, not one per batch
        for batch in batches():
            c, n = counts(state.params, batch)
            correct, total = correct + c, total + n
        return {"val_top1": 100.0 * int(correct) / max(int(total), 1)}

    return evaluate


def head_classes(params: dict) -> int:
    """The class count of a ViT's params (its head's), e.g. of a fine-tune whose count came from its data."""
    return int(np.shape(params["head"]["bias"])[0])


def final_variables(state: TrainState) -> dict:
    """A train state's params and other collections on the host, as a checkpoint's `variables`."""
    return jax.device_get({"params": state.params, **state.extra})


def export_variables(model: ViT, augment: AugmentConfig, variables: dict, out_dir: Path) -> dict:
    """What a run's export/ holds, from its `variables`: the ViT as timm weights (model.safetensors with
    config.json, the Hub layout timm's `local-dir:` loads; model.pth and timm.json) with the run's eval transform."""
    return export_vit(variables["params"], model.clone(dtype=jnp.float32), out_dir, augment.mean, augment.std,
                      interpolation=augment.interpolation, crop_pct=augment.crop_pct, overwrite=True)


def make_export(model: ViT, augment: AugmentConfig) -> Callable[[TrainState, Path], dict]:
    """The end-of-run export (Task.export)."""
    return lambda state, out_dir: export_variables(model, augment, final_variables(state), out_dir)


def export_checkpoint(config: ml_collections.ConfigDict, variables: dict, out_dir: Path) -> dict:
    """The export stage's: what a pre-train or fine-tune run with `config` exports from these checkpoint variables."""
    model = build_vit(config, head_classes(variables["params"]))
    return export_variables(model, augment_config(config.augment), variables, out_dir)


def init_weights_path(init_from: str) -> Path:
    """The timm-format weights file named by `init_from`: a file, an export folder's model.safetensors (the Hub
    layout: a run's export/, or a timm model downloaded from the Hub), or a run directory's export/model.safetensors."""
    path = Path(init_from)
    if path.is_dir():
        if (path / "model.safetensors").is_file():
            return path / "model.safetensors"
        exported = path / "export" / "model.safetensors"
        require((path / "config.json").exists(), f"init_from={init_from} is a directory but neither a run directory "
                                                 f"nor an export folder (no config.json, no model.safetensors)")
        if not exported.exists():
            stage = read_run_config(path).stage
            require(stage not in TRAINING_STAGES, f"init_from={init_from}: the run has no export yet ({exported} is "
                                                  f"missing); let it finish, or point at a weights file")
            raise ConfigError(f"{without_model(f'init_from={init_from}', stage, 'trains no model')} (init_from takes "
                              f"a {', '.join(TRAINING_STAGES)} run, an export folder or a weights file)")
        return _weights_file(exported, init_from)
    require(path.exists(), f"init_from={init_from} does not exist")
    require(path.suffix in WEIGHT_SUFFIXES, f"init_from={init_from}: expected a run directory, an export folder or "
                                            f"a weights file ({', '.join(WEIGHT_SUFFIXES)})")
    return _weights_file(path, init_from)


def _weights_file(path: Path, init_from: str) -> Path:
    """`path` when it is a regular file or a symlink to one: reading a FIFO would wait forever for a writer."""
    require(path.is_file(), f"init_from={init_from}: {path} is not a regular file (a FIFO, socket or device); name "
                            f"the weights file itself")
    return path


def load_init_params(init_from: str, model: ViT, key: jax.Array) -> dict:
    """Pre-trained params for `model`; the head is re-initialised when the class count differs, position
    embeddings of another image size are resampled to the model's patch grid (as timm does)."""
    path = init_weights_path(init_from)
    try:
        params = load_timm_weights(path, model, rng=key)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"init_from={init_from}: {e}") from e
    logging.info("initialised from %s", path)
    return params
