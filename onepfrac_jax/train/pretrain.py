"""The pre-train stage: a ViT classifies the L classes of a 1p-frac bank rendered on the device.

No host input at all: step s's global batch is examples s·B … s·B + B − 1 of a stream in which every epoch is a
keyed permutation of the L classes, so the batch is a pure function of (seed, step) on any device count.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from onepfrac_jax.config import require, require_choice
from onepfrac_jax.data.augment import AugmentConfig, augment_batch, augment_config
from onepfrac_jax.fractals import render
from onepfrac_jax.fractals.bank import BankSpec, build_bank, render_options
from onepfrac_jax.models.vit import ViT
from onepfrac_jax.parallel.mesh import Mesh, data_sharding, replicated
from onepfrac_jax.train import classify, loop

DATA_MODES = ("bank", "fresh")
# Pre-train fields named after BankSpec's differ in two places: the bank has its own seed and render size.
_RENAMED = {"seed": "fractal_seed", "image_size": "render_size"}
_ORDER_STREAM = 2


def epoch_labels(order_key: jax.Array, indices: jax.Array, num_classes: int, batch: int) -> jax.Array:
    """Labels of consecutive global examples: example g is position g mod L of epoch g // L's permutation."""
    first_epoch = indices[0] // num_classes
    spanned = math.ceil(batch / num_classes) + 1  # a batch touches at most this many epochs
    epochs = first_epoch + jnp.arange(spanned)
    perms = jax.vmap(lambda e: jax.random.permutation(jax.random.fold_in(order_key, e), num_classes))(epochs)
    return perms[indices // num_classes - first_epoch, indices % num_classes]


def validate(config: ml_collections.ConfigDict) -> BankSpec:
    """Every check that needs no devices' work: the bank, the model, the augmentation; returns the bank's spec."""
    spec = BankSpec.from_config(config, _RENAMED)
    spec.validate()
    classify.validate_model_fields(config)
    require_choice("data_mode", config.data_mode, DATA_MODES)
    require(config.image_size >= 16, f"image_size={config.image_size} must be ≥ 16")
    require(augment_config(config.augment).size == config.image_size,
            f"augment.size={config.augment.size} must equal image_size={config.image_size}")
    return spec


def make_task(config: ml_collections.ConfigDict, spec: BankSpec, model: ViT, augment: AugmentConfig, mesh: Mesh,
              images: jax.Array, class_params: jax.Array, probs: jax.Array) -> loop.Task:
    """The pre-train Task over a bank's arrays: `images` (≥ L, S, S) uint8 and `class_params` (L, N, 6) placed on
    the mesh (or jax.ShapeDtypeStructs with shardings, to lower the step without a bank); `probs` (N,) is small.

    The bank travels as the step's `resident` argument: closed over, jit would embed it in the program.
    """
    batch = config.batch_size
    # fresh mode: a new chain (map choices) and new patch masks for every sample, from its own key
    render_one = functools.partial(render.render, **render_options(spec))
    order_key = loop.stream_key(config.seed, _ORDER_STREAM)  # epoch permutations: a stream of their own

    def make_batch(key, inputs, step, bank):
        render_key, augment_key = jax.random.split(key)
        indices = step * batch + jnp.arange(batch, dtype=jnp.int32)
        indices = jax.lax.with_sharding_constraint(indices, data_sharding(mesh))
        labels = epoch_labels(order_key, indices, spec.num_classes, batch)
        if config.data_mode == "bank":
            gray = bank["images"][labels]
        else:  # fresh chaos-game points for every sample, keyed by its global index
            keys = jax.vmap(lambda i: jax.random.fold_in(render_key, i))(indices)
            gray = jax.vmap(lambda p, k: render_one(p[None], probs, k)[0][0])(bank["class_params"][labels], keys)
        rgb = jnp.repeat(gray[..., None], 3, axis=-1)
        x, targets = augment_batch(augment, augment_key, rgb, labels, indices, spec.num_classes, model.dtype)
        return {"image": x, "target": targets}

    # Each mode gets only the array it reads.
    resident = {"images": images} if config.data_mode == "bank" else {"class_params": class_params}
    return loop.Task(
        init_variables=lambda key: model.init(key, jnp.zeros((1, config.image_size, config.image_size, 3))),
        make_batch=make_batch,
        loss_fn=classify.soft_target_loss(model),
        inputs=lambda start: itertools.repeat(None),
        evaluate=None,
        export=classify.make_export(model, augment),
        steps_per_epoch=spec.num_classes / batch,  # the seeds' epoch is one pass over the L images
        resident=resident,
    )


def run(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh | None = None) -> loop.Result:
    spec = validate(config)
    augment = augment_config(config.augment)
    model = classify.build_vit(config, spec.num_classes)
    with loop.prepare(config, workdir, mesh) as run:
        mesh = run.mesh
        # ---- the bank, rendered once on the devices, then replicated so every device gathers locally ---------
        bank = build_bank(spec, mesh, progress=lambda line: logging.info("bank: %s", line))
        images = jax.device_put(bank.images, replicated(mesh))
        class_params = jax.device_put(jnp.asarray(bank.class_params), replicated(mesh))
        return run.train(make_task(config, spec, model, augment, mesh, images, class_params,
                                   jnp.asarray(bank.probs)))
