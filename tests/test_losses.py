"""Losses: every term against a value worked out by hand (closed forms, or plain numpy loops), plus the
stop-gradient isolation the bootstrapping optimizers rely on."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onepfrac_jax.train.losses import (
    BootstrapLossWeights,
    cross_entropy,
    hint_decay,
    hint_loss,
    hint_losses,
    joint_losses,
    kd_loss,
    shared_loss,
    soft_cross_entropy,
    top1_correct,
)

LN2, LN3 = math.log(2), math.log(3)
# softmax(log q) = q / Σq: rows with probabilities (1/6, 1/3, 1/2) and (1/4, 1/4, 1/2).
LOGITS = np.log(np.array([[1.0, 2.0, 3.0], [1.0, 1.0, 2.0]], np.float32))


# ---------------------------------------------------------------- numpy references (hint, joint, shared)

def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    z = x - x.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_ce(logits, labels):
    logp = np_log_softmax(logits)
    if np.ndim(labels) == logp.ndim:
        return float(np.mean(-(labels * logp).sum(-1)))
    return float(np.mean([-logp[b, labels[b]] for b in range(len(labels))]))


def np_kd(student, teacher, t):
    pt = np.exp(np_log_softmax(np.asarray(teacher) / t))
    return float(np.mean((pt * (np.log(pt) - np_log_softmax(np.asarray(student) / t))).sum(-1)) * t * t)


def np_hint(vit_tokens, cnn_map):
    """Loops, not reshapes: raster order and consecutive-run pooling written out."""
    vit = np.asarray(vit_tokens, np.float64)[:, 1:]
    cnn_map = np.asarray(cnn_map, np.float64)
    b, h, w, _ = cnn_map.shape
    cnn = np.stack([[cnn_map[i, r, c] for r in range(h) for c in range(w)] for i in range(b)])

    def pool(x, n_out):
        step = x.shape[1] // n_out
        return np.stack([[x[i, k * step:(k + 1) * step].mean(0) for k in range(n_out)] for i in range(b)])

    if vit.shape[1] > cnn.shape[1]:
        vit = pool(vit, cnn.shape[1])
    elif cnn.shape[1] > vit.shape[1]:
        cnn = pool(cnn, vit.shape[1])

    def ln(x):
        mu = x.mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5)

    return float(np.mean((ln(vit) - ln(cnn)) ** 2))


def rand(seed, *shape, scale=1.0):
    return (scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


# ---------------------------------------------------------------- cross-entropy and accuracy

def test_cross_entropy_hand_values():
    labels = jnp.array([2, 0])
    # row 0: −log(1/2); row 1: −log(1/4)
    np.testing.assert_allclose(cross_entropy(LOGITS, labels), (LN2 + 2 * LN2) / 2, rtol=1e-6)
    # smoothing ε: (1−ε)·nll + ε·mean_c(−log p_c); row 0 −log p = (ln6, ln3, ln2), row 1 (ln4, ln4, ln2)
    eps = 0.1
    row0 = (1 - eps) * LN2 + eps * (math.log(6) + LN3 + LN2) / 3
    row1 = (1 - eps) * 2 * LN2 + eps * (2 * LN2 + 2 * LN2 + LN2) / 3
    np.testing.assert_allclose(cross_entropy(LOGITS, labels, label_smoothing=eps), (row0 + row1) / 2, rtol=1e-6)


def test_soft_cross_entropy_hand_values_and_smoothing_equivalence():
    targets = jnp.array([[0.5, 0.0, 0.5], [0.2, 0.3, 0.5]])
    row0 = 0.5 * math.log(6) + 0.5 * LN2
    row1 = 0.2 * 2 * LN2 + 0.3 * 2 * LN2 + 0.5 * LN2
    np.testing.assert_allclose(soft_cross_entropy(LOGITS, targets), (row0 + row1) / 2, rtol=1e-6)
    # integer CE with smoothing ε is soft CE against (1−ε)·onehot + ε/C
    eps, labels = 0.3, np.array([1, 2])
    smoothed = (1 - eps) * np.eye(3)[labels] + eps / 3
    np.testing.assert_allclose(
        cross_entropy(LOGITS, jnp.asarray(labels), eps), soft_cross_entropy(LOGITS, smoothed), rtol=1e-6
    )


def test_losses_compute_in_float32_for_bf16_logits():
    logits = jnp.asarray(rand(0, 4, 10, scale=3.0))
    labels = jnp.array([0, 3, 9, 1])
    for fn in (lambda x: cross_entropy(x, labels, 0.1), lambda x: kd_loss(x, logits[::-1])):
        low = fn(logits.astype(jnp.bfloat16))
        assert low.dtype == jnp.float32
        # only the bf16 rounding of the inputs (rel. 2^-8) may differ, not a bf16 reduction
        np.testing.assert_allclose(low, fn(logits.astype(jnp.bfloat16).astype(jnp.float32)), rtol=1e-6)


def test_top1_correct_counts_and_mask():
    logits = jnp.array([[1.0, 3.0, 2.0], [5.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    labels = jnp.array([1, 0, 0])
    correct, count = top1_correct(logits, labels)
    assert (int(correct), int(count)) == (2, 3)
    correct, count = top1_correct(logits, labels, mask=jnp.array([True, False, True]))
    assert (int(correct), int(count)) == (1, 2)


def test_cross_entropy_rejects_bad_labels():
    with pytest.raises(ValueError, match=r"labels \(3,\) must be logits \(2, 3\)"):
        cross_entropy(LOGITS, jnp.array([0, 1, 2]))
    with pytest.raises(ValueError, match="integers"):
        cross_entropy(LOGITS, jnp.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy(LOGITS, jnp.array([0, 1]), label_smoothing=1.5)


# ---------------------------------------------------------------- knowledge distillation

def test_kd_loss_hand_value_at_t4():
    # teacher/student = 4·log q, so softmax(·/4) = q exactly
    teacher = 4 * np.log(np.array([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]], np.float32))
    student = 4 * np.log(np.array([[1.0, 1.0, 2.0], [2.0, 1.0, 1.0]], np.float32))
    # KL(p_t‖p_s) = Σ p_t log(p_t/p_s): row 0 p_t=(1/6,1/3,1/2), p_s=(1/4,1/4,1/2); row 1 p_t=1/3, p_s=(1/2,1/4,1/4)
    kl0 = (1 / 6) * math.log((1 / 6) / (1 / 4)) + (1 / 3) * math.log((1 / 3) / (1 / 4)) + 0.0
    kl1 = (1 / 3) * (math.log((1 / 3) / (1 / 2)) + 2 * math.log((1 / 3) / (1 / 4)))
    np.testing.assert_allclose(kd_loss(student, teacher, 4.0), 16 * (kl0 + kl1) / 2, rtol=1e-5)
    np.testing.assert_allclose(kd_loss(student, teacher), 16 * (kl0 + kl1) / 2, rtol=1e-5)  # T = 4 by default
    assert float(kd_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_matches_numpy_at_other_temperatures():
    s, t = rand(1, 3, 5, scale=2.0), rand(2, 3, 5, scale=2.0)
    for temp in (1.0, 2.5):
        np.testing.assert_allclose(kd_loss(s, t, temp), np_kd(s, t, temp), rtol=1e-5)


def test_kd_gradient_reaches_only_the_student():
    s, t = jnp.asarray(rand(3, 2, 3)), jnp.asarray(rand(4, 2, 3))
    g_student, g_teacher = jax.grad(kd_loss, argnums=(0, 1))(s, t)
    assert np.all(np.asarray(g_teacher) == 0.0)
    assert np.abs(np.asarray(g_student)).max() > 1e-3


# ---------------------------------------------------------------- hint

def _one_hot_tokens(n, d):
    """(n, d) one-hot rows: each token's features name its position."""
    return np.eye(d, dtype=np.float32)[:n]


