"""Every random augmentation, on the device: one module for pre-training, fine-tuning and bootstrapping.

`augment_batch` takes a uint8 batch (B, H, W, 3), or a grey one (B, H, W), with int labels, possibly sharded over
the mesh's `data` axis, and returns normalised images (B, S, S, 3) and soft targets (B, num_classes), inside
`jax.jit`. The order is timm's `create_transform(is_training=True)` followed by timm's `Mixup` on the normalised
batch (what 1p-frac's training code runs: no prefetcher, so erasing comes before mixing):

    crop + resize → hflip → vflip → RandAugment → colour jitter → /255, −mean, /std → random erasing
    → [whole batch] mixup / cutmix + label smoothing

Up to erasing, each step works on whole grey levels in [0, 255] and rounds as Pillow does on uint8 images.

A grey batch (the fractal banks) is augmented on ONE channel for as long as that is exact — the result is then
bit for bit the RGB batch `repeat(grey, 3)`'s (tests/test_augment.py) at a third of the pixel work: crop + resize,
flips, RandAugment and colour jitter all map R = G = B to R = G = B channel by channel, so the channel becomes RGB
where the first op can make channels differ: normalisation (a per-channel mean and std), erasing (per-channel
noise), or RandAugment already when its warps' fill colour (round(255 · mean)) is not grey.

Keying: with `key` the step's key (`fold_in(seed_key, step)`, a key used for nothing else),
`example_key, batch_key = split(key)`; example i's draws come from `fold_in(example_key, indices[i])`,
`indices` being global example indices, so an example's augmentation does not depend on where it sits in
the batch or how the batch is split over devices. The batch's own draws (whether to mix, mixup or cutmix,
λ, the cutmix box) come from `batch_key`.

A departure from the reference, on purpose: mixup pairs example i with B−1−i of the GLOBAL batch and draws
one λ per global batch (timm mixes each process's batch on its own). Kept from timm although surprising:
colour jitter is skipped while RandAugment is on, unless `force_color_jitter`.

Written in plain JAX: resampling weights are built per example as dense (S × H) matrices, because the crop
box is drawn on the device and differs per example, which jax.image's static-shape resize cannot express.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.scipy.special import erfinv
from jax.typing import DTypeLike

from onepfrac_jax.config import require, require_choice
from onepfrac_jax.data.randaugment import (
    RandAugmentSpec,
    color_jitter,
    grey_fill,
    parse_rand_augment,
    rand_augment,
)

CROPS = ("rrc", "resize", "pad_crop")
INTERPOLATIONS = ("bicubic", "bilinear")
_RETRIES = 10  # torchvision's RandomResizedCrop and timm's RandomErasing try 10 boxes before giving up
_ERASE_AREA = (0.02, 1.0 / 3.0)  # timm RandomErasing's min_area, max_area
_ERASE_LOG_ASPECT = (math.log(0.3), math.log(1.0 / 0.3))  # timm: min_aspect 0.3, max_aspect 1 / 0.3
# Each example makes ONE uniform draw: a (steps × _BLOCK) block, step s reading row s (rows longer for
# RandAugment with n > 5), followed by the erasing noise. One draw rather than one per step (and the noise
# by inverse CDF rather than a second draw) because every threefry call is a sizeable piece of compiled code:
# on CPU the key handling dominated compile time.
_CROP, _FLIP, _RAND_AUGMENT, _JITTER, _ERASE = range(5)
_BLOCK = 2 * _RETRIES + 3  # the largest step: RRC and erasing use 10 + 10 tries and 2 offsets (+1 apply)


def default_augment_config() -> ml_collections.ConfigDict:
    """The `augment` config section with neutral values: a plain resize to 224 and normalisation."""
    c = ml_collections.ConfigDict()
    c.size = 224  # output side S; images come out S × S
    c.crop = "resize"  # 'rrc': RandomResizedCrop; 'resize': whole image to S × S; 'pad_crop': see `pad`
    c.scale = (0.08, 1.0)  # rrc: range of the crop's area as a fraction of the image's
    c.ratio = (3.0 / 4.0, 4.0 / 3.0)  # rrc: range of the crop's width / height, sampled log-uniformly
    c.pad = 4  # pad_crop: zero padding on every side before cropping back to the input size
    c.interpolation = "bilinear"  # 'bicubic' | 'bilinear': crop/resize, RandAugment's warps, the eval resize
    c.hflip = 0.0  # probability of a horizontal flip
    c.vflip = 0.0  # probability of a vertical flip
    c.auto_augment = ""  # '' (off) or a timm RandAugment string, e.g. 'rand-m9-mstd0.5-inc1'
    c.color_jitter = 0.0  # brightness = contrast = saturation strength (timm's 0.4); 0 is off
    c.force_color_jitter = False  # apply colour jitter even with RandAugment on (timm skips it then)
    c.re_prob = 0.0  # random erasing probability per image (pixel mode: per-pixel N(0, 1), one box)
    c.mixup_alpha = 0.0  # mixup λ ~ Beta(α, α); 0 is off
    c.cutmix_alpha = 0.0  # cutmix λ ~ Beta(α, α); 0 is off
    c.mixup_prob = 1.0  # probability that a batch is mixed at all (when an alpha is > 0)
    c.switch_prob = 0.5  # with both alphas > 0: probability of cutmix rather than mixup
    c.label_smoothing = 0.0  # soft targets: off = ε / classes, on = 1 − ε + off (also without mixup)
    c.mean = (0.5, 0.5, 0.5)  # per-channel mean, on the [0, 1] scale (1p-frac: 0.5)
    c.std = (0.5, 0.5, 0.5)  # per-channel std, on the [0, 1] scale (1p-frac: 0.5)
    c.crop_pct = 1.0  # eval: resize the short side to floor(S / crop_pct), then centre-crop S × S
    return c


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """The validated `augment` section; hashable, so jitted functions can close over it."""

    size: int
    crop: str
    scale: tuple[float, float]
    ratio: tuple[float, float]
    pad: int
    interpolation: str
    hflip: float
    vflip: float
    rand_augment: RandAugmentSpec | None
    color_jitter: tuple[float, float, float] | None  # None: off, or skipped because RandAugment is on
    re_prob: float
    mixup_alpha: float
    cutmix_alpha: float
    mixup_prob: float
    switch_prob: float
    label_smoothing: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float

    @property
    def fill(self) -> tuple[int, int, int]:
        """RandAugment's fill colour: timm's img_mean = round(255 · mean)."""
        return tuple(min(255, round(255 * m)) for m in self.mean)  # type: ignore[return-value]

    @property
    def mixes(self) -> bool:
        """Whether any batch can be mixed (mixup or cutmix)."""
        return self.mixup_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


def _pair(section: ml_collections.ConfigDict, name: str, prefix: str) -> tuple[float, float]:
    value = tuple(float(v) for v in section[name])
    require(len(value) == 2, f"{prefix}.{name}={section[name]} must be a pair (low, high)")
    require(0 < value[0] <= value[1], f"{prefix}.{name}={value} must satisfy 0 < low <= high")
    return value  # type: ignore[return-value]


def _triple(section: ml_collections.ConfigDict, name: str, prefix: str) -> tuple[float, float, float]:
    value = tuple(float(v) for v in section[name])
    require(len(value) == 3, f"{prefix}.{name}={section[name]} must have 3 values (R, G, B)")
    return value  # type: ignore[return-value]


def _probability(section: ml_collections.ConfigDict, name: str, prefix: str) -> float:
    value = float(section[name])
    require(0.0 <= value <= 1.0, f"{prefix}.{name}={value} must be a probability in [0, 1]")
    return value


def augment_config(section: ml_collections.ConfigDict, prefix: str = "augment") -> AugmentConfig:
    """Validates an `augment` section (default_augment_config's keys); ConfigError names the bad field."""
    known = set(default_augment_config().keys())
    unknown = sorted(set(section.keys()) - known)
    require(not unknown, f"unknown {prefix} key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    missing = sorted(known - set(section.keys()))
    require(not missing, f"{prefix} is missing key(s) {', '.join(missing)}")
    p = prefix
    require(
        int(section.size) == section.size and section.size >= 8,
        f"{p}.size={section.size} must be an int >= 8",
    )
    require_choice(f"{p}.crop", section.crop, CROPS)
    require_choice(f"{p}.interpolation", section.interpolation, INTERPOLATIONS)
    require(int(section.pad) == section.pad and section.pad >= 0, f"{p}.pad={section.pad} must be an int >= 0")
    scale = _pair(section, "scale", p)
    require(scale[1] <= 1.0, f"{p}.scale={scale} must lie in (0, 1]")
    spec = None
    if section.auto_augment:
        spec = parse_rand_augment(str(section.auto_augment))
    require(section.color_jitter >= 0, f"{p}.color_jitter={section.color_jitter} must be >= 0")
    jitter = None
    if section.color_jitter > 0 and (spec is None or section.force_color_jitter):
        jitter = (float(section.color_jitter),) * 3
    for name in ("mixup_alpha", "cutmix_alpha", "label_smoothing"):
        require(section[name] >= 0, f"{p}.{name}={section[name]} must be >= 0")
    require(section.label_smoothing < 1, f"{p}.label_smoothing={section.label_smoothing} must be < 1")
    std = _triple(section, "std", p)
    require(all(s > 0 for s in std), f"{p}.std={std} must be positive")
    require(0 < section.crop_pct <= 1, f"{p}.crop_pct={section.crop_pct} must be in (0, 1]")
    return AugmentConfig(
        size=int(section.size),
        crop=section.crop,
        scale=scale,
        ratio=_pair(section, "ratio", p),
        pad=int(section.pad),
        interpolation=section.interpolation,
        hflip=_probability(section, "hflip", p),
        vflip=_probability(section, "vflip", p),
        rand_augment=spec,
        color_jitter=jitter,
        re_prob=_probability(section, "re_prob", p),
        mixup_alpha=float(section.mixup_alpha),
        cutmix_alpha=float(section.cutmix_alpha),
        mixup_prob=_probability(section, "mixup_prob", p),
        switch_prob=_probability(section, "switch_prob", p),
        label_smoothing=float(section.label_smoothing),
        mean=_triple(section, "mean", p),
        std=std,
        crop_pct=float(section.crop_pct),
    )


# ---------------------------------------------------------------- resampling


def _kernel(d: jax.Array, interpolation: str) -> jax.Array:
    """Pillow's resize filters: bicubic with a = −0.5 (support 2), bilinear triangle (support 1)."""
    d = jnp.abs(d)
    if interpolation == "bilinear":
        return jnp.maximum(0.0, 1.0 - d)
    a = -0.5
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = (((d - 5) * d + 8) * d - 4) * a
    return jnp.where(d < 1, near, jnp.where(d < 2, far, 0.0))


def resample_matrix(
    start: jax.Array | int, length: jax.Array | int, in_size: int, out_size: int, interpolation: str
) -> jax.Array:
    """(out_size, in_size) weights resizing the window [start, start + length) of an axis to out_size, as
    Pillow's resize does on the cropped image: antialiased when shrinking, each row normalised to sum 1.

    Output pixel o is centred at start + (o + ½)·length/out_size; input pixel p gets weight
    K((p + ½ − centre) / max(1, length/out_size)) if p lies in the window, else 0.
    """
    start = jnp.asarray(start, jnp.float32)
    length = jnp.asarray(length, jnp.float32)
    scale = length / out_size
    support_scale = jnp.maximum(scale, 1.0)
    centre = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale
    p = jnp.arange(in_size, dtype=jnp.float32)
    weights = _kernel((p[None, :] + 0.5 - centre[:, None]) / support_scale, interpolation)
    weights = jnp.where((p >= start) & (p < start + length), weights, 0.0)
    return weights / jnp.sum(weights, axis=1, keepdims=True)


def _round_levels(x: jax.Array) -> jax.Array:
    """Pillow's uint8 store after a resize pass: round half up, clip to [0, 255]."""
    return jnp.clip(jnp.floor(x + 0.5), 0.0, 255.0)


def _resize(x: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """Pillow's two-pass resize of an (H, W, C) image: horizontal pass, store as uint8, vertical, store.

    The passes are float32 matmuls at HIGHEST precision, kept on purpose: each pass is rounded to whole levels, and
    at the GPUs' default TF32 (10-bit mantissa) or bfloat16 a sum of up to ~255 gives errors of 0.1–1 level that
    move results across a rounding boundary, away from Pillow's pixels. On one channel the exact passes cost a third
    of what they did on three."""
    x = _round_levels(jnp.einsum("hwc,ow->hoc", x, cols, precision=jax.lax.Precision.HIGHEST))
    return _round_levels(jnp.einsum("hoc,ph->poc", x, rows, precision=jax.lax.Precision.HIGHEST))


def _randint(u: jax.Array, low: jax.Array | int, high: jax.Array | int) -> jax.Array:
    """A uniform integer in [low, high) from a uniform u in [0, 1)."""
    span = jnp.asarray(high - low, jnp.float32)
    return low + jnp.minimum(jnp.floor(u * span), span - 1).astype(jnp.int32)


def _uniform(u: jax.Array, low: float, high: float) -> jax.Array:
    return low + u * (high - low)


def _rrc_box(u: jax.Array, height: int, width: int, cfg: AugmentConfig) -> tuple[jax.Array, ...]:
    """torchvision/timm RandomResizedCrop.get_params: 10 tries of (area, log-ratio), then a central crop."""
    area = height * width * _uniform(u[:_RETRIES], *cfg.scale)
    aspect = jnp.exp(_uniform(u[_RETRIES : 2 * _RETRIES], math.log(cfg.ratio[0]), math.log(cfg.ratio[1])))
    w = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    h = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = jnp.argmax(fits)
    # The fallback depends only on static shapes: the largest centred crop within the ratio range.
    in_ratio = width / height
    fb_w, fb_h = width, height
    if in_ratio < cfg.ratio[0]:
        fb_h = round(width / cfg.ratio[0])
    elif in_ratio > cfg.ratio[1]:
        fb_w = round(height * cfg.ratio[1])
    found = fits[first]
    h = jnp.where(found, h[first], fb_h)
    w = jnp.where(found, w[first], fb_w)
    top = jnp.where(found, _randint(u[2 * _RETRIES], 0, height - h + 1), (height - fb_h) // 2)
    left = jnp.where(found, _randint(u[2 * _RETRIES + 1], 0, width - w + 1), (width - fb_w) // 2)
    return top, left, h, w


def _crop_resize(x: jax.Array, u: jax.Array, cfg: AugmentConfig) -> jax.Array:
    """The configured crop, resized to S × S with cfg.interpolation; x holds grey levels."""
    size, method = cfg.size, cfg.interpolation
    height, width, _ = x.shape
    if cfg.crop == "resize":
        if (height, width) == (size, size):
            return x
        top, left, h, w = 0, 0, height, width
    elif cfg.crop == "pad_crop":
        # torchvision RandomCrop(input size, padding=pad): zero padding, then a uniform integer offset.
        x = jnp.pad(x, ((cfg.pad, cfg.pad), (cfg.pad, cfg.pad), (0, 0)))
        top = _randint(u[0], 0, 2 * cfg.pad + 1)
        left = _randint(u[1], 0, 2 * cfg.pad + 1)
        h, w = height, width
        height, width = height + 2 * cfg.pad, width + 2 * cfg.pad
    else:
        top, left, h, w = _rrc_box(u, height, width, cfg)
    rows = resample_matrix(top, h, height, size, method)
    cols = resample_matrix(left, w, width, size, method)
    return _resize(x, rows, cols)


def _flips(x: jax.Array, u: jax.Array, cfg: AugmentConfig) -> jax.Array:
    if cfg.hflip > 0:
        x = jnp.where(u[0] < cfg.hflip, x[:, ::-1], x)
    if cfg.vflip > 0:
        x = jnp.where(u[1] < cfg.vflip, x[::-1], x)
    return x


def _normalise(x: jax.Array, cfg: AugmentConfig) -> jax.Array:
    """torchvision ToTensor + Normalize: x / 255, − mean, / std."""
    return (x / 255.0 - jnp.asarray(cfg.mean, jnp.float32)) / jnp.asarray(cfg.std, jnp.float32)


def erase_capacity(size: int) -> int:
    """An upper bound on the pixels of an erasing box in an S × S image: what the box's noise needs per channel.

    The box has h = round(√(A·r)), w = round(√(A/r)) with A ≤ S²/3 and h, w < S, so
    h·w ≤ A + (√(A·r) + √(A/r))/2 + 1/4 ≤ S²/3 + (S + S/3)/2 + 1/4 < S²/3 + S + 1 (√(A·r)·√(A/r) = A ≤ S²/3 and
    both are below S + ½: their sum is at most S + ½ + A/S).
    """
    return size * size // 3 + size + 1


def _erase(x: jax.Array, u: jax.Array, noise: jax.Array, p: float) -> jax.Array:
    """timm RandomErasing(p, mode='pixel', count 1) on a normalised image: one box of N(0, 1) noise.

    `noise` (3, erase_capacity(S)) holds the box's values as timm draws them, a (3, h, w) tensor in row-major
    order: pixel (top + r, left + c) of channel k takes noise[k, r·w + c]. Only a box's worth is drawn (at most
    about a third of the image), not an image's.
    """
    height, width, _ = x.shape
    area = height * width * _uniform(u[1 : 1 + _RETRIES], *_ERASE_AREA)
    aspect = jnp.exp(_uniform(u[1 + _RETRIES : 1 + 2 * _RETRIES], *_ERASE_LOG_ASPECT))
    h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    fits = (w < width) & (h < height)
    first = jnp.argmax(fits)
    h, w = h[first], w[first]
    top = _randint(u[1 + 2 * _RETRIES], 0, height - h + 1)
    left = _randint(u[2 + 2 * _RETRIES], 0, width - w + 1)
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    box = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    erase = box & fits[first] & (u[0] < p)
    position = jnp.where(box, (rows - top) * w + (cols - left), 0)
    values = jnp.moveaxis(noise[:, position], 0, -1)
    return jnp.where(erase[..., None], values.astype(x.dtype), x)


def _rgb(x: jax.Array) -> jax.Array:
    """An (…, C) image as RGB: a grey channel repeated, RGB unchanged."""
    return jnp.broadcast_to(x, (*x.shape[:-1], 3))


def _augment_example(image: jax.Array, key: jax.Array, cfg: AugmentConfig) -> jax.Array:
    """One uint8 (H, W, 3) or grey (H, W, 1) image → normalised float32 (S, S, 3), everything before mixing;
    a grey image stays one channel until an op could make channels differ (see the module docstring)."""
    layers = cfg.rand_augment.num_layers if cfg.rand_augment is not None else 0
    block = max(_BLOCK, 4 * layers)
    noise_size = 3 * erase_capacity(cfg.size) if cfg.re_prob > 0 else 0
    draws = jax.random.uniform(key, (5 * block + noise_size,))
    u = draws[: 5 * block].reshape(5, block)
    x = _crop_resize(image.astype(jnp.float32), u[_CROP], cfg)
    x = _flips(x, u[_FLIP], cfg)
    if cfg.rand_augment is not None:
        if not grey_fill(cfg.fill):
            x = _rgb(x)
        x = rand_augment(x, u[_RAND_AUGMENT], cfg.rand_augment, fill=cfg.fill, interpolation=cfg.interpolation)
    if cfg.color_jitter is not None:
        x = color_jitter(x, u[_JITTER], cfg.color_jitter)
    x = _normalise(_rgb(x), cfg)
    if cfg.re_prob > 0:
        # The inverse normal CDF, √2·erfinv(2u − 1) (= ndtri(u)), of draws clipped away from 0 and 1 so that it
        # stays finite: N(0, 1) truncated at ±5.3σ.
        clipped = jnp.clip(draws[5 * block :], 2.0**-24, 1.0 - 2.0**-24)
        noise = (math.sqrt(2.0) * erfinv(2.0 * clipped - 1.0)).reshape(3, -1)
        x = _erase(x, u[_ERASE], noise, cfg.re_prob)
    return x


# ---------------------------------------------------------------- batch level: mixup / cutmix, targets


def soft_targets(labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
    """timm's smoothed one-hot: off = smoothing / classes, on = 1 − smoothing + off; float32 (B, classes)."""
    off = smoothing / num_classes
    return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (1.0 - smoothing) + off


# Intervals of the Beta(α, α) quantile table: interpolation error below 5e-7 in λ for α in [0.1, 5], under
# float32's own rounding; 4 KB in the program.
_BETA_TABLE_INTERVALS = 1024


@functools.lru_cache(maxsize=16)
def _beta_quantile_table(alpha: float) -> np.ndarray:
    """Q(s^α / 2) at s = 0, 1/n, …, 1 (n = _BETA_TABLE_INTERVALS), Q the Beta(α, α) quantile, in float64.

    The variable s = (2u)^(1/α) of the lower half u ≤ ½ makes Q smooth: near 0, u ∝ Q^α (1 + O(Q)), so Q is an
    analytic function of s there, where in u it has an infinite (α > 1) or zero (α < 1) slope.
    """
    from scipy.special import betaincinv  # a dependency of JAX; only the host builds the table

    s = np.linspace(0.0, 1.0, _BETA_TABLE_INTERVALS + 1)
    table = betaincinv(alpha, alpha, s**alpha / 2)
    table[0], table[-1] = 0.0, 0.5
    return table


def _beta_symmetric(u: jax.Array, alpha: float) -> jax.Array:
    """The Beta(α, α) quantile of u, from a table built on the host once per α and interpolated linearly.

    Symmetric: Q(u) = 1 − Q(1 − u), so the table covers u ≤ ½ in the variable s = (2u)^(1/α) (see
    _beta_quantile_table). Within 1e-6 of the exact quantile (tests/test_step_program.py), and no loop in the
    compiled step: a bisection on betainc was 32 steps around betainc's own data-dependent while loop, each
    iteration a device → host sync on a GPU.
    """
    n = _BETA_TABLE_INTERVALS
    table = jnp.asarray(_beta_quantile_table(float(alpha)), jnp.float32)
    lower = u < 0.5
    t = 2.0 * jnp.where(lower, u, 1.0 - u)  # 2·min(u, 1 − u) in [0, 1]; 1 − u is exact in float32 for u ≥ ½
    s = t if alpha == 1.0 else t ** (1.0 / alpha)
    position = s * n
    i = jnp.clip(jnp.floor(position).astype(jnp.int32), 0, n - 1)
    frac = position - i
    q = table[i] + frac * (table[i + 1] - table[i])
    return jnp.where(lower, q, 1.0 - q)


def _mix(
    x: jax.Array, labels: jax.Array, key: jax.Array, cfg: AugmentConfig, num_classes: int
) -> tuple[jax.Array, jax.Array]:
    """timm Mixup(mode='batch', correct_lam=True): one λ for the batch; example i mixes with B − 1 − i."""
    targets = soft_targets(labels, num_classes, cfg.label_smoothing)
    if not cfg.mixes:
        return x, targets
    _, height, width, _ = x.shape
    u_apply, u_switch, u_mix, u_cut, u_cy, u_cx = jax.random.uniform(key, (6,))
    lam_mix = _beta_symmetric(u_mix, cfg.mixup_alpha) if cfg.mixup_alpha > 0 else 1.0
    lam_cut = _beta_symmetric(u_cut, cfg.cutmix_alpha) if cfg.cutmix_alpha > 0 else 1.0
    if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
        use_cutmix = u_switch < cfg.switch_prob
    else:
        use_cutmix = jnp.asarray(cfg.cutmix_alpha > 0)
    # timm's rand_bbox: a box of side int(side · √(1 − λ)) centred uniformly, clipped to the image; λ is then
    # corrected to 1 − box area / image area.
    cut = jnp.sqrt(1.0 - lam_cut)
    cut_h = (height * cut).astype(jnp.int32)
    cut_w = (width * cut).astype(jnp.int32)
    cy = _randint(u_cy, 0, height)
    cx = _randint(u_cx, 0, width)
    y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
    x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
    lam_cut = 1.0 - ((y1 - y0) * (x1 - x0)) / (height * width)
    apply = u_apply < cfg.mixup_prob
    lam = jnp.where(apply, jnp.where(use_cutmix, lam_cut, lam_mix), 1.0).astype(jnp.float32)

    partner = x[::-1]
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    cut_mixed = jnp.where(box[None, :, :, None], partner, x)
    blended = lam * x + (1.0 - lam) * partner
    x = jnp.where(apply, jnp.where(use_cutmix, cut_mixed, blended), x)
    return x, lam * targets + (1.0 - lam) * targets[::-1]


def augment_batch(
    cfg: AugmentConfig,
    key: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    indices: jax.Array,
    num_classes: int,
    dtype: DTypeLike = jnp.float32,
) -> tuple[jax.Array, jax.Array]:
    """Training augmentation: uint8 (B, H, W, 3) or grey (B, H, W) → images (B, S, S, 3) in `dtype`, float32
    targets (B, K); a grey batch gives exactly what its RGB repeat would, computed on one channel.

    `key` is this step's key, `indices` the examples' global indices (B,); see the module docstring.
    """
    images = _with_channels(images)
    example_key, batch_key = jax.random.split(key)
    keys = jax.vmap(lambda i: jax.random.fold_in(example_key, i))(indices)
    x = jax.vmap(lambda image, k: _augment_example(image, k, cfg))(images, keys)
    x, targets = _mix(x, labels, batch_key, cfg, num_classes)
    return x.astype(dtype), targets


def _with_channels(images: jax.Array) -> jax.Array:
    """(B, H, W, 3) as it is, grey (B, H, W) as (B, H, W, 1); anything else is an error."""
    if images.ndim == 3:
        return images[..., None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (B, H, W, 3) or grey (B, H, W), got {images.shape}")
    return images


def eval_transform(cfg: AugmentConfig, images: jax.Array, dtype: DTypeLike = jnp.float32) -> jax.Array:
    """timm's eval transform: short side to floor(S / crop_pct), centre crop S × S, normalise; not random.
    Takes (B, H, W, 3) or grey (B, H, W), resized on its one channel and made RGB to normalise."""
    images = _with_channels(images)
    _, height, width, _ = images.shape
    size = cfg.size
    short = math.floor(size / cfg.crop_pct)
    # torchvision Resize(int): the short side becomes `short`, the long side int(short · long / short_in).
    if height <= width:
        new_h, new_w = short, int(short * width / height)
    else:
        new_h, new_w = int(short * height / width), short
    top, left = round((new_h - size) / 2.0), round((new_w - size) / 2.0)
    rows = resample_matrix(0, height, height, new_h, cfg.interpolation)[top : top + size]
    cols = resample_matrix(0, width, width, new_w, cfg.interpolation)[left : left + size]
    x = images.astype(jnp.float32)
    if (height, width) != (size, size) or new_h != size:
        x = jax.vmap(lambda image: _resize(image, rows, cols))(x)
    return _normalise(_rgb(x), cfg).astype(dtype)
