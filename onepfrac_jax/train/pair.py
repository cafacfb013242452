"""The ViT + CNN agent pair of Bootstrapping ViTs (SPEC §B): built from a config, its loss, evaluation, export and
Task (stages/bootstrap.py runs it).

mode `joint`: two models, each with its own optimizer state (optax.multi_transform over the labels 'vit' and
'agent'), updated in one jitted step. The step differentiates loss_vit + loss_cnn; every teacher side is
stop-gradient inside the losses, so each model receives exactly the gradient of its own loss.
mode `shared`: one parameter tree and one optimizer; the agent's convs and MLPs are computed from the ViT's
weights (models.agent.SharedAgent), so the agent's losses also train the ViT.

Params are {'vit': ..., 'agent': ...} in both modes; the agent's BatchNorm statistics travel as `batch_stats`.
The hint weight's decay factor max(0, 1 − epoch / epochs) is computed from the step inside the jitted step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections

from onepfrac_jax.config import ConfigError, require, require_choice
from onepfrac_jax.data import pipeline
from onepfrac_jax.data.augment import AugmentConfig, augment_batch, augment_config, eval_transform
from onepfrac_jax.export.agent import export_agent
from onepfrac_jax.models.agent import AGENT_PRESETS, Agent, SharedAgent, create_agent
from onepfrac_jax.models.vit import VIT_INITS, ViT
from onepfrac_jax.train import classify, loop
from onepfrac_jax.train.losses import (
    BootstrapLossWeights,
    hint_decay,
    hint_losses,
    joint_losses,
    shared_loss,
    top1_correct,
)

MODES = ("joint", "shared")
PAPER_WEIGHTS = {"joint": BootstrapLossWeights.JOINT, "shared": BootstrapLossWeights.SHARED}
TERMS = ("ce_vit", "ce_cnn", "kd_vit", "kd_cnn", "hint")  # the unweighted loss terms, also the weights' names
# Agent dimensions the config may override; -1 keeps the preset's value.
AGENT_DIMS = ("embed_dim", "depth", "num_heads")
AGENT_DROPOUT = 0.1  # the MLP dropout of every agent in the authors' configs
METRICS = {"joint": ("loss", "loss_vit", "loss_cnn", *TERMS, "hint_decay"), "shared": ("loss", *TERMS, "hint_decay")}
EVAL_NAMES = ("val_top1_vit", "val_top1_agent")


def loss_weights(config: ml_collections.ConfigDict) -> BootstrapLossWeights:
    """The configured weights; a weight of -1 takes the mode's paper value."""
    paper = PAPER_WEIGHTS[config.mode]
    weights = {f: getattr(paper, f) if config.loss[f] == -1 else float(config.loss[f]) for f in TERMS}
    try:
        return BootstrapLossWeights(**weights, temperature=float(config.loss.temperature))
    except ValueError as e:
        raise ConfigError(f"loss: {e}") from e


def hint_layers(config: ml_collections.ConfigDict) -> tuple[int, ...] | None:
    """The hinted block indices; None (every block) when the config lists none."""
    layers = tuple(config.loss.hint_layers)
    require(all(isinstance(i, int) for i in layers), f"loss.hint_layers={layers} must be block indices (ints)")
    return layers or None


def build_models(config: ml_collections.ConfigDict, num_classes: int) -> tuple[ViT, Agent | SharedAgent]:
    """The ViT and the agent (a SharedAgent in shared mode); ConfigError unless they pair for the mode's losses."""
    # Runs saved before `vit_init` existed were initialised as timm's ViT (the init matters only at the start).
    init = config.get("vit_init", "timm")
    require_choice("vit_init", init, VIT_INITS)
    vit = classify.build_vit(config, num_classes).clone(init_scheme=init)
    a = config.agent
    require(a.preset in AGENT_PRESETS, f"agent.preset={a.preset!r} is not one of {', '.join(sorted(AGENT_PRESETS))}")
    shared = config.mode == "shared"
    # The shared agent's MLP is the ViT's, so it takes the ViT's dropout.
    default_dropout = vit.drop_rate if shared else AGENT_DROPOUT
    overrides = {name: a[name] for name in AGENT_DIMS if a[name] > 0}
    residual = a.get("residual_dropout", 0.0)
    try:
        agent = create_agent(
            a.preset, shared=shared, num_classes=num_classes, dtype=vit.dtype,
            patch_size=a.patch_size if a.patch_size > 0 else vit.patch_size,
            dropout=a.dropout if a.dropout >= 0 else default_dropout,
            residual_dropout=residual if residual >= 0 else (vit.drop_rate if shared else 0.0),
            stem_init=a.get("stem_init", "normal"), down_sample_layers=tuple(a.down_sample_layers), **overrides,
        )
    except ValueError as e:
        raise ConfigError(f"agent: {e}") from e
    check_pair(config, vit, agent)
    return vit, agent