def test_hint_flattens_the_cnn_map_in_raster_order():
    h = w = 4
    tokens = _one_hot_tokens(16, 16)  # token k = onehot(k), D = 16
    cls = rand(0, 1, 16)
    vit = np.concatenate([cls, tokens])[None]  # (1, 17, 16); the odd cls token must be dropped
    raster = np.stack([[tokens[r * w + c] for c in range(w)] for r in range(h)])[None]
    column_major = np.stack([[tokens[c * h + r] for c in range(w)] for r in range(h)])[None]
    assert float(hint_loss(vit, raster)) == 0.0
    # LN(onehot_i) − LN(onehot_j), i ≠ j, is ±1/sqrt(var + eps) at two features, var = (1/D)(1 − 1/D).
    # The column-major map moves the 12 off-diagonal positions: MSE = 12 · 2/(var + eps) / (16 tokens · 16 features).
    var = (1 / 16) * (1 - 1 / 16)
    np.testing.assert_allclose(hint_loss(vit, column_major), 12 * 2 / (var + 1e-5) / 256, rtol=1e-5)


def test_hint_pools_the_longer_cnn_sequence_over_consecutive_raster_runs():
    # CNN 4×4 (16 tokens) vs ViT 2×2 (4 tokens): ratio 4, run k = row k of the map. Each row is
    # onehot(k) plus a perturbation summing to zero along the row, so the runs average to onehot(k) exactly,
    # while 2×2 spatial squares would mix rows.
    d = 4
    wiggle = np.array([[0.5, -0.5, 0.25, -0.25]], np.float32).T * np.array([[1.0, -1.0, 2.0, 0.0]], np.float32)
    cnn = np.stack([_one_hot_tokens(4, d)[k] + wiggle for k in range(4)])[None]  # (1, 4, 4, 4)
    vit = np.concatenate([np.zeros((1, d), np.float32), _one_hot_tokens(4, d)])[None]
    assert float(hint_loss(vit, cnn)) == pytest.approx(0.0, abs=1e-10)
    assert np_hint(vit, cnn) == pytest.approx(0.0, abs=1e-10)
    vit_r, cnn_r = rand(5, 2, 1 + 4, 6), rand(6, 2, 4, 4, 6)
    np.testing.assert_allclose(hint_loss(vit_r, cnn_r), np_hint(vit_r, cnn_r), rtol=1e-5)


