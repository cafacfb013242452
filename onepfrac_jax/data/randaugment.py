"""RandAugment (timm's `rand-m9-mstd0.5-inc1` family) and colour jitter, on one image in the device's memory.

Images here are float32 (H, W, 3) arrays holding whole numbers in [0, 255]: every op rounds and clips as
Pillow does on uint8 images, so results follow timm's PIL pipeline to within one grey level (Pillow uses
fixed-point coefficients and double precision where this module uses float32). A grey image may come as one
channel (H, W, 1): every op here maps an RGB image with R = G = B to one with R = G = B, channel by channel the
same numbers, so the one channel is exactly any channel of the RGB result — as long as the warps' fill colour is
grey too (`grey_fill`), which is on the caller to check.

Why the ops are not fifteen whole-image branches of one `lax.switch`: under `vmap` a switch with a per-example
index runs every branch on every image. Every op in timm's set is one of three image-sized primitives:
  - a per-channel lookup table (AutoContrast, Equalize, Invert, Posterize, Solarize, SolarizeAdd, Contrast,
    Brightness — Contrast and Brightness blend with a constant image, so they are tables too),
  - a blend `out = D + f·(x − D)` with a degenerate image D (Color: the grey image; Sharpness: 3×3 smoothed),
  - an affine warp with Pillow's sampling and a fill colour (Rotate, ShearX/Y, TranslateX/YRel).
So the `lax.switch` branches compute only the op's parameters (a 3×256 table, a blend kind and factor, six
affine coefficients), and the image then goes once through the table, the blend and the warp, each an
identity for the ops that do not use it. Written in plain JAX (no dm-pix) because Pillow's exact rounding,
its a = −1 bicubic for affine warps and timm's level functions are not what image libraries implement.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtri

from onepfrac_jax.config import ConfigError

# timm's _RAND_TRANSFORMS and _RAND_INCREASING_TRANSFORMS, in timm's order (the op index is the list index).
OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
OPS_INCREASING = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)

_LEVEL_DENOM = 10.0  # timm: magnitude M maps to the fraction M / 10 of each op's range
_TRANSLATE_PCT = 0.45  # timm's default translate_pct for TranslateXRel / TranslateYRel
_BLEND_NONE, _BLEND_GREY, _BLEND_SMOOTH = 0, 1, 2
_IDENTITY_AFFINE = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


@dataclasses.dataclass(frozen=True)
class RandAugmentSpec:
    """A parsed `rand-...` string; field names follow timm's."""

    magnitude: float = 10.0  # `m`: mean magnitude, 0..10 (timm's default 10)
    num_layers: int = 2  # `n`: ops drawn (with replacement) per image
    magnitude_std: float = 0.0  # `mstd`: per-application magnitude ~ N(m, std); inf (mstd > 100): U(0, m)
    magnitude_max: float = 10.0  # `mmax`: the sampled magnitude is clipped to [0, mmax]
    increasing: bool = False  # `inc1`: the increasing-severity op variants
    prob: float = 0.5  # each drawn op is applied with this probability (timm: 0.5)

    @property
    def op_names(self) -> tuple[str, ...]:
        """timm's names of the ops, by op index."""
        return OPS_INCREASING if self.increasing else OPS


def parse_rand_augment(spec: str) -> RandAugmentSpec:
    """Parses timm's `rand-m9-n2-mstd0.5-mmax10-inc1` syntax; raises ConfigError on what timm would not run.

    Differences from timm, both deliberate: `inc0` means off (timm's `bool('0')` turns it on), and the `w`
    (weighted op choice) section is refused rather than ignored.
    """
    sections = spec.split("-")
    if sections[0] != "rand":
        raise ConfigError(f"auto_augment={spec!r}: only RandAugment strings ('rand-...') are supported")
    fields: dict[str, float | int | bool] = {}
    for section in sections[1:]:
        match = re.fullmatch(r"([a-z]+)(\d.*)", section)
        if match is None:
            raise ConfigError(f"auto_augment={spec!r}: section {section!r} is not <key><number>")
        key, value = match.groups()
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"auto_augment={spec!r}: {value!r} in {section!r} is not a number") from None
        if key == "m":
            fields["magnitude"] = number
        elif key == "n":
            fields["num_layers"] = int(number)
        elif key == "mstd":
            fields["magnitude_std"] = math.inf if number > 100 else number
        elif key == "mmax":
            fields["magnitude_max"] = number
        elif key == "inc":
            fields["increasing"] = number != 0
        else:
            raise ConfigError(f"auto_augment={spec!r}: unknown section {section!r} (known: m n mstd mmax inc)")
    parsed = RandAugmentSpec(**fields)  # type: ignore[arg-type]
    if parsed.num_layers < 1:
        raise ConfigError(f"auto_augment={spec!r}: n must be >= 1")
    if parsed.magnitude < 0 or parsed.magnitude_std < 0 or parsed.magnitude_max <= 0:
        raise ConfigError(f"auto_augment={spec!r}: m and mstd must be >= 0 and mmax > 0")
    return parsed


