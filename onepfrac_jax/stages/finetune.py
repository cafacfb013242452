"""The fine-tune stage: a ViT, from scratch or pre-trained weights, trained on a real dataset (SPEC §A5).

The host only decodes (grain: seeded shuffle, shard by process, fixed-size uint8); every augmentation runs on
the device, keyed by (seed, step, global example index) like pre-training.
"""

from __future__ import annotations

import jax
import ml_collections
from absl import logging

from onepfrac_jax.config import require_path
from onepfrac_jax.data import pipeline, sources
from onepfrac_jax.data.augment import augment_batch, augment_config
from onepfrac_jax.parallel.mesh import Mesh, data_sharding
from onepfrac_jax.train import classify, loop


def validate(config: ml_collections.ConfigDict) -> None:
    """Every check that reads nothing (init_from's file is checked by `run`, before anything is loaded)."""
    classify.validate_model_fields(config)
    require_path("init_from", config.init_from)
    sources.validate_section(config.data)
    loop.validate_train_fields(config)


def run(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh | None = None) -> loop.Result:
    validate(config)
    if config.init_from:
        classify.init_weights_path(config.init_from)
    augment = augment_config(config.augment)
    with loop.prepare(config, workdir, mesh) as run:
        data = pipeline.open_host_data(config.data, seed=config.seed, global_batch=config.batch_size,
                                       sharding=data_sharding(run.mesh))
        num_classes = data.train.num_classes
        model = classify.build_vit(config, num_classes)
        init_params = None
        if config.init_from:
            init_params = classify.load_init_params(config.init_from, model, jax.random.key(config.seed))
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