def test_hint_pools_the_longer_vit_sequence():
    # ViT 16 tokens vs CNN 2×2: consecutive runs of 4 ViT tokens, each averaging to onehot(k)
    d = 4
    wiggle = np.array([0.5, -0.5, 1.0, -1.0], np.float32)[:, None] * np.array([1.0, 0.0, -2.0, 3.0], np.float32)
    vit = np.concatenate([np.zeros((1, d), np.float32)] + [_one_hot_tokens(4, d)[k] + wiggle for k in range(4)])[None]
    cnn = _one_hot_tokens(4, d).reshape(1, 2, 2, d)
    assert float(hint_loss(vit, cnn)) == pytest.approx(0.0, abs=1e-10)
    vit_r, cnn_r = rand(7, 3, 1 + 16, 5), rand(8, 3, 2, 2, 5)
    np.testing.assert_allclose(hint_loss(vit_r, cnn_r), np_hint(vit_r, cnn_r), rtol=1e-5)
    vit_r = rand(9, 3, 1 + 16, 5)
    cnn_r = rand(10, 3, 4, 4, 5)  # equal counts: no pooling
    np.testing.assert_allclose(hint_loss(vit_r, cnn_r), np_hint(vit_r, cnn_r), rtol=1e-5)


def test_hint_layer_norm_has_no_affine_so_scaling_the_cnn_map_is_invisible():
    vit, cnn = rand(11, 2, 1 + 16, 8), rand(12, 2, 4, 4, 8)
    base = float(hint_loss(vit, cnn))
    assert base > 0.1
    np.testing.assert_allclose(hint_loss(vit, 10.0 * cnn + 3.0), base, rtol=1e-4)
    np.testing.assert_allclose(hint_loss(0.1 * vit, cnn), base, rtol=1e-3)


def test_hint_gradient_reaches_only_the_vit():
    vit, cnn = jnp.asarray(rand(13, 2, 5, 6)), jnp.asarray(rand(14, 2, 4, 4, 6))
    g_vit, g_cnn = jax.jit(jax.grad(hint_loss, argnums=(0, 1)))(vit, cnn)
    assert np.all(np.asarray(g_cnn) == 0.0)
    assert np.all(np.asarray(g_vit[:, 0]) == 0.0)  # the cls token takes no part
    assert np.abs(np.asarray(g_vit[:, 1:])).max() > 1e-3