def _describe(name: str, width: int, depth: int, heads: int) -> str:
    return f"{name} (width {width}, {depth} blocks, {heads} heads)"


def check_pair(config: ml_collections.ConfigDict, vit: ViT, agent: Agent | SharedAgent) -> None:
    """ConfigError, naming both models, unless the agent can share the ViT's weights and be its hint teacher."""
    names = (f"agent {_describe(config.agent.preset, agent.embed_dim, agent.depth, agent.num_heads)} and ViT "
             f"{_describe(config.model, vit.embed_dim, vit.depth, vit.num_heads)}")
    if isinstance(agent, SharedAgent):
        ours, theirs = (agent.embed_dim, agent.depth, agent.num_heads), (vit.embed_dim, vit.depth, vit.num_heads)
        require(ours == theirs, f"mode=shared computes agent block i from ViT layer i, so width, block count and "
                                f"heads must be equal: {names} differ")
    layers = hint_layers(config)
    valid = min(agent.depth, vit.depth)
    bad = [i for i in layers or () if not 0 <= i < valid]
    require(not bad, f"loss.hint_layers={layers}: {bad} out of range for {names}; valid block indices are "
                     f"0..{valid - 1}")
    images = jnp.zeros((1, config.image_size, config.image_size, 3))

    def hint_shapes(key: jax.Array) -> jax.Array:
        variables = init_variables(vit, agent, config.image_size)(key)
        params = variables["params"]
        _, vit_blocks = vit.apply({"params": params["vit"]}, images, return_blocks=True)
        _, cnn_blocks = agent.apply({"params": params["agent"], "batch_stats": variables["batch_stats"]},
                                    *_agent_args(agent, images, params), train=False, return_blocks=True)
        return hint_losses(vit_blocks, cnn_blocks, layers)

    try:
        jax.eval_shape(hint_shapes, jax.random.key(0))
    except ValueError as e:
        raise ConfigError(f"{names} cannot be paired for the hint loss: {e}") from e


def init_variables(vit: ViT, agent: Agent | SharedAgent, image_size: int) -> Callable[[jax.Array], dict]:
    """key -> {'params': {'vit', 'agent'}, 'batch_stats': the agent's BatchNorm statistics}."""

    def init(key: jax.Array) -> dict:
        vit_key, agent_key = jax.random.split(key)
        images = jnp.zeros((1, image_size, image_size, 3))
        vit_params = vit.init(vit_key, images)["params"]
        variables = agent.init(agent_key, *_agent_args(agent, images, {"vit": vit_params}), train=False)
        return {"params": {"vit": vit_params, "agent": variables["params"]}, "batch_stats": variables["batch_stats"]}

    return init


def _agent_args(agent: Agent | SharedAgent, images: jax.Array, params: dict) -> tuple:
    """The agent's call arguments: a shared agent also takes the ViT's params."""
    return (images, params["vit"]) if isinstance(agent, SharedAgent) else (images,)


def make_loss_fn(vit: ViT, agent: Agent | SharedAgent, weights: BootstrapLossWeights,
                 layers: tuple[int, ...] | None) -> Callable:
    """The Task loss: both models forward in training mode, then the mode's losses (the terms are metrics)."""
    shared = isinstance(agent, SharedAgent)

    def loss_fn(params, extra, batch, key):
        dropout_key, path_key, agent_key = jax.random.split(key, 3)
        vit_logits, vit_blocks = vit.apply({"params": params["vit"]}, batch["image"], train=True, return_blocks=True,
                                           rngs={"dropout": dropout_key, "drop_path": path_key})
        (cnn_logits, cnn_blocks), updated = agent.apply(
            {"params": params["agent"], "batch_stats": extra["batch_stats"]},
            *_agent_args(agent, batch["image"], params), train=True, return_blocks=True,
            rngs={"dropout": agent_key}, mutable=["batch_stats"],
        )
        losses = shared_loss if shared else joint_losses
        terms = losses(vit_logits, cnn_logits, batch["target"], vit_blocks, cnn_blocks, batch["decay"], weights, layers)
        loss = terms.pop("loss") if shared else terms["loss_vit"] + terms["loss_cnn"]
        return loss, ({**terms, "hint_decay": batch["decay"]}, {"batch_stats": updated["batch_stats"]})

    return loss_fn


