"""Chaos-game rendering on the accelerator, pixel for pixel as the public 1p-frac generator draws (SPEC §A3).

The chain x_0 = (0, 0), x_t = w_{c_t}(x_{t−1}), t = 1..T−1 is split into C chunks of K steps:
  1. every chunk composes its K affine maps into one map M_c (parallel over chunks and classes),
  2. a C-step sequential scan applies M_0, M_1, ... to find each chunk's exact start point,
  3. every chunk replays its K steps from that start (parallel again).
So the points are those of the single sequential chain (up to float rounding), at O(T) work and O(C + 2K)
sequential depth, instead of T sequential steps. The map choices are one keyed sequence shared by all classes
(the public code fixes them with `np.random.seed(100)`); every class draws its own patch masks from its own key.

Drawing ("patch" mode): the public code pastes, for each point in order, a 3×3 patch with its top-left corner
at (x + 1, y + 1) *without a mask*, so a cell whose mask bit is off writes 0 and erases what earlier points drew:
on every pixel the last point whose patch covers it decides the value. On parallel hardware that is one
scatter-*max* per point of the key t·512 + mask into the point's own pixel: the map then holds, per pixel, the
latest point that sits there and its mask. A pixel q is covered by cell (i, j) of the points at q − (1 + i, 1 + j),
so its winner is the largest key among those 9 neighbours (keys are unique: t is), and its value is bit 3i + j
of that winner's mask. Exact, deterministic and order-free: no point-by-point loop.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

DRAW_MODES = ("patch", "point")
VALUE = 127
MASK_VALUES = 511  # a patch mask is uniform over 1..511: 9 bits, never all off
# A point is treated like the public code's NaN once the chain leaves this box: the class's maps are not contractive.
MAX_COORDINATE = 1e10
# The public code drops the 100 points before the first NaN as well (they are already far out).
DROPPED_BEFORE_ESCAPE = 100
# Keys t·512 + mask must fit int32.
MAX_POINTS = 2**31 // 512


@functools.partial(jax.jit, static_argnums=2)
def choice_sequence(key: jax.Array, probs: jax.Array, num_steps: int) -> jax.Array:
    """The map index of every chain step (num_steps,) int32, drawn with probabilities `probs`."""
    return jax.random.choice(key, probs.shape[-1], (num_steps,), p=probs).astype(jnp.int32)


def pack_images(images: jax.Array) -> jax.Array:
    """Canvases (..., S, S) uint8 in {0, VALUE} as bits: (..., S, ⌈S/8⌉) uint8, 8 pixels of a row a byte (first
    pixel in the high bit): 1/8 of the memory, exact since a rendered pixel takes one of two values."""
    return jnp.packbits(images > 0, axis=-1)


def unpack_images(packed: jax.Array) -> jax.Array:
    """pack_images' inverse: (..., S, ⌈S/8⌉) bits → (..., S, S) uint8 in {0, VALUE} (canvases are square)."""
    return jnp.unpackbits(packed, axis=-1, count=packed.shape[-2]) * jnp.uint8(VALUE)


def mask_sequence(key: jax.Array, num_points: int) -> jax.Array:
    """A 9-bit patch mask per point (num_points,) int32 in 1..511; bit 3·row + col switches that patch cell.

    One 32-bit draw per mask, taken modulo 511: 2³² ≡ 32 (mod 511), so 32 of the 511 values are 1 + 1/8,404,992
    times as likely as the others — uniform to 1.2e-7, at a third of the cost of `randint`'s two draws.
    """
    bits = jax.random.bits(key, (num_points,), jnp.uint32)
    return (1 + bits % MASK_VALUES).astype(jnp.int32)


