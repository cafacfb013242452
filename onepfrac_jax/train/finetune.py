"""The fine-tune stage: a ViT, from scratch or pre-trained weights, trained on a real dataset (SPEC §A5).

The host only decodes (grain: seeded shuffle, shard by process, fixed-size uint8); every augmentation runs on
the device, keyed by (seed, step, global example index) like pre-training.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_collections
from absl import logging

from onepfrac_jax.config import ConfigError, require
from onepfrac_jax.data import pipeline
from onepfrac_jax.data.augment import augment_batch, augment_config
from onepfrac_jax.data.sources import make_source
from onepfrac_jax.export.timm import load_timm_weights
from onepfrac_jax.models.vit import ViT
from onepfrac_jax.parallel.mesh import Mesh, data_sharding, make_data_mesh
from onepfrac_jax.train import classify, loop

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def init_weights_path(init_from: str) -> Path:
    """The timm-format weights file named by `init_from`: a file, or a run directory's export/model.safetensors."""
    path = Path(init_from)
    if path.is_dir():
        exported = path / "export" / "model.safetensors"
        require((path / "config.json").exists(), f"init_from={init_from} is a directory but not a run directory")
        require(exported.exists(), f"init_from={init_from}: the run has no export yet ({exported} is missing); "
                                   f"let it finish, or point at a weights file")
        return exported
    require(path.exists(), f"init_from={init_from} does not exist")
    require(path.suffix in WEIGHT_SUFFIXES, f"init_from={init_from}: expected a run directory or a weights file "
                                            f"({', '.join(WEIGHT_SUFFIXES)})")
    return path


def load_init_params(init_from: str, model: ViT, key: jax.Array) -> dict:
    """Pre-trained params for `model`; the head is re-initialised when the class count differs."""
    path = init_weights_path(init_from)
    try:
        params = load_timm_weights(path, model, rng=key)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"init_from={init_from}: {e}") from e
    logging.info("initialised from %s", path)
    return params


def run(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh | None = None) -> loop.TrainState:
    # ---- config and data --------------------------------------------------------------------------------------
    loop.validate_train_config(config)
    classify.validate_model_fields(config)
    augment = augment_config(config.augment)
    require(augment.size == config.image_size, f"augment.size={augment.size} must equal image_size={config.image_size}")
    train_source = make_source(config.data, "train")
    val_source = make_source(config.data, config.data.eval_split)
    require(len(train_source) >= config.batch_size,
            f"the train split has {len(train_source)} examples, fewer than batch_size={config.batch_size}")
    num_classes = train_source.num_classes
    model = classify.build_vit(config, num_classes)
    mesh = make_data_mesh() if mesh is None else mesh
    sharding = data_sharding(mesh)
    batch = config.batch_size
    steps_per_epoch = pipeline.steps_per_epoch(len(train_source), batch)
    total = loop.total_steps(config, steps_per_epoch)
    init_params = load_init_params(config.init_from, model, jax.random.key(config.seed)) if config.init_from else None
    logging.info("%s: %d train / %d %s examples, %d classes, %d steps/epoch", config.data.name, len(train_source),
                 len(val_source), config.data.eval_split, num_classes, steps_per_epoch)

    def init_variables(key):
        if init_params is not None:
            return {"params": init_params}
        return model.init(key, jax.numpy.zeros((1, config.image_size, config.image_size, 3)))

    def inputs(start: int):
        return pipeline.train_inputs(train_source, config.data, seed=config.seed, global_batch=batch,
                                     sharding=sharding, start=start)

    def make_batch(key, item, step):
        x, targets = augment_batch(augment, key, item["image"], item["label"], item["index"], num_classes,
                                   model.dtype)
        return {"image": x, "target": targets}

    def val_batches():
        return pipeline.eval_batches(val_source, global_batch=batch, sharding=sharding,
                                     num_threads=config.data.num_threads)

    task = loop.Task(
        init_variables=init_variables,
        make_batch=make_batch,
        loss_fn=classify.soft_target_loss(model),
        inputs=inputs,
        evaluate=classify.make_evaluate(model, augment, val_batches),
        export=classify.make_export(model, augment),
        total_steps=total,
        steps_per_epoch=steps_per_epoch,
        global_batch=batch,
        eval_names=("val_top1",),
    )
    state = loop.train(task, config, workdir, mesh)
    accuracy = classify.report_accuracy(Path(workdir))
    if accuracy is not None and jax.process_index() == 0:
        best, final = accuracy
        print(f"val top-1: max {best:.2f}%, final {final:.2f}%")
        (Path(workdir) / "result.json").write_text(json.dumps({"val_top1_max": best, "val_top1_final": final}))
    return state