class _OpParams(NamedTuple):
    """One op as (table, blend, warp); identities where the op does not use a part."""

    lut: jax.Array  # (3, 256) float32: output grey level per input level and channel (a grey image reads row 0)
    blend: jax.Array  # int32 scalar: which degenerate image D to blend with (none, grey, smoothed)
    factor: jax.Array  # float32 scalar: out = D + factor · (x − D)
    affine: jax.Array  # (6,) Pillow AFFINE data: the output pixel centre (X, Y) samples (aX+bY+c, dX+eY+f)


class _Stats(NamedTuple):
    hist: jax.Array  # (3, 256) int32 per-channel histogram (a grey image's one row, repeated)
    grey_mean: jax.Array  # int32: Pillow's int(mean(L) + 0.5), the Contrast op's constant image
    height: int
    width: int


def _levels() -> jax.Array:
    return jnp.broadcast_to(jnp.arange(256, dtype=jnp.float32), (3, 256))


def _params(
    lut: jax.Array | None = None,
    blend: int = _BLEND_NONE,
    factor: jax.Array | float = 1.0,
    affine: jax.Array | tuple[float, ...] = _IDENTITY_AFFINE,
) -> _OpParams:
    return _OpParams(
        lut=_levels() if lut is None else lut.astype(jnp.float32),
        blend=jnp.int32(blend),
        factor=jnp.asarray(factor, jnp.float32),
        affine=jnp.asarray(affine, jnp.float32),
    )


def _blend_lut(constant: jax.Array | float, factor: jax.Array) -> jax.Array:
    """Pillow's Image.blend with a constant image as a table: trunc(clip(c + f·(i − c)))."""
    c = jnp.asarray(constant, jnp.float32)
    return jnp.floor(jnp.clip(c + factor * (_levels() - c), 0.0, 255.0))


# Level functions: timm's *_level_to_arg; `m` is the clipped magnitude, `sign` ±1 (timm's _randomly_negate).
# Integer-valued levels are computed as floor(m · k / 10) so that whole magnitudes give timm's exact integers.


