"""σ-factor IFS sampling (Anderson & Farrell, WACV'22) and the Δ perturbations that make 1p-frac's classes.

A system of N affine maps is an array (N, 6) of (a, b, c, d, e, f): w(x, y) = (a x + b y + e, c x + d y + f).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PERTURBATIONS = ("multiplicative", "additive")


def _rotation(theta: jax.Array) -> jax.Array:
    c, s = jnp.cos(theta), jnp.sin(theta)
    return jnp.array([[c, -s], [s, c]])


def sample_singular_values(key: jax.Array, num_maps: int, sigma: jax.Array) -> jax.Array:
    """Draws (N, 2) singular values s1 ≥ s2 in [0, 1] with Σ_j (s1_j + 2 s2_j) = σ exactly.

    The bounds keep every later pair feasible: p is the σ budget left, q the least the remaining maps must take.
    """
    keys = jax.random.split(key, 2 * num_maps)
    p = sigma
    q = sigma - 3 * num_maps + 3
    pairs = []
    for j in range(num_maps - 1):
        s1 = jax.random.uniform(keys[2 * j], minval=jnp.maximum(0.0, q / 3), maxval=jnp.minimum(1.0, p))
        q, p = q - s1, p - s1
        s2 = jax.random.uniform(keys[2 * j + 1], minval=jnp.maximum(0.0, q / 2), maxval=jnp.minimum(s1, p / 2))
        q, p = q - 2 * s2 + 3, p - 2 * s2
        pairs.append((s1, s2))
    s2 = jax.random.uniform(keys[-1], minval=jnp.maximum(0.0, (p - 1) / 2), maxval=p / 3)
    pairs.append((p - 2 * s2, s2))
    return jnp.array(pairs)


def sample_ifs(key: jax.Array, num_maps: int = 2, sigma0: float = 3.5) -> tuple[jax.Array, jax.Array]:
    """Samples one σ-factor system: returns (params (N, 6), σ) with σ ~ U(σ₀ − 0.1, σ₀ + 0.1).

    A_j = U_j diag(s1, s2) V_j, with U_j, V_j rotations by θ ~ U(−π, π) times diag(±1, ±1); t_j ~ U(−1, 1)².
    """
    k_sigma, k_sv, k_theta, k_sign, k_t = jax.random.split(key, 5)
    sigma = jax.random.uniform(k_sigma, minval=sigma0 - 0.1, maxval=sigma0 + 0.1)
    sv = sample_singular_values(k_sv, num_maps, sigma)
    thetas = jax.random.uniform(k_theta, (2 * num_maps,), minval=-jnp.pi, maxval=jnp.pi)
    signs = jax.random.choice(k_sign, jnp.array([-1.0, 1.0]), (2 * num_maps, 2))
    maps = []
    for j in range(num_maps):
        u = _rotation(thetas[j]) * signs[j][None, :]
        v = _rotation(thetas[num_maps + j]) * signs[num_maps + j][None, :]
        maps.append((u * sv[j][None, :]) @ v)
    a = jnp.stack(maps).reshape(num_maps, 4)
    t = jax.random.uniform(k_t, (num_maps, 2), minval=-1.0, maxval=1.0)
    return jnp.concatenate([a, t], axis=1), sigma


def map_probabilities(params: jax.Array) -> jax.Array:
    """p_j ∝ |det A_j| (of the unperturbed maps, as the public code does)."""
    det = jnp.abs(params[..., 0] * params[..., 3] - params[..., 1] * params[..., 2])
    return det / jnp.sum(det, axis=-1, keepdims=True)


def perturb(key: jax.Array, params: jax.Array, delta: float, mode: str = "multiplicative") -> jax.Array:
    """One class: every one of the 6 parameters of every map scaled by U(1−Δ, 1+Δ), or shifted by U(−Δ/2, Δ/2)."""
    if mode == "multiplicative":
        return params * jax.random.uniform(key, params.shape, minval=1.0 - delta, maxval=1.0 + delta)
    if mode == "additive":
        return params + jax.random.uniform(key, params.shape, minval=-delta / 2, maxval=delta / 2)
    raise ValueError(f"perturbation {mode!r} is not one of {PERTURBATIONS}")


def class_key(key: jax.Array, label: jax.Array, attempt: jax.Array) -> jax.Array:
    """The key of a class's `attempt`-th perturbation: independent of batching and device count."""
    return jax.random.fold_in(jax.random.fold_in(key, label), attempt)


def perturb_classes(
    key: jax.Array, params: jax.Array, labels: jax.Array, attempts: jax.Array, delta: float, mode: str
) -> jax.Array:
    """Perturbed systems (L, N, 6) for classes `labels` at re-draw counts `attempts`."""
    keys = jax.vmap(class_key, in_axes=(None, 0, 0))(key, labels, attempts)
    return jax.vmap(perturb, in_axes=(0, None, None, None))(keys, params, delta, mode)
