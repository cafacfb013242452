"""Losses of every stage: (soft-target) cross-entropy for 1p-frac, and the Bootstrapping-ViTs KD/hint losses.

All math runs in float32 whatever the input dtype (bf16/fp16 logits are upcast first), and every loss is a
mean over the batch. In the bootstrapping losses the teacher side is wrapped in `jax.lax.stop_gradient`
inside the loss, so the gradient of `loss_vit + loss_cnn` w.r.t. both models' params gives each model
exactly the gradient of its own loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp

Array = jax.Array

# PyTorch's nn.LayerNorm default; the original hint LayerNorms keep their affine params at 1/0 (they live in
# the loss module, which no optimizer is given), so a plain normalisation with eps 1e-5 reproduces them.
HINT_LN_EPS = 1e-5


def soft_cross_entropy(logits: Array, targets: Array) -> Array:
    """Batch mean of −Σ_c targets_c · log_softmax(logits)_c (mixup/cutmix or smoothed targets)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.mean(-jnp.sum(targets.astype(jnp.float32) * logp, axis=-1))


def cross_entropy(logits: Array, labels: Array, label_smoothing: float = 0.0) -> Array:
    """Batch mean of (1−ε)·(−log p_label) + ε·mean_c(−log p_c): CE against (1−ε)·onehot + ε/C, as in PyTorch."""
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    _check_integer_labels(logits, labels)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    loss = nll if label_smoothing == 0.0 else (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
    return jnp.mean(loss)


def top1_correct(logits: Array, labels: Array, mask: Array | None = None) -> tuple[Array, Array]:
    """(number of examples whose argmax is the label, number of examples), counting only where `mask` is true."""
    _check_integer_labels(logits, labels)
    hit = jnp.argmax(logits, axis=-1) == labels
    valid = jnp.ones_like(hit) if mask is None else mask.astype(bool)
    return jnp.sum(hit & valid, dtype=jnp.int32), jnp.sum(valid, dtype=jnp.int32)


def kd_loss(student_logits: Array, teacher_logits: Array, temperature: float = 4.0) -> Array:
    """T² · batch mean of KL(p_t ‖ p_s) = Σ_c p_t,c (log p_t,c − log p_s,c), with p = softmax(logits / T)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    teacher = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
    log_pt = jax.nn.log_softmax(teacher / temperature, axis=-1)
    log_ps = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)
    return jnp.mean(kl) * temperature**2


def hint_loss(vit_tokens: Array, cnn_map: Array) -> Array:
    """MSE between LayerNorm'd ViT tokens (student) and CNN map tokens (teacher, stop-gradient).

    vit_tokens (B, 1+N, D): the cls token is dropped. cnn_map (B, h, w, D): flattened row-major to (B, h·w, D).
    If N ≠ h·w, the longer sequence is averaged over consecutive groups of r = max/min tokens — a 1-D average
    pool (kernel = stride = r) over the flattened sequence, as the original code does (so a 28×28 map against
    14×14 patches averages runs of 4 tokens along a row, not 2×2 squares). Both sides are then normalised
    over D without affine params, LN(x) = (x − mean) / sqrt(var + 1e-5), and the loss is the mean over all
    B·n·D squared differences.
    """
    _check_hint_shapes(vit_tokens, cnn_map)
    student = vit_tokens[:, 1:].astype(jnp.float32)
    batch, height, width, dim = cnn_map.shape
    teacher = jax.lax.stop_gradient(cnn_map).astype(jnp.float32).reshape(batch, height * width, dim)
    n_student, n_teacher = student.shape[1], teacher.shape[1]
    if n_student > n_teacher:
        student = _pool_tokens(student, n_teacher)
    elif n_teacher > n_student:
        teacher = _pool_tokens(teacher, n_student)
    return jnp.mean((_layer_norm(student) - _layer_norm(teacher)) ** 2)


def hint_losses(vit_blocks: Sequence[Array], cnn_blocks: Sequence[Array], layers: Sequence[int] | None = None) -> Array:
    """Σ_{i ∈ layers} hint_loss(vit_blocks[i], cnn_blocks[i]); `layers=None` means every block (equal counts)."""
    n_vit, n_cnn = len(vit_blocks), len(cnn_blocks)
    if layers is None:
        if n_vit != n_cnn:
            raise ValueError(f"hint over every block needs equal block counts, got {n_vit} ViT and {n_cnn} CNN blocks")
        layers = range(n_vit)
    n_valid = min(n_vit, n_cnn)
    bad = [i for i in layers if not 0 <= i < n_valid]
    if bad:
        raise ValueError(
            f"hint layers {bad} out of range: valid block indices are 0..{n_valid - 1} "
            f"({n_vit} ViT blocks, {n_cnn} CNN blocks)"
        )
    if not layers:
        raise ValueError("hint layers must name at least one block")
    total = jnp.zeros((), jnp.float32)
    for i in layers:
        try:
            total = total + hint_loss(vit_blocks[i], cnn_blocks[i])
        except ValueError as err:
            raise ValueError(f"hint layer {i}: {err}") from err
    return total


def hint_decay(epoch: int | Array, total_epochs: int) -> Array:
    """Hint weight factor max(0, 1 − epoch / total_epochs); `epoch` is the integer epoch (constant within it)."""
    if total_epochs <= 0:
        raise ValueError(f"total_epochs must be positive, got {total_epochs}")
    return jnp.maximum(0.0, 1.0 - jnp.asarray(epoch, jnp.float32) / total_epochs)


@dataclasses.dataclass(frozen=True)
class BootstrapLossWeights:
    """Loss weights of a bootstrapping run; `JOINT` and `SHARED` hold the paper's settings."""

    ce_vit: float = 1.0  # ViT cross-entropy
    ce_cnn: float = 1.0  # agent CNN cross-entropy
    kd_vit: float = 1.0  # KD with the ViT as student, KD(vit ← cnn)
    kd_cnn: float = 1.0  # KD with the CNN as student, KD(cnn ← vit)
    hint: float = 10.0  # Σ hint (ViT as student), further scaled by hint_decay
    temperature: float = 4.0  # KD temperature T

    JOINT: ClassVar[BootstrapLossWeights]
    SHARED: ClassVar[BootstrapLossWeights]

    def __post_init__(self) -> None:
        """Reject negative weights and a non-positive temperature, naming the field."""
        for field in ("ce_vit", "ce_cnn", "kd_vit", "kd_cnn", "hint"):
            if getattr(self, field) < 0:
                raise ValueError(f"loss weight {field} must be non-negative, got {getattr(self, field)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")


BootstrapLossWeights.JOINT = BootstrapLossWeights()
BootstrapLossWeights.SHARED = BootstrapLossWeights(ce_vit=0.5, ce_cnn=0.5, kd_vit=0.5, kd_cnn=0.5, hint=5.0)


def joint_losses(
    vit_logits: Array,
    cnn_logits: Array,
    labels_or_targets: Array,
    vit_blocks: Sequence[Array],
    cnn_blocks: Sequence[Array],
    decay: float | Array,
    weights: BootstrapLossWeights = BootstrapLossWeights.JOINT,
    hint_layers: Sequence[int] | None = None,
) -> dict[str, Array]:
    """Joint mode (two models, two optimizers): each model's loss and the unweighted terms.

    loss_vit = w_ce_vit·CE_vit + w_kd_vit·KD(vit ← cnn) + w_hint·decay·Σ hint;
    loss_cnn = w_ce_cnn·CE_cnn + w_kd_cnn·KD(cnn ← vit). Labels are integers (B,) or soft targets (B, C).
    """
    terms = _bootstrap_terms(vit_logits, cnn_logits, labels_or_targets, vit_blocks, cnn_blocks, weights, hint_layers)
    loss_vit = (
        weights.ce_vit * terms["ce_vit"] + weights.kd_vit * terms["kd_vit"] + weights.hint * decay * terms["hint"]
    )
    loss_cnn = weights.ce_cnn * terms["ce_cnn"] + weights.kd_cnn * terms["kd_cnn"]
    return {"loss_vit": loss_vit, "loss_cnn": loss_cnn, **terms}


def shared_loss(
    vit_logits: Array,
    cnn_logits: Array,
    labels_or_targets: Array,
    vit_blocks: Sequence[Array],
    cnn_blocks: Sequence[Array],
    decay: float | Array,
    weights: BootstrapLossWeights = BootstrapLossWeights.SHARED,
    hint_layers: Sequence[int] | None = None,
) -> dict[str, Array]:
    """Shared mode (one model, one optimizer): `loss` and the unweighted terms.

    loss = w_ce_cnn·CE_cnn + w_ce_vit·CE_vit + w_kd_cnn·KD(cnn ← vit) + w_kd_vit·KD(vit ← cnn) + w_hint·decay·Σ hint,
    by default 0.5, 0.5, 0.5, 0.5 and 5. Labels are integers (B,) or soft targets (B, C).
    """
    terms = _bootstrap_terms(vit_logits, cnn_logits, labels_or_targets, vit_blocks, cnn_blocks, weights, hint_layers)
    loss = (
        weights.ce_cnn * terms["ce_cnn"]
        + weights.ce_vit * terms["ce_vit"]
        + weights.kd_cnn * terms["kd_cnn"]
        + weights.kd_vit * terms["kd_vit"]
        + weights.hint * decay * terms["hint"]
    )
    return {"loss": loss, **terms}


def _bootstrap_terms(
    vit_logits: Array,
    cnn_logits: Array,
    labels_or_targets: Array,
    vit_blocks: Sequence[Array],
    cnn_blocks: Sequence[Array],
    weights: BootstrapLossWeights,
    hint_layers: Sequence[int] | None,
) -> dict[str, Array]:
    return {
        "ce_vit": _ce(vit_logits, labels_or_targets),
        "ce_cnn": _ce(cnn_logits, labels_or_targets),
        "kd_vit": kd_loss(vit_logits, cnn_logits, weights.temperature),
        "kd_cnn": kd_loss(cnn_logits, vit_logits, weights.temperature),
        "hint": hint_losses(vit_blocks, cnn_blocks, hint_layers),
    }


def _ce(logits: Array, labels_or_targets: Array) -> Array:
    """Soft-target CE when the targets have the logits' rank, integer-label CE when they have one less."""
    if labels_or_targets.ndim == logits.ndim:
        if labels_or_targets.shape != logits.shape:
            raise ValueError(f"soft targets {labels_or_targets.shape} must match logits {logits.shape}")
        return soft_cross_entropy(logits, labels_or_targets)
    return cross_entropy(logits, labels_or_targets)


def _check_integer_labels(logits: Array, labels: Array) -> None:
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels {labels.shape} must be logits {logits.shape} without the class axis")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")


