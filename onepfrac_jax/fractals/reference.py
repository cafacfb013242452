"""A plain reference renderer: the public 1p-frac generator's drawing, one point at a time (SPEC §A3).

A sequential float64 chain in Python, the public normalisation (NumPy) and Pillow's `Image.paste` of each point's
3×3 patch without a mask, in chain order. It is slow on purpose — nothing is vectorised that the public code does
point by point — and serves as the ground truth the tests compare `render` with and the baseline of the benchmark.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

VALUE = 127
# The public code drops the 100 points before the first NaN too.
DROPPED_BEFORE_NAN = 100


def chain(params: np.ndarray, probs: np.ndarray, num_points: int, rng: np.random.Generator) -> np.ndarray:
    """The chaos game from (0, 0): (num_points, 2) float64, the origin first; step i takes the first map j with
    u_i ≤ p_0 + … + p_j, u_i ~ U(0, 1), as the public code does."""
    thresholds = np.cumsum(probs).tolist()
    maps = [tuple(float(v) for v in row) for row in params]
    points = np.empty((num_points, 2))
    x = y = 0.0
    points[0] = x, y
    for t, u in enumerate(rng.random(num_points - 1).tolist(), start=1):
        j = next((j for j, edge in enumerate(thresholds) if u <= edge), len(maps) - 1)
        a, b, c, d, e, f = maps[j]
        x, y = a * x + b * y + e, c * x + d * y + f
        points[t] = x, y
    return points


def pixel_coordinates(points: np.ndarray, image_size: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """The public rescale: NaN rows and the 100 before the first dropped; shift a negative minimum to 0;
    uint16(v / (max − min) · (W − 2·pad) + pad). Returns (x, y) pixel coordinates before the vertical flip."""
    points = np.asarray(points, np.float64).copy()
    nan = np.flatnonzero(np.isnan(points).any(axis=1))
    if len(nan):
        points = points[: max(nan[0] - DROPPED_BEFORE_NAN, 0)]
    for axis in range(2):
        if points[:, axis].min() < 0:
            points[:, axis] -= points[:, axis].min()
    span = points.max(axis=0) - points.min(axis=0)
    pixels = np.uint16(points / span * float(image_size - 2 * pad) + float(pad))
    return pixels[:, 0], pixels[:, 1]


def draw(xs: np.ndarray, ys: np.ndarray, masks: np.ndarray | None, image_size: int) -> np.ndarray:
    """Pastes each point's patch (top-left at (x + 1, y + 1), cell (i, j) on iff bit 3i + j of its mask) without a
    mask, in order, or with `masks` None sets pixel (x, y); then flips vertically. (S, S) uint8."""
    if masks is None:
        image = np.zeros((image_size, image_size), np.uint8)
        image[ys, xs] = VALUE
        return np.flipud(image)
    canvas = Image.new("L", (image_size, image_size))
    patches = [Image.fromarray(((m >> np.arange(9)) & 1).reshape(3, 3).astype(np.uint8) * VALUE) for m in range(512)]
    for x, y, mask in zip(xs.tolist(), ys.tolist(), np.asarray(masks).tolist(), strict=True):
        canvas.paste(patches[mask], (x + 1, y + 1))
    return np.flipud(np.asarray(canvas))


def render(params: np.ndarray, probs: np.ndarray, image_size: int, pad: int, num_points: int, draw_mode: str,
           rng: np.random.Generator) -> np.ndarray:
    """One class end to end: its own chain and, in patch mode, fresh masks uniform over 1..511 from `rng`."""
    xs, ys = pixel_coordinates(chain(params, probs, num_points, rng), image_size, pad)
    masks = rng.integers(1, 512, size=len(xs)) if draw_mode == "patch" else None
    return draw(xs, ys, masks, image_size)
