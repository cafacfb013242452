"""The bootstrap stage (SPEC §B): a ViT trained beside a CNN agent whose inductive bias it learns, as two models
teaching each other (`mode='joint'`) or as an agent built from the ViT's own weights (`'shared'`). The pair, its
losses and its Task: train/pair.py."""

from __future__ import annotations

import ml_collections
from absl import logging

from onepfrac_jax.config import require, require_choice
from onepfrac_jax.data import pipeline, sources
from onepfrac_jax.parallel.mesh import Mesh, data_sharding
from onepfrac_jax.train import classify, loop, pair


def validate(config: ml_collections.ConfigDict) -> None:
    """Every check that needs no data or devices' work (the models' pairing needs the class count: pair.build_task)."""
    require_choice("mode", config.mode, pair.MODES)
    classify.validate_model_fields(config)
    for name in pair.AGENT_DIMS:
        value = config.agent[name]
        require(value == -1 or value > 0, f"agent.{name}={value} must be > 0 (or -1: the preset's)")
    require(config.agent.patch_size == -1 or config.agent.patch_size > 0,
            f"agent.patch_size={config.agent.patch_size} must be > 0 (or -1: the ViT's)")
    pair.loss_weights(config)
    pair.hint_layers(config)
    require(config.ema_decay == 0, f"ema_decay={config.ema_decay}: bootstrap runs keep no EMA (the agent's "
                                   f"BatchNorm statistics would not match averaged weights); leave it 0")
    sources.validate_section(config.data)
    loop.validate_train_fields(config)


def run(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh | None = None) -> loop.Result:
    validate(config)
    with loop.prepare(config, workdir, mesh) as run:
        data = pipeline.open_host_data(config.data, seed=config.seed, global_batch=config.batch_size,
                                       sharding=data_sharding(run.mesh))
        task, _, _ = pair.build_task(config, data)
        logging.info("%s; mode %s, ViT %s + %s", data.describe(), config.mode, config.model, config.agent.preset)
        return run.train(task)
