"""The fine-tune stage: a ViT, from scratch or pre-trained weights, trained on a real dataset (SPEC §A5).

The host only decodes (grain: seeded shuffle, shard by process, fixed-size uint8); every augmentation runs on
the device, keyed by (seed, step, global example index) like pre-training.
"""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections
from absl import logging

from onepfrac_jax.config import ConfigError, require
from onepfrac_jax.data import pipeline
from onepfrac_jax.data.augment import augment_batch, augment_config
from onepfrac_jax.export.timm import load_timm_weights
from onepfrac_jax.models.vit import ViT
from onepfrac_jax.parallel.mesh import Mesh, data_sharding
from onepfrac_jax.train import classify, loop

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


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
        require(exported.exists(), f"init_from={init_from}: the run has no export yet ({exported} is missing); "
                                   f"let it finish, or point at a weights file")
        return exported
    require(path.exists(), f"init_from={init_from} does not exist")
    require(path.suffix in WEIGHT_SUFFIXES, f"init_from={init_from}: expected a run directory, an export folder or "
                                            f"a weights file ({', '.join(WEIGHT_SUFFIXES)})")
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


def validate(config: ml_collections.ConfigDict) -> None:
    """Every check that needs no data, weights or devices' work."""
    classify.validate_model_fields(config)
    require(augment_config(config.augment).size == config.image_size,
            f"augment.size={config.augment.size} must equal image_size={config.image_size}")
    if config.init_from:
        init_weights_path(config.init_from)


def run(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh | None = None) -> loop.Result:
    validate(config)
    augment = augment_config(config.augment)
    with loop.prepare(config, workdir, mesh) as run:
        data = pipeline.open_host_data(config.data, seed=config.seed, global_batch=config.batch_size,
                                       sharding=data_sharding(run.mesh))
        num_classes = data.train.num_classes
        model = classify.build_vit(config, num_classes)
        init_params = (load_init_params(config.init_from, model, jax.random.key(config.seed)) if config.init_from
                       else None)
        logging.info("%s", data.describe())

        def init_variables(key, initial=None):
            if initial is not None:  # the pre-trained params: an argument of the jitted init, not its constants
                return {"params": initial}
            return model.init(key, jax.numpy.zeros((1, config.image_size, config.image_size, 3)))

        def make_batch(key, item, step):
            x, targets = augment_batch(augment, key, item["image"], item["label"], item["index"], num_classes,
                                       model.dtype)
            return {"image": x, "target": targets}

        return run.train(loop.Task(
            init_variables=init_variables,
            make_batch=make_batch,
            loss_fn=classify.soft_target_loss(model),
            inputs=data.inputs,
            evaluate=classify.make_evaluate(model, augment, data.val_batches),
            export=classify.make_export(model, augment),
            steps_per_epoch=data.steps_per_epoch,
            eval_names=("val_top1",),
            initial=init_params,
        ))