def _auto_contrast(m: jax.Array, sign: jax.Array, s: _Stats) -> _OpParams:
    del m, sign
    present = s.hist > 0
    lo = jnp.argmax(present, axis=1)[:, None]
    hi = 255 - jnp.argmax(present[:, ::-1], axis=1)[:, None]
    i = jnp.arange(256)[None, :]
    stretched = jnp.clip((i - lo) * 255 // jnp.maximum(hi - lo, 1), 0, 255)
    return _params(lut=jnp.where(hi > lo, stretched, i))


def _equalize(m: jax.Array, sign: jax.Array, s: _Stats) -> _OpParams:
    """Pillow's ImageOps.equalize per channel, in its integer arithmetic."""
    del m, sign
    hist = s.hist
    nonzero = jnp.sum(hist > 0, axis=1, keepdims=True)
    last = 255 - jnp.argmax(hist[:, ::-1] > 0, axis=1)
    last_count = jnp.take_along_axis(hist, last[:, None], axis=1)
    step = (s.height * s.width - last_count) // 255
    below = jnp.cumsum(hist, axis=1) - hist
    equalized = jnp.clip((step // 2 + below) // jnp.maximum(step, 1), 0, 255)
    return _params(lut=jnp.where((nonzero > 1) & (step > 0), equalized, jnp.arange(256)[None, :]))


def _invert(m: jax.Array, sign: jax.Array, s: _Stats) -> _OpParams:
    del m, sign, s
    return _params(lut=255.0 - _levels())


def _rotate(m: jax.Array, sign: jax.Array, s: _Stats) -> _OpParams:
    """Image.rotate(deg) about the image centre, counter-clockwise; deg = ±30·m/10."""
    theta = -jnp.deg2rad(sign * m * 30.0 / _LEVEL_DENOM)
    a, b = jnp.cos(theta), jnp.sin(theta)
    cx, cy = s.width / 2.0, s.height / 2.0
    return _params(affine=jnp.stack([a, b, cx - a * cx - b * cy, -b, a, cy + b * cx - a * cy]))


def _posterize_bits(m: jax.Array, increasing: bool) -> jax.Array:
    bits = jnp.floor(m * 4.0 / _LEVEL_DENOM).astype(jnp.int32)
    return 4 - bits if increasing else bits


def _posterize(bits: jax.Array) -> _OpParams:
    mask = 256 - jnp.left_shift(1, 8 - bits)
    return _params(lut=jnp.bitwise_and(jnp.arange(256), mask)[None, :].repeat(3, axis=0))


def _solarize(threshold: jax.Array) -> _OpParams:
    i = _levels()
    return _params(lut=jnp.where(i < threshold, i, 255.0 - i))


def _solarize_add(m: jax.Array, sign: jax.Array, s: _Stats) -> _OpParams:
    del sign, s
    add = jnp.floor(m * 110.0 / _LEVEL_DENOM)
    i = _levels()
    return _params(lut=jnp.where(i < 128, jnp.minimum(255.0, i + add), i))


def _enhance_factor(m: jax.Array, sign: jax.Array, increasing: bool) -> jax.Array:
    if increasing:  # the 'no change' factor 1 moves towards 0.1 or 1.9 as m grows
        return jnp.maximum(0.1, 1.0 + sign * m * 0.9 / _LEVEL_DENOM)
    return m * 1.8 / _LEVEL_DENOM + 0.1


def _shear(m: jax.Array, sign: jax.Array) -> jax.Array:
    return sign * m * 0.3 / _LEVEL_DENOM


def _translate_pct(m: jax.Array, sign: jax.Array) -> jax.Array:
    return sign * m * _TRANSLATE_PCT / _LEVEL_DENOM


def _branches(increasing: bool) -> tuple:
    """The fifteen parameter builders, index-aligned with OPS / OPS_INCREASING."""

    def posterize(m, sign, s):
        return _posterize(_posterize_bits(m, increasing))

    def solarize(m, sign, s):
        threshold = jnp.floor(m * 256.0 / _LEVEL_DENOM)
        return _solarize(256.0 - threshold if increasing else threshold)

    def color(m, sign, s):
        return _params(blend=_BLEND_GREY, factor=_enhance_factor(m, sign, increasing))

    def contrast(m, sign, s):
        return _params(lut=_blend_lut(s.grey_mean, _enhance_factor(m, sign, increasing)))

    def brightness(m, sign, s):
        return _params(lut=_blend_lut(0.0, _enhance_factor(m, sign, increasing)))

    def sharpness(m, sign, s):
        return _params(blend=_BLEND_SMOOTH, factor=_enhance_factor(m, sign, increasing))

    def shear_x(m, sign, s):
        return _params(affine=jnp.stack([1.0, _shear(m, sign), 0.0, 0.0, 1.0, 0.0]))

    def shear_y(m, sign, s):
        return _params(affine=jnp.stack([1.0, 0.0, 0.0, _shear(m, sign), 1.0, 0.0]))

    def translate_x(m, sign, s):
        return _params(affine=jnp.stack([1.0, 0.0, _translate_pct(m, sign) * s.width, 0.0, 1.0, 0.0]))

    def translate_y(m, sign, s):
        return _params(affine=jnp.stack([1.0, 0.0, 0.0, 0.0, 1.0, _translate_pct(m, sign) * s.height]))

    return (
        _auto_contrast,
        _equalize,
        _invert,
        _rotate,
        posterize,
        solarize,
        _solarize_add,
        color,
        contrast,
        brightness,
        sharpness,
        shear_x,
        shear_y,
        translate_x,
        translate_y,
    )


def _grey(x: jax.Array) -> jax.Array:
    """Pillow's RGB → L conversion, (19595 R + 38470 G + 7471 B + 2¹⁵) >> 16, exact in int32; on a one-channel
    image (R = G = B) that is the level itself, since 19595 + 38470 + 7471 = 2¹⁶."""
    if x.shape[-1] == 1:
        return x[..., 0].astype(jnp.int32)
    rgb = x.astype(jnp.int32)
    return (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16


def _stats(x: jax.Array, with_hist: bool) -> _Stats:
    height, width, _ = x.shape
    grey_sum = jnp.sum(_grey(x))
    # int(mean + 0.5) with an integer sum: floor((2·sum + n) / 2n), no float rounding.
    grey_mean = (2 * grey_sum + height * width) // (2 * height * width)
    if with_hist:
        # Channel c's level v counts in bin 256·c + v: a scatter with 1-D indices runs twice as fast on CPU.
        channels = x.shape[-1]
        bins = (x.astype(jnp.int32) + 256 * jnp.arange(channels)).reshape(-1)
        hist = jnp.zeros(channels * 256, jnp.int32).at[bins].add(1).reshape(channels, 256)
        hist = jnp.broadcast_to(hist, (3, 256))
    else:
        hist = jnp.zeros((3, 256), jnp.int32)
    return _Stats(hist=hist, grey_mean=grey_mean, height=height, width=width)


def _smooth(x: jax.Array) -> jax.Array:
    """Pillow's ImageFilter.SMOOTH (3×3 kernel 1,1,1 / 1,5,1 / 1,1,1 over 13), borders copied, rounded."""
    padded = jnp.pad(x, ((1, 1), (1, 1), (0, 0)))
    height, width, _ = x.shape
    total = sum(padded[dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3))
    inner = jnp.floor((total + 4.0 * x) / 13.0 + 0.5)
    rows = jnp.arange(height)[:, None, None]
    cols = jnp.arange(width)[None, :, None]
    border = (rows == 0) | (rows == height - 1) | (cols == 0) | (cols == width - 1)
    return jnp.where(border, x, inner)


def _cubic_weights(d: jax.Array) -> jax.Array:
    """Pillow's affine-transform bicubic (a = −1) weights for the taps at offsets −1, 0, 1, 2."""
    d2, d3 = d * d, d * d * d
    return jnp.stack([-d + 2 * d2 - d3, 1 - 2 * d2 + d3, d + d2 - d3, -d2 + d3], axis=-1)


def affine_warp(x: jax.Array, affine: jax.Array, fill: jax.Array, interpolation: str) -> jax.Array:
    """Pillow's Image.transform(AFFINE, resample, fillcolor) on one (H, W, C) image.

    Output pixel (x, y) samples the input at (u, v) = (a·X + b·Y + c, d·X + e·Y + f), X = x + ½, Y = y + ½.
    Samples with u ∉ [0, W) or v ∉ [0, H) take `fill`; others interpolate with edge-clamped taps and are
    truncated to whole levels, as Pillow casts to uint8.
    """
    height, width, _ = x.shape
    a, b, c, d, e, f = (affine[k] for k in range(6))
    px = jnp.arange(width, dtype=jnp.float32)[None, :] + 0.5
    py = jnp.arange(height, dtype=jnp.float32)[:, None] + 0.5
    u = a * px + b * py + c
    v = d * px + e * py + f
    inside = (u >= 0) & (u < width) & (v >= 0) & (v < height)
    u0 = jnp.floor(u - 0.5)
    v0 = jnp.floor(v - 0.5)
    du, dv = u - 0.5 - u0, v - 0.5 - v0
    if interpolation == "bicubic":
        first, wu, wv = -1, _cubic_weights(du), _cubic_weights(dv)
    else:
        first, wu, wv = 0, jnp.stack([1 - du, du], axis=-1), jnp.stack([1 - dv, dv], axis=-1)
    u0, v0 = u0.astype(jnp.int32) + first, v0.astype(jnp.int32) + first
    # One gather per tap, weighted and summed as it goes: XLA fuses these, where gathering all taps into
    # an (H, W, T, T, C) array first costs twice the time in memory traffic.
    value = 0.0
    for i in range(wv.shape[-1]):
        rows = jnp.clip(v0 + i, 0, height - 1)
        row_value = 0.0
        for j in range(wu.shape[-1]):
            row_value = row_value + wu[..., j, None] * x[rows, jnp.clip(u0 + j, 0, width - 1)]
        value = value + wv[..., i, None] * row_value
    value = jnp.floor(jnp.clip(value, 0.0, 255.0))
    return jnp.where(inside[..., None], value, fill)


def _apply(x: jax.Array, p: _OpParams, *, fill: jax.Array, interpolation: str, smooth: bool, warp: bool) -> jax.Array:
    """Table, then blend, then warp; `smooth`/`warp` False drop parts no drawable op uses (static)."""
    channels = x.shape[-1]
    x = p.lut[:channels].reshape(-1)[x.astype(jnp.int32) + 256 * jnp.arange(channels)]
    degenerate = _grey(x)[..., None].astype(jnp.float32)
    if smooth:
        degenerate = jnp.where(p.blend == _BLEND_SMOOTH, _smooth(x), degenerate)
    blended = jnp.floor(jnp.clip(degenerate + p.factor * (x - degenerate), 0.0, 255.0))
    x = jnp.where(p.blend == _BLEND_NONE, x, blended)
    if warp:
        x = affine_warp(x, p.affine, fill[:channels], interpolation)
    return x


def grey_fill(fill: tuple[int, ...]) -> bool:
    """Whether a fill colour keeps a grey image grey (all its channels equal)."""
    return len(set(fill)) == 1


def _fill_value(x: jax.Array, fill: tuple[int, ...]) -> jax.Array:
    if x.shape[-1] == 1 and not grey_fill(fill):
        raise ValueError(f"a one-channel image needs a grey fill colour, got {fill}: expand it to RGB first")
    return jnp.asarray(fill, jnp.float32)


def apply_op(
    x: jax.Array,
    op: jax.Array | int,
    magnitude: jax.Array | float,
    sign: jax.Array | float = 1.0,
    *,
    increasing: bool = True,
    fill: tuple[int, int, int] = (128, 128, 128),
    interpolation: str = "bicubic",
) -> jax.Array:
    """Applies RandAugment op `op` (an index into OPS / OPS_INCREASING) at a fixed magnitude and sign."""
    p = jax.lax.switch(
        jnp.asarray(op, jnp.int32),
        _branches(increasing),
        jnp.asarray(magnitude, jnp.float32),
        jnp.asarray(sign, jnp.float32),
        _stats(x, with_hist=True),
    )
    return _apply(x, p, fill=_fill_value(x, fill), interpolation=interpolation, smooth=True, warp=True)


def rand_augment(
    x: jax.Array, u: jax.Array, spec: RandAugmentSpec, *, fill: tuple[int, int, int], interpolation: str
) -> jax.Array:
    """timm's RandAugment on one image: `num_layers` ops drawn with replacement, each applied w.p. `prob`.

    `u` holds uniform draws in [0, 1), at least 4 per layer: op, apply, magnitude, sign.
    """
    branches = _branches(spec.increasing)
    fill_value = _fill_value(x, fill)

    def layer(x: jax.Array, u_layer: jax.Array) -> tuple[jax.Array, None]:
        u_op, u_apply, u_magnitude, u_sign = u_layer
        op = jnp.minimum(jnp.floor(u_op * len(branches)).astype(jnp.int32), len(branches) - 1)
        magnitude = jnp.float32(spec.magnitude)
        if spec.magnitude_std == math.inf:
            magnitude = u_magnitude * spec.magnitude
        elif spec.magnitude_std > 0:
            magnitude = magnitude + spec.magnitude_std * ndtri(u_magnitude)
        magnitude = jnp.clip(magnitude, 0.0, spec.magnitude_max)
        sign = jnp.where(u_sign < 0.5, -1.0, 1.0)
        p = jax.lax.switch(op, branches, magnitude, sign, _stats(x, with_hist=True))
        out = _apply(x, p, fill=fill_value, interpolation=interpolation, smooth=True, warp=True)
        return jnp.where(u_apply < spec.prob, out, x), None

    # A scan compiles the layer once, whatever num_layers is (the layer is most of the compile time).
    return jax.lax.scan(layer, x, u[: 4 * spec.num_layers].reshape(spec.num_layers, 4))[0]


def color_jitter(x: jax.Array, u: jax.Array, strength: tuple[float, float, float]) -> jax.Array:
    """torchvision ColorJitter(b, c, s) on a PIL image: factors ~ U(max(0, 1 − s), 1 + s), random order.

    `u` holds at least 6 uniform draws in [0, 1): three factors, then three sort keys for the order.
    """
    low = jnp.asarray([max(0.0, 1.0 - s) for s in strength], jnp.float32)
    factors = low + u[:3] * (1.0 + jnp.asarray(strength, jnp.float32) - low)
    order = jnp.argsort(u[3:6])  # the ranks of iid uniforms: a uniformly random permutation
    branches = (
        lambda f, s: _params(lut=_blend_lut(0.0, f)),  # brightness
        lambda f, s: _params(lut=_blend_lut(s.grey_mean, f)),  # contrast
        lambda f, s: _params(blend=_BLEND_GREY, factor=f),  # saturation (ImageEnhance.Color)
    )
    no_fill = jnp.zeros(3, jnp.float32)
    for step in range(3):
        p = jax.lax.switch(order[step], branches, factors[order[step]], _stats(x, with_hist=False))
        x = _apply(x, p, fill=no_fill, interpolation="bilinear", smooth=False, warp=False)
    return x
