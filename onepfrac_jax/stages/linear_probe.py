"""The linear_probe stage: a frozen ViT's features, a linear head trained on them (the standard FDSL read-out).

Features are the ViT's pre-logits cls feature (the cls token after the final LayerNorm), computed once per image
of the train and val splits through the eval transform (no augmentation), on the devices in global batches. They
are standardised with the train split's per-dimension mean and std (as MAE's probe does with a BatchNorm without
affine). The head, W (D, C) ~ N(0, 0.01²) and b = 0, is trained by `config.optim` (the training stages' optimizer
and schedule) on cross-entropy in minibatches of `probe.batch_size`; epoch e is the permutation keyed by
fold_in(stream 1 of `seed`, e), its remainder dropped; the head's init is keyed by stream 0. Val top-1 after every
epoch goes to metrics.csv and result.json.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from onepfrac_jax.config import require, require_int, require_representable, require_seed
from onepfrac_jax.data import pipeline
from onepfrac_jax.data.sources import Source
from onepfrac_jax.inference import Classifier
from onepfrac_jax.parallel.mesh import Mesh, data_sharding, make_data_mesh, to_host
from onepfrac_jax.rundir import Result, RunDir
from onepfrac_jax.stages import evaluate
from onepfrac_jax.train import optim
from onepfrac_jax.train.loop import stream_key
from onepfrac_jax.train.losses import cross_entropy, top1_correct
from onepfrac_jax.train.metrics import MetricWriter

_HEAD_STREAM, _ORDER_STREAM = 0, 1
HEAD_INIT_STD = 0.01  # MAE's linear-probe head init


def features(classifier: Classifier, source: Source, global_batch: int, mesh: Mesh,
             num_threads: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, D) float32, labels (N,)) of every example of `source`, in source order."""
    vit = classifier.module.clone(num_classes=0)  # returns the final-normed cls token
    body = {k: v for k, v in classifier.variables["params"].items() if k != "head"}
    headless = Classifier(vit, {"params": body}, classifier.augment, classifier.step)
    forward = headless.logits_fn()
    parts, labels = [], []
    for batch in pipeline.eval_batches(source, global_batch=global_batch, sharding=data_sharding(mesh),
                                       num_threads=num_threads):
        mask = to_host(batch["mask"])
        parts.append(to_host(forward(headless.variables, batch["image"]))[mask])
        labels.append(to_host(batch["label"])[mask])
    return np.concatenate(parts).astype(np.float32), np.concatenate(labels)


def standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Every array minus the train features' mean, divided by their std (per dimension)."""
    mean, std = train.mean(axis=0), train.std(axis=0) + 1e-6
    return [(x - mean) / std for x in (train, *others)]


def init_head(key: jax.Array, dim: int, classes: int) -> dict:
    return {"kernel": HEAD_INIT_STD * jax.random.normal(key, (dim, classes), jnp.float32),
            "bias": jnp.zeros((classes,), jnp.float32)}


def _logits(head: dict, x: jax.Array) -> jax.Array:
    return x @ head["kernel"] + head["bias"]


def make_epoch(tx: optax.GradientTransformation, steps: int, batch: int) -> Callable:
    """jit((head, opt_state, features, labels, key) -> (head, opt_state, mean loss)): one epoch of `steps` updates."""

    def loss_fn(head, x, y):
        return cross_entropy(_logits(head, x), y)

    @jax.jit
    def epoch(head, opt_state, x, y, key):
        order = jax.random.permutation(key, len(x))[: steps * batch].reshape(steps, batch)

        def step(carry, rows):
            head, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(head, x[rows], y[rows])
            updates, opt_state = tx.update(grads, opt_state, head)
            return (optax.apply_updates(head, updates), opt_state), loss

        (head, opt_state), losses = jax.lax.scan(step, (head, opt_state), order)
        return head, opt_state, jnp.mean(losses)

    return epoch


