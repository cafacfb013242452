"""The pre-train stage: a ViT classifies the L classes of a fractal bank rendered on the device (1p-frac by
default; OFDB or FractalDB with `dataset`). The Task, its batches and its bank evaluation: train/bank_task.py."""

from __future__ import annotations

import functools

import ml_collections
from absl import logging

from onepfrac_jax.config import require, require_choice
from onepfrac_jax.fractals import fdsl
from onepfrac_jax.fractals.bank import BankSpec
from onepfrac_jax.parallel.mesh import Mesh
from onepfrac_jax.train import bank_task, classify, loop


def validate(config: ml_collections.ConfigDict) -> BankSpec | fdsl.FdslSpec:
    """Every check that needs no devices' work: the bank, the model, the augmentation; returns the bank's spec."""
    spec = bank_task.bank_spec(config)
    bank_task.validate_bank(spec)
    classify.validate_model_fields(config)
    require_choice("data_mode", config.data_mode, bank_task.DATA_MODES)
    require(config.data_mode == "bank" or config.dataset == "1p-frac",
            f"data_mode={config.data_mode!r} renders 1p-frac classes only; dataset={config.dataset!r} needs 'bank'")
    require(config.image_size >= 16, f"image_size={config.image_size} must be ≥ 16")
    require(isinstance(config.batch_picture, bool), f"batch_picture={config.batch_picture!r} must be True or False")
    loop.validate_train_fields(config)
    return spec


def run(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh | None = None) -> loop.Result:
    spec = validate(config)
    model = classify.build_vit(config, spec.num_classes)
    with loop.prepare(config, workdir, mesh) as run:
        # the bank, rendered once on the devices, then replicated so every device gathers its batch locally
        task = bank_task.render_task(config, spec, model, run.mesh, run.path if config.batch_picture else None,
                                     progress=functools.partial(logging.info, "bank: %s"))
        return run.train(task)