def joint_labels(params: dict) -> dict:
    """Optimizer labels: every ViT leaf 'vit', every agent leaf 'agent' (one optimizer state per model)."""
    return {name: jax.tree.map(lambda _, n=name: n, tree) for name, tree in params.items()}


def make_evaluate(vit: ViT, agent: Agent | SharedAgent, augment: AugmentConfig,
                  batches: Callable[[], Iterable[dict]]) -> Callable[[loop.TrainState], dict[str, float]]:
    """Both models' top-1 over one pass of `batches` (image, label, mask), with the deterministic eval transform."""

    @jax.jit
    def counts(params, extra, batch):
        images = eval_transform(augment, batch["image"], vit.dtype)
        vit_logits = vit.apply({"params": params["vit"]}, images)
        agent_logits = agent.apply({"params": params["agent"], **extra}, *_agent_args(agent, images, params),
                                   train=False)
        vit_hits, total = top1_correct(vit_logits, batch["label"], batch["mask"])
        agent_hits, _ = top1_correct(agent_logits, batch["label"], batch["mask"])
        return vit_hits, agent_hits, total

    def evaluate(state: loop.TrainState) -> dict[str, float]:
        vit_correct = agent_correct = total = 0  # summed on the device: one fetch per evaluation
        for batch in batches():
            v, a, n = counts(state.params, state.extra, batch)
            vit_correct, agent_correct, total = vit_correct + v, agent_correct + a, total + n
        total = max(int(total), 1)
        return {"val_top1_vit": 100.0 * int(vit_correct) / total, "val_top1_agent": 100.0 * int(agent_correct) / total}

    return evaluate


def export_variables(vit: ViT, agent: Agent | SharedAgent, augment: AugmentConfig, variables: dict,
                     out_dir: Path) -> dict:
    """What a bootstrap run's export/ holds, from its `variables`: the ViT as timm weights (model.safetensors,
    config.json, model.pth, timm.json) and the agent's state dict (a shared agent as the plain CNN its ViT weights
    define)."""
    params = variables["params"]
    files = classify.export_variables(vit, augment, {"params": params["vit"]}, out_dir)
    extra = {name: value for name, value in variables.items() if name != "params"}
    shared_from = params["vit"] if isinstance(agent, SharedAgent) else None
    files["agent"] = export_agent({"params": params["agent"], **extra}, agent.clone(dtype=jnp.float32), out_dir,
                                  vit_params=shared_from, overwrite=True)
    return files


def make_export(vit: ViT, agent: Agent | SharedAgent, augment: AugmentConfig) -> Callable:
    """The end-of-run export (Task.export)."""
    return lambda state, out_dir: export_variables(vit, agent, augment, classify.final_variables(state), out_dir)


def export_checkpoint(config: ml_collections.ConfigDict, variables: dict, out_dir: Path) -> dict:
    """The export stage's: what a bootstrap run with `config` exports from these checkpoint variables."""
    vit, agent = build_models(config, classify.head_classes(variables["params"]["vit"]))
    return export_variables(vit, agent, augment_config(config.augment), variables, out_dir)


def build_task(config: ml_collections.ConfigDict,
               data: pipeline.HostData) -> tuple[loop.Task, ViT, Agent | SharedAgent]:
    """The loop.Task of a validated config (stages/bootstrap.validate) over this host data, and its two models."""
    augment = augment_config(config.augment)
    weights = loss_weights(config)
    num_classes = data.train.num_classes
    vit, agent = build_models(config, num_classes)
    steps_per_epoch = data.steps_per_epoch
    total_epochs = loop.total_steps(config, steps_per_epoch) / steps_per_epoch  # the hint reaches 0 at the end

    def make_batch(key, item, step):
        images, targets = augment_batch(augment, key, item["image"], item["label"], item["index"], num_classes,
                                        vit.dtype)
        return {"image": images, "target": targets, "decay": hint_decay(step // steps_per_epoch, total_epochs)}

    task = loop.Task(
        init_variables=init_variables(vit, agent, config.image_size),
        make_batch=make_batch,
        loss_fn=make_loss_fn(vit, agent, weights, hint_layers(config)),
        inputs=data.inputs,
        evaluate=make_evaluate(vit, agent, augment, data.val_batches),
        export=make_export(vit, agent, augment),
        steps_per_epoch=steps_per_epoch,
        metric_names=METRICS[config.mode],
        eval_names=EVAL_NAMES,
        optimizer_labels=joint_labels if config.mode == "joint" else None,
    )
    return task, vit, agent