@jax.jit
def _correct(head: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    return top1_correct(_logits(head, x), y)[0]


def _top1(head: dict, x: jax.Array, y: jax.Array) -> float:
    return 100.0 * int(_correct(head, x, y)) / len(y)


def validate(config: ml_collections.ConfigDict, devices: int | None = None) -> None:
    """Every check that reads no model and no data; `devices`: those of the mesh (default: all of all processes)."""
    evaluate.validate_source_fields(config, jax.device_count() if devices is None else devices)
    p = config.probe
    require(p.epochs > 0, f"probe.epochs={p.epochs} must be > 0")
    require(p.batch_size > 0, f"probe.batch_size={p.batch_size} must be > 0")
    require(p.log_every_epochs > 0, f"probe.log_every_epochs={p.log_every_epochs} must be > 0")
    require_seed("seed", config.seed)
    for name in ("epochs", "batch_size", "log_every_epochs"):
        require_int(f"probe.{name}", p[name], 1)
    optim.validate(config.optim)
    require_representable(config)


def run(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh | None = None) -> Result:
    mesh = make_data_mesh() if mesh is None else mesh
    validate(config, mesh.devices.size)
    with RunDir.open(config, workdir, resumable=False) as out:
        t0 = time.perf_counter()
        classifier, _ = evaluate.open_classifier(config)
        data = pipeline.open_host_data(config.data, seed=config.seed, global_batch=config.batch_size,
                                       sharding=data_sharding(mesh))
        require(len(data.train) >= config.probe.batch_size,
                f"the train split has {len(data.train)} examples, fewer than probe.batch_size="
                f"{config.probe.batch_size}")
        out.begin()
        logging.info("linear probe of %s (step %d) on %s", config.init_from, classifier.step, data.describe())
        (train_x, train_y), (val_x, val_y) = (
            features(classifier, source, config.batch_size, mesh, config.data.num_threads)
            for source in (data.train, data.val))
        feature_seconds = time.perf_counter() - t0
        logging.info("features: %d train + %d val images → %d dimensions in %.1f s", len(train_x), len(val_x),
                     train_x.shape[1], feature_seconds)
        train_x, val_x = (jnp.asarray(x) for x in standardise(train_x, val_x))
        train_y, val_y = jnp.asarray(train_y), jnp.asarray(val_y)

        # ---- the head: the stages' optimizer and schedule over epochs of keyed minibatches ----------------------
        p = config.probe
        steps = len(train_x) // p.batch_size
        total = steps * p.epochs
        lr = optim.schedule(config.optim, total, steps, p.batch_size)
        tx = optim.make_optimizer(config.optim, lr)
        head = init_head(stream_key(config.seed, _HEAD_STREAM), train_x.shape[1], data.train.num_classes)
        opt_state = tx.init(head)
        epoch = make_epoch(tx, steps, p.batch_size)
        order_key = stream_key(config.seed, _ORDER_STREAM)
        main_process = jax.process_index() == 0
        writer = MetricWriter(out.path, ["loss", "lr", "val_top1"], total, enabled=main_process, resume=False)
        history = []
        try:
            for e in range(p.epochs):
                head, opt_state, loss = epoch(head, opt_state, train_x, train_y, jax.random.fold_in(order_key, e))
                done = (e + 1) * steps
                row = {"loss": float(loss), "lr": float(lr(done - 1)), "val_top1": _top1(head, val_x, val_y)}
                history.append({"step": done, "val_top1": row["val_top1"]})
                writer.write(done, row)
                if (e + 1) % p.log_every_epochs == 0 or e + 1 == p.epochs:
                    writer.progress(done, {"epoch": e + 1, **row})
        finally:
            writer.close()
        scores = {"train_top1": _top1(head, train_x, train_y), "feature_dim": int(train_x.shape[1]),
                  "train_examples": len(train_x), "val_examples": len(val_x), "init_from": str(config.init_from),
                  "feature_seconds": feature_seconds, "seconds": time.perf_counter() - t0}
        result = evaluate.Scored(stage="linear_probe", step=total, total_steps=total, stopped=False, history=history,
                                 files={}, state=head, scores=scores)
        result.write(out.path)
        return result