def test_hint_losses_sum_over_chosen_layers():
    vit = [rand(20 + i, 2, 5, 6) for i in range(3)]
    cnn = [rand(30 + i, 2, 2, 2, 6) for i in range(3)]
    per_layer = [np_hint(v, c) for v, c in zip(vit, cnn, strict=True)]
    np.testing.assert_allclose(hint_losses(vit, cnn, [0, 2]), per_layer[0] + per_layer[2], rtol=1e-5)
    np.testing.assert_allclose(hint_losses(vit, cnn), sum(per_layer), rtol=1e-5)


def test_hint_rejects_bad_inputs_naming_them():
    vit, cnn = rand(0, 2, 17, 6), rand(1, 2, 4, 4, 6)
    with pytest.raises(ValueError, match=r"ViT token count 16 .* CNN token count 9 \(3×3\)"):
        hint_loss(vit, rand(2, 2, 3, 3, 6))
    with pytest.raises(ValueError, match="ViT width 6 differs from CNN width 5"):
        hint_loss(vit, rand(3, 2, 4, 4, 5))
    with pytest.raises(ValueError, match="ViT batch 2 differs from CNN batch 3"):
        hint_loss(vit, rand(4, 3, 4, 4, 6))
    with pytest.raises(ValueError, match=r"hint layer 1: ViT width 6 differs from CNN width 8"):
        hint_losses([vit, vit], [cnn, rand(5, 2, 4, 4, 8)])
    with pytest.raises(ValueError, match=r"hint layers \[2, -1\] out of range: valid block indices are 0\.\.1"):
        hint_losses([vit, vit], [cnn, cnn], [0, 2, -1])
    with pytest.raises(ValueError, match="3 ViT and 2 CNN blocks"):
        hint_losses([vit] * 3, [cnn] * 2)
    with pytest.raises(ValueError, match="at least one block"):
        hint_losses([vit], [cnn], [])


def test_hint_decay_schedule():
    assert float(hint_decay(0, 240)) == 1.0
    assert float(hint_decay(120, 240)) == 0.5
    assert float(hint_decay(60, 240)) == 0.75
    assert float(hint_decay(240, 240)) == 0.0
    assert float(hint_decay(300, 240)) == 0.0
    np.testing.assert_allclose(jax.jit(hint_decay, static_argnums=1)(jnp.int32(3), 10), 0.7, rtol=1e-6)
    with pytest.raises(ValueError, match="total_epochs must be positive, got 0"):
        hint_decay(0, 0)


# ---------------------------------------------------------------- joint and shared

def _bootstrap_inputs(soft=False):
    vit_logits, cnn_logits = rand(40, 3, 5, scale=2.0), rand(41, 3, 5, scale=2.0)
    labels = np.array([0, 4, 2])
    if soft:
        labels = np.abs(rand(42, 3, 5)) + 0.1
        labels = labels / labels.sum(-1, keepdims=True)
    vit_blocks = [rand(43 + i, 3, 1 + 4, 6) for i in range(2)]
    cnn_blocks = [rand(45 + i, 3, 4, 4, 6) for i in range(2)]
    return vit_logits, cnn_logits, labels, vit_blocks, cnn_blocks


def _np_terms(vit_logits, cnn_logits, labels, vit_blocks, cnn_blocks):
    return {
        "ce_vit": np_ce(vit_logits, labels),
        "ce_cnn": np_ce(cnn_logits, labels),
        "kd_vit": np_kd(vit_logits, cnn_logits, 4.0),
        "kd_cnn": np_kd(cnn_logits, vit_logits, 4.0),
        "hint": sum(np_hint(v, c) for v, c in zip(vit_blocks, cnn_blocks, strict=True)),
    }