def _check_hint_shapes(vit_tokens: Array, cnn_map: Array) -> None:
    if vit_tokens.ndim != 3 or cnn_map.ndim != 4:
        raise ValueError(
            f"hint needs ViT tokens (B, 1+N, D) and a CNN map (B, h, w, D), got {vit_tokens.shape} and {cnn_map.shape}"
        )
    if vit_tokens.shape[0] != cnn_map.shape[0]:
        raise ValueError(f"ViT batch {vit_tokens.shape[0]} differs from CNN batch {cnn_map.shape[0]}")
    if vit_tokens.shape[-1] != cnn_map.shape[-1]:
        raise ValueError(f"ViT width {vit_tokens.shape[-1]} differs from CNN width {cnn_map.shape[-1]}")
    n_vit, n_cnn = vit_tokens.shape[1] - 1, cnn_map.shape[1] * cnn_map.shape[2]
    if min(n_vit, n_cnn) < 1 or max(n_vit, n_cnn) % min(n_vit, n_cnn):
        raise ValueError(
            f"ViT token count {n_vit} (cls dropped) and CNN token count {n_cnn} ({cnn_map.shape[1]}×"
            f"{cnn_map.shape[2]}) must divide one another"
        )


def _pool_tokens(tokens: Array, n_out: int) -> Array:
    """(B, n, D) → (B, n_out, D): mean of each run of n // n_out consecutive tokens."""
    batch, n, dim = tokens.shape
    return tokens.reshape(batch, n_out, n // n_out, dim).mean(axis=2)


def _layer_norm(x: Array) -> Array:
    mean = x.mean(axis=-1, keepdims=True)
    var = jnp.mean((x - mean) ** 2, axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + HINT_LN_EPS)
