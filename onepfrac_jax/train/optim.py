"""Optimizers and learning-rate schedules, as the seeds' timm scripts set them up."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from onepfrac_jax.config import INT32_MAX, require, require_choice, require_int

OPTIMIZERS = ("adamw", "sgd")
# Never decayed, as timm's `no_weight_decay()`: besides every bias and norm parameter (ndim ≤ 1).
NO_DECAY_NAMES = ("pos_embed", "cls_token")


def default_optim_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "adamw"  # 'adamw' | 'sgd'
    c.lr = 1e-3  # base learning rate, multiplied by global_batch / 512 when scale_lr
    c.warmup_lr = 1e-6  # learning rate at step 0 (also scaled)
    c.min_lr = 1e-5  # the cosine ends here (also scaled)
    c.scale_lr = True  # the seeds' rule: lr × global_batch / 512
    c.warmup_epochs = 5.0  # linear warm-up length in epochs (used when warmup_steps < 0)
    c.warmup_steps = -1  # warm-up length in steps; ≥ 0 overrides warmup_epochs
    c.weight_decay = 0.05
    c.b1 = 0.9  # adamw
    c.b2 = 0.999  # adamw
    c.eps = 1e-8  # adamw
    c.momentum = 0.9  # sgd
    c.nesterov = False  # sgd
    c.clip_grad_norm = 0.0  # global-norm clipping; 0 is off
    # PyTorch recipes that differ from timm's (the Bootstrapping-ViTs code: torch AdamW over model.parameters(),
    # CosineAnnealingLR stepped once per epoch):
    c.decay_all = False  # decay every parameter, biases, norms, positions and the cls token included
    c.per_epoch = False  # the learning rate changes once per epoch (held within it), not every step
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    require_choice("optim.name", c.name, OPTIMIZERS)
    require(c.lr > 0, f"optim.lr={c.lr} must be > 0")
    require(c.warmup_lr >= 0 and c.min_lr >= 0, "optim.warmup_lr and optim.min_lr must be ≥ 0")
    require(c.weight_decay >= 0, f"optim.weight_decay={c.weight_decay} must be ≥ 0")
    require(c.clip_grad_norm >= 0, f"optim.clip_grad_norm={c.clip_grad_norm} must be ≥ 0")
    require(c.warmup_epochs >= 0, f"optim.warmup_epochs={c.warmup_epochs} must be ≥ 0")
    require_int("optim.warmup_steps", c.warmup_steps, -1, INT32_MAX, " (-1: warmup_epochs decides)")
    require(0 <= c.b1 < 1 and 0 <= c.b2 < 1, f"optim.b1={c.b1} and optim.b2={c.b2} must lie in [0, 1)")
    require(c.eps > 0, f"optim.eps={c.eps} must be > 0")
    require(c.momentum >= 0, f"optim.momentum={c.momentum} must be ≥ 0")


def schedule(c: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int, global_batch: int) -> optax.Schedule:
    """Linear warm-up from warmup_lr to lr, then cosine to min_lr at total_steps; lrs scaled by batch/512.

    With `per_epoch` the schedule is read at the first step of the current epoch, as a PyTorch scheduler stepped
    after every epoch: the cosine over E epochs is then lr_min + (lr − lr_min)(1 + cos(π e / E)) / 2 in epoch e.
    """
    scale = global_batch / 512 if c.scale_lr else 1.0
    warmup = c.warmup_steps if c.warmup_steps >= 0 else round(c.warmup_epochs * steps_per_epoch)
    warmup = min(warmup, total_steps)
    peak = c.lr * scale
    cosine = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1), alpha=c.min_lr * scale / peak)
    ramp = optax.linear_schedule(c.warmup_lr * scale, peak, warmup)
    stepwise = cosine if warmup == 0 else optax.join_schedules([ramp, cosine], [warmup])
    if not c.per_epoch:
        return stepwise
    return lambda step: stepwise(jnp.floor(step / steps_per_epoch) * steps_per_epoch)


def decay_mask(params) -> object:
    """True where weight decay applies: matrices and kernels, not biases, norms, positions or the cls token."""

    def decays(path, leaf) -> bool:
        names = [getattr(p, "key", str(p)) for p in path]
        return leaf.ndim > 1 and not any(n in NO_DECAY_NAMES for n in names)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(c: ml_collections.ConfigDict, lr: optax.Schedule) -> optax.GradientTransformation:
    """The configured optimizer, with timm's weight-decay exclusions (none with decay_all) and optional clipping."""
    mask = None if c.decay_all else decay_mask
    if c.name == "adamw":
        tx = optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, mask=mask)
    else:
        # PyTorch SGD adds the decay to the gradient before momentum, so decay comes first in the chain.
        tx = optax.chain(optax.add_decayed_weights(c.weight_decay, mask=mask),
                         optax.sgd(lr, momentum=c.momentum, nesterov=c.nesterov))
    if c.clip_grad_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(c.clip_grad_norm), tx)
    return tx