@pytest.mark.parametrize("soft", [False, True])
def test_joint_losses_follow_the_paper_formula(soft):
    inputs = _bootstrap_inputs(soft)
    decay = 0.25
    out = joint_losses(*inputs, decay)
    ref = _np_terms(*inputs)
    for key, value in ref.items():
        np.testing.assert_allclose(out[key], value, rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(out["loss_vit"], ref["ce_vit"] + ref["kd_vit"] + 10 * decay * ref["hint"], rtol=1e-5)
    np.testing.assert_allclose(out["loss_cnn"], ref["ce_cnn"] + ref["kd_cnn"], rtol=1e-5)


def test_shared_loss_follows_the_paper_formula():
    inputs = _bootstrap_inputs()
    decay = 0.6
    out = shared_loss(*inputs, decay)
    r = _np_terms(*inputs)
    expected = (
        0.5 * r["ce_cnn"] + 0.5 * r["ce_vit"] + 0.5 * r["kd_cnn"] + 0.5 * r["kd_vit"] + 5 * decay * r["hint"]
    )
    np.testing.assert_allclose(out["loss"], expected, rtol=1e-5)
    for key, value in r.items():
        np.testing.assert_allclose(out[key], value, rtol=1e-5, err_msg=key)
    # configurable weights and temperature, and a layer subset
    w = BootstrapLossWeights(ce_vit=1.0, ce_cnn=2.0, kd_vit=3.0, kd_cnn=0.0, hint=1.0, temperature=2.0)
    out = shared_loss(*inputs, 1.0, weights=w, hint_layers=[1])
    vit_logits, cnn_logits, _, vit_blocks, cnn_blocks = inputs
    expected = (
        r["ce_vit"] + 2 * r["ce_cnn"] + 3 * np_kd(vit_logits, cnn_logits, 2.0) + np_hint(vit_blocks[1], cnn_blocks[1])
    )
    np.testing.assert_allclose(out["loss"], expected, rtol=1e-5)


def test_paper_weight_presets():
    j, s = BootstrapLossWeights.JOINT, BootstrapLossWeights.SHARED
    assert (j.ce_vit, j.ce_cnn, j.kd_vit, j.kd_cnn, j.hint, j.temperature) == (1, 1, 1, 1, 10, 4)
    assert (s.ce_vit, s.ce_cnn, s.kd_vit, s.kd_cnn, s.hint, s.temperature) == (0.5, 0.5, 0.5, 0.5, 5, 4)
    with pytest.raises(ValueError, match="kd_cnn must be non-negative, got -1"):
        BootstrapLossWeights(kd_cnn=-1.0)
    with pytest.raises(ValueError, match="temperature must be positive, got 0"):
        BootstrapLossWeights(temperature=0.0)


def test_joint_losses_gradients_stay_with_their_own_model():
    vit_logits, cnn_logits, labels, vit_blocks, cnn_blocks = _bootstrap_inputs()

    def grads(key):
        fn = lambda vl, cl, vb, cb: joint_losses(vl, cl, labels, vb, cb, 0.5)[key]
        return jax.jit(jax.grad(fn, argnums=(0, 1, 2, 3)))(vit_logits, cnn_logits, vit_blocks, cnn_blocks)

    g_vl, g_cl, g_vb, g_cb = grads("loss_vit")
    assert np.all(np.asarray(g_cl) == 0.0)
    assert all(np.all(np.asarray(x) == 0.0) for x in g_cb)
    assert np.abs(np.asarray(g_vl)).max() > 1e-3
    assert all(np.abs(np.asarray(x)).max() > 1e-4 for x in g_vb)

    g_vl, g_cl, g_vb, _ = grads("loss_cnn")
    assert np.all(np.asarray(g_vl) == 0.0)
    assert all(np.all(np.asarray(x) == 0.0) for x in g_vb)
    assert np.abs(np.asarray(g_cl)).max() > 1e-3


def test_joint_losses_reject_mismatched_soft_targets():
    vit_logits, cnn_logits, _, vit_blocks, cnn_blocks = _bootstrap_inputs()
    with pytest.raises(ValueError, match=r"soft targets \(3, 4\) must match logits \(3, 5\)"):
        joint_losses(vit_logits, cnn_logits, np.ones((3, 4), np.float32) / 4, vit_blocks, cnn_blocks, 1.0)
