"""σ-factor IFS sampling (Anderson & Farrell, WACV'22) and the Δ perturbations that make 1p-frac's classes.

A system of N affine maps is an array (N, 6) of (a, b, c, d, e, f): w(x, y) = (a x + b y + e, c x + d y + f).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

PERTURBATIONS = ("multiplicative", "additive")


def _rotation(theta: jax.Array) -> jax.Array:
    c, s = jnp.cos(theta), jnp.sin(theta)
    return jnp.array([[c, -s], [s, c]])


def singular_values(u: jax.Array, num_maps: int, sigma: jax.Array) -> jax.Array:
    """(N, 2) singular values s1 ≥ s2 in [0, 1] with Σ_j (s1_j + 2 s2_j) = σ exactly, from 2N uniforms u ∈ [0, 1).

    Drawn in turn, each uniform between bounds that keep every later pair feasible: p is the σ budget left,
    q the least the remaining maps must take.
    """

    def between(lo, hi, v):
        return lo + v * (hi - lo)

    p = sigma
    q = sigma - 3 * num_maps + 3
    pairs = []
    for j in range(num_maps - 1):
        s1 = between(jnp.maximum(0.0, q / 3), jnp.minimum(1.0, p), u[2 * j])
        q, p = q - s1, p - s1
        s2 = between(jnp.maximum(0.0, q / 2), jnp.minimum(s1, p / 2), u[2 * j + 1])
        q, p = q - 2 * s2 + 3, p - 2 * s2
        pairs.append((s1, s2))
    s2 = between(jnp.maximum(0.0, (p - 1) / 2), p / 3, u[-1])
    pairs.append((p - 2 * s2, s2))
    return jnp.array(pairs)


@functools.partial(jax.jit, static_argnums=(1, 2))
def sample_ifs(key: jax.Array, num_maps: int = 2, sigma0: float = 3.5) -> tuple[jax.Array, jax.Array]:
    """Samples one σ-factor system: returns (params (N, 6), σ) with σ ~ U(σ₀ − 0.1, σ₀ + 0.1).

    A_j = U_j diag(s1, s2) V_j, with U_j, V_j rotations by θ ~ U(−π, π) times diag(±1, ±1); t_j ~ U(−1, 1)².
    Every variate comes from one draw of uniforms (one PRNG call compiles in a fraction of the time of many).
    """
    n = num_maps
    u = jax.random.uniform(key, (1 + 2 * n + 2 * n + 4 * n + 2 * n,))
    u_sigma, u_sv, u_theta, u_sign, u_t = jnp.split(u, np.cumsum([1, 2 * n, 2 * n, 4 * n]))
    sigma = sigma0 - 0.1 + 0.2 * u_sigma[0]
    sv = singular_values(u_sv, n, sigma)
    thetas = jnp.pi * (2 * u_theta - 1)
    signs = jnp.where(u_sign < 0.5, -1.0, 1.0).reshape(2 * n, 2)
    maps = []
    for j in range(n):
        rot_u = _rotation(thetas[j]) * signs[j][None, :]
        rot_v = _rotation(thetas[n + j]) * signs[n + j][None, :]
        maps.append((rot_u * sv[j][None, :]) @ rot_v)
    a = jnp.stack(maps).reshape(n, 4)
    t = (2 * u_t - 1).reshape(n, 2)
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


def class_keys(key: jax.Array, label: jax.Array, attempt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The keys of a class's `attempt`-th draw: (perturbation, patch masks), independent of batching and devices.

    Both come from fold_in(fold_in(key, label), attempt), split in two: a re-draw gets fresh maps and fresh masks.
    """
    perturb_key, mask_key = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, label), attempt))
    return perturb_key, mask_key


def perturb_classes(keys: jax.Array, params: jax.Array, delta: float, mode: str) -> jax.Array:
    """Perturbed systems (L, N, 6), one per perturbation key (L,)."""
    return jax.vmap(perturb, in_axes=(0, None, None, None))(keys, params, delta, mode)