def _apply(w: jax.Array, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    return w[..., 0] * x + w[..., 1] * y + w[..., 4], w[..., 2] * x + w[..., 3] * y + w[..., 5]


def _compose(w: jax.Array, m: jax.Array) -> jax.Array:
    """The map w ∘ m, both as (..., 6)."""
    e, f = _apply(w, m[..., 4], m[..., 5])
    return jnp.stack(
        [
            w[..., 0] * m[..., 0] + w[..., 1] * m[..., 2],
            w[..., 0] * m[..., 1] + w[..., 1] * m[..., 3],
            w[..., 2] * m[..., 0] + w[..., 3] * m[..., 2],
            w[..., 2] * m[..., 1] + w[..., 3] * m[..., 3],
            e,
            f,
        ],
        axis=-1,
    )


def _chunked_chain(params: jax.Array, choices: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Steps 1..C·K of the chain for systems (L, N, 6) and choices (C, K) shared or (L, C, K) per system: x and y
    as (K, L, C).

    Point (k, l, c) is step t = c·K + k + 1 of class l's chain.
    """
    num_classes, num_maps = params.shape[:2]
    num_chunks, chunk_len = choices.shape[-2:]
    per_system = choices if choices.ndim == 3 else choices[None]  # (L or 1, C, K)

    def maps_at(k):  # (L, C, 6); a where-chain over the N maps is ~1.4× faster than a gather on XLA:CPU
        chosen = params[:, num_maps - 1][:, None, :]
        for j in reversed(range(num_maps - 1)):
            chosen = jnp.where((per_system[:, :, k] == j)[:, :, None], params[:, j][:, None, :], chosen)
        return chosen

    identity = jnp.broadcast_to(jnp.array([1.0, 0.0, 0.0, 1.0, 0.0, 0.0], params.dtype), (num_classes, num_chunks, 6))
    chunk_maps, _ = jax.lax.scan(lambda m, k: (_compose(maps_at(k), m), None), identity, jnp.arange(chunk_len))

    def to_next_chunk(xy, m):
        return _apply(m, *xy), xy

    zeros = jnp.zeros((num_classes,), params.dtype)
    _, (start_x, start_y) = jax.lax.scan(to_next_chunk, (zeros, zeros), jnp.moveaxis(chunk_maps, 1, 0))

    def step(xy, k):
        nxt = _apply(maps_at(k), *xy)
        return nxt, nxt

    _, (xs, ys) = jax.lax.scan(step, (start_x.T, start_y.T), jnp.arange(chunk_len))
    return xs, ys


def chain_points(params: jax.Array, choices: jax.Array, num_chunks: int = 1000) -> tuple[jax.Array, jax.Array]:
    """All T = choices.shape[-1] + 1 points of the chaos game, the origin first: x and y as (L, T), in chain order.

    `choices` (T − 1,) are shared by the L systems, or (L, T − 1) are each system's own."""
    num_steps = choices.shape[-1]
    num_chunks = max(1, min(num_chunks, num_steps))
    chunk_len = math.ceil(num_steps / num_chunks)
    widths = [(0, 0)] * (choices.ndim - 1) + [(0, num_chunks * chunk_len - num_steps)]
    padded = jnp.pad(choices, widths).reshape(*choices.shape[:-1], num_chunks, chunk_len)
    xs, ys = _chunked_chain(params, padded)

    def in_order(v):  # (K, L, C) → (L, T): the origin, then step c·K + k + 1 at column c·K + k + 1
        steps = jnp.transpose(v, (1, 2, 0)).reshape(v.shape[1], -1)[:, :num_steps]
        return jnp.concatenate([jnp.zeros_like(steps[:, :1]), steps], axis=1)

    return in_order(xs), in_order(ys)


def pixel_coordinates(xs: jax.Array, ys: jax.Array, image_size: int, pad: int):
    """The public code's normalisation of points (L, T): (col, row, kept (L, T), ok (L,)), before the flip.

    Per axis: shift so the minimum is 0, then truncate v / (max − min) · (W − 2·pad) + pad — onto [pad, W − pad].
    A point outside MAX_COORDINATE (or non-finite) and everything from 100 points before it is dropped; a class
    without extent on an axis is not ok.
    """
    num_points = xs.shape[-1]
    bad = ~((jnp.abs(xs) < MAX_COORDINATE) & (jnp.abs(ys) < MAX_COORDINATE))  # True for NaN too
    first_bad = jnp.min(jnp.where(bad, jnp.arange(num_points), num_points), axis=-1, keepdims=True)
    kept = jnp.arange(num_points) < jnp.where(first_bad < num_points, first_bad - DROPPED_BEFORE_ESCAPE, num_points)
    inf = jnp.asarray(jnp.inf, xs.dtype)
    cells = image_size - 2 * pad

    def axis(v):
        lo = jnp.min(jnp.where(kept, v, inf), axis=-1, keepdims=True)
        hi = jnp.max(jnp.where(kept, v, -inf), axis=-1, keepdims=True)
        span = hi - lo
        ok = jnp.isfinite(span) & (span > 0)
        pixel = ((v - lo) / jnp.where(ok, span, 1) * cells + pad).astype(jnp.int32)  # ≥ pad > 0: truncation
        return jnp.clip(pixel, pad, image_size - pad), ok[:, 0]

    col, ok_x = axis(xs)
    row, ok_y = axis(ys)
    return col, row, kept, ok_x & ok_y


def rasterise(
    xs: jax.Array, ys: jax.Array, masks: jax.Array | None, image_size: int, pad: int
) -> tuple[jax.Array, jax.Array]:
    """Draws points (L, T), in chain order, onto L canvases: (images (L, S, S) uint8 in {0, 127}, ok (L,) bool).

    `masks` (L, T) draws each point's 3×3 patch, the last point winning on every pixel it covers (see the module
    docstring); None draws single points. The image is then flipped vertically, as the public code saves it.
    A class whose kept points have no extent on an axis is not ok and gets an empty image.
    """
    size = image_size
    num_classes, num_points = xs.shape
    col, row, kept, ok = pixel_coordinates(xs, ys, size, pad)
    canvas = (jnp.arange(num_classes, dtype=jnp.int32) * size * size)[:, None]
    past_end = num_classes * size * size  # dropped points are written nowhere (mode="drop")
    flat = jnp.where(kept & ok[:, None], canvas + row * size + col, past_end).ravel()
    if masks is None:
        image = jnp.zeros(num_classes * size * size, jnp.uint8).at[flat].set(VALUE, mode="drop")
        image = image.reshape(num_classes, size, size)
    else:
        keys = jnp.arange(num_points, dtype=jnp.int32)[None, :] * (MASK_VALUES + 1) + masks
        latest = jnp.full(num_classes * size * size, -1, jnp.int32).at[flat].max(keys.ravel(), mode="drop")
        latest = jnp.pad(latest.reshape(num_classes, size, size), ((0, 0), (3, 0), (3, 0)), constant_values=-1)
        # cell (i, j) of a point at (r − 1 − i, c − 1 − j) covers pixel (r, c)
        covering = [latest[:, 2 - i : 2 - i + size, 2 - j : 2 - j + size] for i in range(3) for j in range(3)]
        winner = functools.reduce(jnp.maximum, covering)
        on = functools.reduce(jnp.logical_or, [(c == winner) & ((c >> cell) & 1 == 1)
                                               for cell, c in enumerate(covering)])
        image = jnp.where(on & (winner >= 0), jnp.uint8(VALUE), jnp.uint8(0))
    return jnp.flip(image, axis=1), ok


@functools.partial(jax.jit, static_argnames=("image_size", "pad", "num_points", "draw_mode", "num_chunks"))
def render_classes(
    params: jax.Array,
    choices: jax.Array,
    mask_keys: jax.Array,
    *,
    image_size: int = 512,
    pad: int = 6,
    num_points: int = 100_000,
    draw_mode: str = "patch",
    num_chunks: int = 1000,
) -> tuple[jax.Array, jax.Array]:
    """Renders systems (L, N, 6): (images (L, S, S) uint8 in {0, 127}, ok (L,)).

    `choices` (num_points − 1,) are the map choices of the chain's steps, shared by the L systems (or (L,
    num_points − 1), each system's own); class l's patch masks come from `mask_keys[l]` (ignored in point mode).
    Runs under vmap and shard_map too.
    """
    xs, ys = chain_points(params.astype(jnp.float32), choices, num_chunks)
    masks = jax.vmap(mask_sequence, in_axes=(0, None))(mask_keys, num_points) if draw_mode == "patch" else None
    return rasterise(xs, ys, masks, image_size, pad)


def render(
    params: jax.Array,
    probs: jax.Array,
    key: jax.Array,
    *,
    image_size: int = 512,
    pad: int = 6,
    num_points: int = 100_000,
    draw_mode: str = "patch",
    num_chunks: int = 1000,
) -> tuple[jax.Array, jax.Array]:
    """render_classes() with every draw from one key: the map choices (with probabilities `probs`) from
    split(key)[0], class l's masks from fold_in(split(key)[1], l)."""
    choice_key, masks_key = jax.random.split(key)
    mask_keys = jax.vmap(lambda i: jax.random.fold_in(masks_key, i))(jnp.arange(params.shape[0]))
    choices = choice_sequence(choice_key, probs, num_points - 1)
    return render_classes(params, choices, mask_keys, image_size=image_size, pad=pad, num_points=num_points,
                          draw_mode=draw_mode, num_chunks=num_chunks)


def choices_from_uniforms(uniforms: jax.Array, probs: jax.Array) -> jax.Array:
    """Map choices as the FractalDB code picks them: step t takes the first map j whose cumulative probability
    is ≥ u_t. uniforms (T − 1,), probs (N,) → (T − 1,) int32; maps of probability 0 are never picked (a u_t above
    a cumulative sum that rounding left under 1 takes the last map of non-zero probability)."""
    cdf = jnp.cumsum(probs)
    last = jnp.max(jnp.where(probs > 0, jnp.arange(probs.shape[-1]), 0))
    return jnp.minimum(jnp.sum(uniforms[:, None] > cdf[None, :-1], axis=-1, dtype=jnp.int32), last)


def fill_rate(images: jax.Array) -> jax.Array:
    """Fraction of pixels above 1 per image (the public code's validity measure)."""
    return jnp.mean(images > 1, axis=(-2, -1))
