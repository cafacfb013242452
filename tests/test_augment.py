"""On-device augmentation: each op's contract, Pillow agreement, keying, sharding, mixup/cutmix targets."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from onepfrac_jax.config import ConfigError
from onepfrac_jax.data import randaugment as ra
from onepfrac_jax.data.augment import (
    AugmentConfig,
    augment_batch,
    augment_config,
    default_augment_config,
    erase_capacity,
    eval_transform,
    soft_targets,
)

KEY = jax.random.fold_in(jax.random.key(0), 3)


def make_cfg(**overrides) -> AugmentConfig:
    section = default_augment_config()
    section.update(overrides)
    return augment_config(section)


@functools.cache
def _jitted(cfg: AugmentConfig, num_classes: int, dtype=jnp.float32):
    return jax.jit(lambda k, x, y, i: augment_batch(cfg, k, x, y, i, num_classes, dtype))


def run(cfg, images, labels=None, indices=None, key=KEY, num_classes=10, dtype=jnp.float32):
    b = images.shape[0]
    labels = np.arange(b) % num_classes if labels is None else labels
    indices = np.arange(b) if indices is None else indices
    out, targets = _jitted(cfg, num_classes, dtype)(key, images, labels, indices)
    return np.asarray(out.astype(jnp.float32)), np.asarray(targets)


def images_u8(b=8, h=32, w=32, seed=0) -> np.ndarray:
    """Smooth random RGB images: noise blurred by Pillow, so resampling differences stay small."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (b, h, w, 3)).astype(np.uint8)
    return np.stack([np.asarray(Image.fromarray(n).filter(ImageFilter.SMOOTH_MORE)) for n in noise])


def levels(x: np.ndarray, mean=0.5, std=0.5) -> np.ndarray:
    """Undoes the normalisation back to grey levels."""
    return (x * std + mean) * 255.0


# ---------------------------------------------------------------- config


def test_default_config_is_neutral():
    cfg = augment_config(default_augment_config())
    assert cfg.crop == "resize" and cfg.rand_augment is None and cfg.color_jitter is None
    assert cfg.hflip == cfg.vflip == cfg.re_prob == cfg.label_smoothing == 0 and not cfg.mixes
    assert cfg.fill == (128, 128, 128)  # timm: round(255 · 0.5)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"crop": "random"}, "augment.crop"),
        ({"hflip": 1.5}, "augment.hflip"),
        ({"scale": (0.5, 0.1)}, "augment.scale"),
        ({"std": (0.5, 0.0, 0.5)}, "augment.std"),
        ({"mean": (0.5, 0.5)}, "augment.mean"),
        ({"interpolation": "nearest"}, "augment.interpolation"),
        ({"auto_augment": "rand-m9-w0"}, "unknown section 'w0'"),
        ({"auto_augment": "augmix-m3"}, "only RandAugment"),
        ({"auto_augment": "rand-m"}, "not <key><number>"),
        ({"label_smoothing": 1.0}, "augment.label_smoothing"),
        ({"crop_pct": 0.0}, "augment.crop_pct"),
    ],
)
def test_bad_config_names_the_field(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        make_cfg(**overrides)


def test_unknown_key_is_refused():
    section = default_augment_config()
    section.mixup = 0.8
    with pytest.raises(ConfigError, match="unknown augment key"):
        augment_config(section)


def test_parse_rand_augment_follows_timm():
    spec = ra.parse_rand_augment("rand-m9-mstd0.5-inc1")
    assert (spec.magnitude, spec.num_layers, spec.magnitude_std, spec.increasing) == (9, 2, 0.5, True)
    assert spec.op_names[4] == "PosterizeIncreasing" and len(spec.op_names) == 15
    spec = ra.parse_rand_augment("rand-n3-m7-mstd101-mmax8")
    assert (spec.num_layers, spec.magnitude_std, spec.magnitude_max, spec.increasing) == (3, np.inf, 8, False)
    assert not ra.parse_rand_augment("rand-inc0").increasing
    assert ra.parse_rand_augment("rand").magnitude == 10  # timm's default M


def test_color_jitter_is_skipped_under_randaugment_as_in_timm():
    assert make_cfg(color_jitter=0.4).color_jitter == (0.4, 0.4, 0.4)
    assert make_cfg(color_jitter=0.4, auto_augment="rand-m9").color_jitter is None
    forced = make_cfg(color_jitter=0.4, auto_augment="rand-m9", force_color_jitter=True)
    assert forced.color_jitter == (0.4, 0.4, 0.4)


# ---------------------------------------------------------------- RandAugment ops against Pillow

_FILL = (124, 116, 104)  # timm's img_mean for ImageNet's mean: a fill distinct per channel


def _pillow_op(image: Image.Image, name: str, m: float, sign: float) -> Image.Image:
    """timm's op at magnitude m with _randomly_negate's outcome `sign` (inc1 variants)."""
    level = m / 10
    factor = max(0.1, 1 + sign * level * 0.9)
    affine = {
        "ShearX": (1, sign * level * 0.3, 0, 0, 1, 0),
        "ShearY": (1, 0, 0, sign * level * 0.3, 1, 0),
        "TranslateXRel": (1, 0, sign * level * 0.45 * image.size[0], 0, 1, 0),
        "TranslateYRel": (1, 0, 0, 0, 1, sign * level * 0.45 * image.size[1]),
    }
    if name in affine:
        return image.transform(image.size, Image.AFFINE, affine[name], Image.BICUBIC, fillcolor=_FILL)
    add = int(level * 110)
    ops = {
        "AutoContrast": lambda: ImageOps.autocontrast(image),
        "Equalize": lambda: ImageOps.equalize(image),
        "Invert": lambda: ImageOps.invert(image),
        "Rotate": lambda: image.rotate(sign * level * 30, resample=Image.BICUBIC, fillcolor=_FILL),
        "PosterizeIncreasing": lambda: ImageOps.posterize(image, 4 - int(level * 4)),
        "SolarizeIncreasing": lambda: ImageOps.solarize(image, 256 - int(level * 256)),
        "SolarizeAdd": lambda: image.point([min(255, i + add) if i < 128 else i for i in range(256)] * 3),
        "ColorIncreasing": lambda: ImageEnhance.Color(image).enhance(factor),
        "ContrastIncreasing": lambda: ImageEnhance.Contrast(image).enhance(factor),
        "BrightnessIncreasing": lambda: ImageEnhance.Brightness(image).enhance(factor),
        "SharpnessIncreasing": lambda: ImageEnhance.Sharpness(image).enhance(factor),
    }
    return ops[name]()


_apply_op = jax.jit(lambda x, op, m, sign: ra.apply_op(x, op, m, sign, fill=_FILL))


@pytest.mark.parametrize("op", range(15), ids=ra.OPS_INCREASING)
def test_rand_augment_op_matches_pillow(op):
    image = images_u8(1, 40, 48, seed=op)[0] // 2 + 40  # a narrow range, so AutoContrast/Equalize act
    name = ra.OPS_INCREASING[op]
    for m, sign in [(9.0, 1.0), (6.3, -1.0), (2.0, 1.0)]:
        ours = np.asarray(_apply_op(jnp.asarray(image, jnp.float32), op, m, sign))
        ref = np.asarray(_pillow_op(Image.fromarray(image), name, m, sign), np.float32)
        diff = np.abs(ours - ref)
        # Pillow works in double precision: a warp's sample point may land on the other side of a level.
        assert diff.max() <= 1 and np.mean(diff > 0) < 0.01, (name, m, sign, diff.max(), np.mean(diff > 0))
        assert np.array_equal(ours, np.round(ours))


def test_rand_augment_plain_variants_use_timms_level_functions():
    image = images_u8(1, 24, 32, seed=1)[0]
    pil = Image.fromarray(image)
    apply = jax.jit(lambda x, op, m: ra.apply_op(x, op, m, 1.0, increasing=False))
    references = {  # timm's _posterize/_solarize/_enhance_level_to_arg at m = 7
        "Posterize": ImageOps.posterize(pil, int(0.7 * 4)),
        "Solarize": ImageOps.solarize(pil, int(0.7 * 256)),
        "Contrast": ImageEnhance.Contrast(pil).enhance(0.7 * 1.8 + 0.1),
        "Brightness": ImageEnhance.Brightness(pil).enhance(0.7 * 1.8 + 0.1),
    }
    for name, reference in references.items():
        ours = np.asarray(apply(jnp.asarray(image, jnp.float32), ra.OPS.index(name), 7.0))
        np.testing.assert_allclose(ours, np.asarray(reference, np.float32), atol=1, err_msg=name)


@pytest.mark.parametrize(
    "name",
    [
        "Rotate",
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
    ],
)
def test_rand_augment_op_is_identity_at_zero_magnitude(name):
    image = jnp.asarray(images_u8(1, 24, 24)[0], jnp.float32)
    op = ra.OPS_INCREASING.index(name)
    np.testing.assert_array_equal(_apply_op(image, op, 0.0, -1.0), image)
    assert not np.array_equal(_apply_op(image, op, 10.0, -1.0), image)


def test_rand_augment_decodes_its_draws_like_timm():
    """Per layer: op = floor(15·u₀), applied iff u₁ < 0.5, magnitude = m + mstd·Φ⁻¹(u₂), negated iff u₃ < 0.5."""
    spec = ra.parse_rand_augment("rand-m9-mstd0.5-inc1")
    image = jnp.asarray(images_u8(1, 20, 20, seed=2)[0], jnp.float32)
    # Layer 1: op 3 (Rotate) at m = 9 + 0.5·Φ⁻¹(0.5) = 9, negated; layer 2: op 14 (TranslateYRel), m = 9 + 0.5.
    u_ops = jnp.asarray([3.5 / 15, 0.2, 0.5, 0.1, 14.5 / 15, 0.3, 0.5 * (1 + math.erf(2**-0.5)), 0.9])
    u_skip_second = u_ops.at[5].set(0.7)
    u_skip_both = u_skip_second.at[1].set(0.5)
    out = jax.jit(jax.vmap(lambda u: ra.rand_augment(image, u, spec, fill=_FILL, interpolation="bicubic")))(
        jnp.stack([u_ops, u_skip_second, u_skip_both])
    )
    first = _apply_op(image, 3, 9.0, -1.0)
    np.testing.assert_array_equal(out[0], _apply_op(first, 14, 9.5, 1.0))
    np.testing.assert_array_equal(out[1], first)
    np.testing.assert_array_equal(out[2], image)


# ---------------------------------------------------------------- the pipeline, op by op


def test_neutral_pipeline_only_normalises():
    x = images_u8(4)
    out, targets = run(make_cfg(size=32), x)
    assert out.shape == (4, 32, 32, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, (x / 255.0 - 0.5) / 0.5, atol=1e-6)
    np.testing.assert_array_equal(targets, np.eye(10)[np.arange(4)])


def test_output_dtype_and_imagenet_normalisation():
    x = images_u8(2)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out, _ = run(make_cfg(size=32, mean=mean, std=std), x, dtype=jnp.bfloat16)
    np.testing.assert_allclose(out, (x / 255.0 - np.array(mean)) / np.array(std), atol=0.05)


def test_flips_reverse_exactly_one_axis_with_their_probability():
    x = images_u8(64, 8, 8)
    plain, _ = run(make_cfg(size=8), x)
    out, _ = run(make_cfg(size=8, hflip=0.5, vflip=0.5), x)
    kinds = []
    for o, p in zip(out, plain, strict=True):
        candidates = {"none": p, "h": p[:, ::-1], "v": p[::-1], "hv": p[::-1, ::-1]}
        matches = [name for name, c in candidates.items() if np.array_equal(o, c)]
        assert len(matches) == 1
        kinds.append(matches[0])
    counts = [kinds.count(k) for k in ("none", "h", "v", "hv")]
    assert min(counts) >= 6, counts  # each of the four ~ Binomial(64, 1/4)


def test_resize_matches_pillow():
    x = images_u8(2, 45, 37)
    for method, pil in [("bicubic", Image.BICUBIC), ("bilinear", Image.BILINEAR)]:
        for size in (24, 64):  # shrinking (antialiased) and enlarging
            out, _ = run(make_cfg(size=size, interpolation=method), x)
            ref = np.stack([np.asarray(Image.fromarray(i).resize((size, size), pil)) for i in x])
            diff = np.abs(levels(out) - ref)
            assert diff.max() < 1.01 and np.mean(diff > 0.01) < 0.01


def test_rrc_at_full_scale_and_square_ratio_is_a_plain_resize():
    x = images_u8(4, 40, 40)
    crop, _ = run(make_cfg(size=24, crop="rrc", scale=(1.0, 1.0), ratio=(1.0, 1.0), interpolation="bicubic"), x)
    resize, _ = run(make_cfg(size=24, interpolation="bicubic"), x)
    np.testing.assert_array_equal(crop, resize)


def test_rrc_boxes_follow_scale_and_ratio():
    from onepfrac_jax.data.augment import _rrc_box  # the crop box itself is what the contract is about

    cfg = make_cfg(crop="rrc", scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    u = jax.random.uniform(jax.random.key(1), (2000, 23))
    top, left, h, w = (np.asarray(a) for a in jax.jit(jax.vmap(lambda v: _rrc_box(v, 60, 80, cfg)))(u))
    assert np.all(top >= 0) and np.all(left >= 0) and np.all(top + h <= 60) and np.all(left + w <= 80)
    area = h * w / (60 * 80)
    assert area.min() > 0.06 and area.max() <= 1.0 and np.mean(area > 0.5) > 0.3
    assert np.all(w / h > 0.75 * 0.9) and np.all(w / h < 4 / 3 * 1.1)
    assert len(np.unique(top)) > 30 and len(np.unique(left)) > 30


def test_pad_crop_is_a_zero_padded_shift():
    x = images_u8(16, 16, 16)
    out, _ = run(make_cfg(size=16, crop="pad_crop", pad=4, interpolation="bilinear"), x)
    shifts = set()
    for image, result in zip(x, levels(out), strict=True):
        padded = np.pad(image, ((4, 4), (4, 4), (0, 0))).astype(np.float32)
        matches = [(t, s) for t in range(9) for s in range(9) if np.allclose(padded[t : t + 16, s : s + 16], result)]
        assert matches, "the output is not a 16×16 window of the zero-padded image"
        shifts.add(matches[0])
    assert len(shifts) > 4


def test_eval_transform_matches_pillow_resize_and_centre_crop():
    x = images_u8(2, 50, 40)
    cfg = make_cfg(size=24, crop_pct=0.875, interpolation="bicubic")
    out = np.asarray(jax.jit(lambda i: eval_transform(cfg, i))(x))
    assert out.shape == (2, 24, 24, 3)
    # timm: short side to floor(24 / 0.875) = 27, long side int(27 · 50 / 40) = 33, centre crop.
    ref = [np.asarray(Image.fromarray(i).resize((27, 33), Image.BICUBIC))[4:28, 2:26] for i in x]
    np.testing.assert_allclose(levels(out), np.stack(ref), atol=1.01)


def test_random_erasing_pixel_mode():
    x = images_u8(32, 24, 24)
    plain, _ = run(make_cfg(size=24), x)
    none, _ = run(make_cfg(size=24, re_prob=0.0), x)
    np.testing.assert_array_equal(none, plain)
    erased, _ = run(make_cfg(size=24, re_prob=1.0), x, indices=np.arange(32))
    noise = []
    for before, after in zip(plain, erased, strict=True):
        changed = np.any(before != after, axis=-1)
        rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
        assert changed.any(), "p = 1 must erase every image (a box always fits 10 tries at these sizes)"
        box = changed[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        assert box.mean() > 0.95  # one rectangle (noise may equal the image by chance only rarely)
        assert 0.015 <= box.size / 24**2 <= 0.36
        assert 0.25 <= len(rows) / len(cols) <= 3.4
        noise.append(after[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].ravel())
        assert len(np.unique(noise[-1])) == noise[-1].size  # every pixel and channel of the box its own draw
    noise = np.concatenate(noise)
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05


@pytest.mark.parametrize("size", [8, 24, 31, 224])
def test_erase_capacity_bounds_every_box_that_fits(size):
    # Every (area, log-aspect) on a fine grid over timm's ranges, rounded as _erase rounds them.
    area = size * size * np.linspace(0.02, 1 / 3, 400)[:, None]
    aspect = np.exp(np.linspace(math.log(0.3), math.log(1 / 0.3), 400))[None, :]
    h, w = np.round(np.sqrt(area * aspect)), np.round(np.sqrt(area / aspect))
    fits = (h < size) & (w < size)
    assert (h * w)[fits].max() <= erase_capacity(size) < size * size


def test_color_jitter_factors_and_grey_preservation():
    cfg = make_cfg(size=8, color_jitter=0.4)
    grey = np.repeat(images_u8(64, 8, 8)[..., :1], 3, axis=-1)
    out = levels(run(cfg, grey)[0])
    np.testing.assert_array_equal(out[..., 0], out[..., 1])
    np.testing.assert_allclose(out, np.round(out), atol=1e-3)
    assert np.mean(np.abs(out - grey) > 0.5) > 0.5
    # On a constant image contrast and saturation do nothing; brightness gives floor(100 · f), f ∈ [0.6, 1.4].
    values = levels(run(cfg, np.full((64, 8, 8, 3), 100, np.uint8))[0])[:, 0, 0, 0]
    assert values.min() >= 59.99 and values.max() <= 140.01 and values.std() > 15


# The pre-training recipe (SPEC §A4) at a small size, jitter forced on; _PER_EXAMPLE leaves out RandAugment
# (compiling it is slow on CPU; the Pillow tests above cover its ops), erasing and mixing.
_PER_EXAMPLE = dict(size=16, crop="rrc", interpolation="bicubic", hflip=0.5, vflip=0.5, color_jitter=0.4)
_RECIPE = dict(
    _PER_EXAMPLE,
    auto_augment="rand-m9-mstd0.5-inc1",
    force_color_jitter=True,
    re_prob=0.5,
    mixup_alpha=0.8,
    cutmix_alpha=1.0,
    label_smoothing=0.1,
)


def test_recipe_keeps_whole_grey_levels_before_erasing():
    grey_levels = levels(run(make_cfg(**_PER_EXAMPLE), images_u8(8, 24, 24))[0])
    assert grey_levels.min() >= -1e-3 and grey_levels.max() <= 255 + 1e-3
    np.testing.assert_allclose(grey_levels, np.round(grey_levels), atol=2e-3)


def test_same_key_same_batch_and_new_step_new_batch():
    cfg = make_cfg(**_PER_EXAMPLE)  # the sharded test below checks the full recipe run twice gives equal bits
    x = images_u8(8, 24, 24)
    a, ta = run(cfg, x)
    b, tb = run(cfg, x)
    assert np.array_equal(a, b) and np.array_equal(ta, tb)
    c, _ = run(cfg, x, key=jax.random.fold_in(jax.random.key(0), 4))
    assert not np.any([np.array_equal(i, j) for i, j in zip(a, c, strict=True)])


def test_an_example_is_keyed_by_its_global_index_not_its_position():
    cfg = make_cfg(**_PER_EXAMPLE)
    x, labels, indices = images_u8(8, 24, 24), np.arange(8), np.arange(8)
    out, _ = run(cfg, x, labels, indices)
    perm = np.random.default_rng(0).permutation(8)
    shuffled, _ = run(cfg, x[perm], labels[perm], indices[perm])
    np.testing.assert_array_equal(shuffled, out[perm])
    other, _ = run(cfg, x, labels, indices + 8)
    assert not np.any([np.array_equal(i, j) for i, j in zip(out, other, strict=True)])


@pytest.mark.slow
def test_sharded_batch_gives_the_unsharded_result():
    assert jax.device_count() >= 4
    cfg = make_cfg(**_RECIPE)
    x, labels, indices = images_u8(8, 24, 24), np.arange(8), np.arange(8)
    single = run(cfg, x, labels, indices)
    mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,))
    sharded_args = [jax.device_put(a, NamedSharding(mesh, PartitionSpec("data"))) for a in (x, labels, indices)]
    out, targets = _jitted(cfg, 10)(KEY, *sharded_args)
    assert out.sharding.spec == PartitionSpec("data")
    np.testing.assert_array_equal(np.asarray(out), single[0])
    # Targets may differ in the last bit: XLA may fuse λ·a + (1 − λ)·b into FMAs differently per program.
    np.testing.assert_allclose(np.asarray(targets), single[1], rtol=0, atol=6e-8)


# ---------------------------------------------------------------- targets: smoothing, mixup, cutmix


def test_label_smoothing_without_mixing():
    _, targets = run(make_cfg(size=32, label_smoothing=0.1), images_u8(4), np.array([3, 0, 9, 3]))
    expected = np.full((4, 10), 0.01, np.float32)
    expected[np.arange(4), [3, 0, 9, 3]] = 0.91
    np.testing.assert_allclose(targets, expected, atol=1e-7)
    np.testing.assert_allclose(soft_targets(jnp.array([1]), 4, 0.2), [[0.05, 0.85, 0.05, 0.05]], atol=1e-7)


def test_mixup_blends_example_i_with_example_b_minus_1_minus_i():
    x, labels = images_u8(4), np.array([3, 0, 9, 3])
    plain, _ = run(make_cfg(size=32, label_smoothing=0.1), x, labels)
    # switch_prob 0: with both alphas on, always mixup.
    cfg = make_cfg(size=32, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.0, label_smoothing=0.1)
    mixed, targets = run(cfg, x, labels)
    np.testing.assert_allclose(targets.sum(1), 1.0, atol=1e-6)
    lam = (targets[1, 0] - 0.01) / 0.9  # example 1 (label 0) mixes with example 2 (label 9)
    assert 0 < lam < 1
    expected = lam * soft_targets(labels, 10, 0.1) + (1 - lam) * soft_targets(labels[::-1], 10, 0.1)
    np.testing.assert_allclose(targets, expected, atol=1e-6)
    np.testing.assert_allclose(mixed, lam * plain + (1 - lam) * plain[::-1], atol=1e-5)


def test_cutmix_pastes_one_box_whose_area_is_one_minus_lambda():
    x, labels = images_u8(4), np.array([7, 1, 2, 5])
    plain, _ = run(make_cfg(size=32), x, labels)
    # switch_prob 1: with both alphas on, always cutmix.
    cfg = make_cfg(size=32, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=1.0)
    lams = []
    for step in range(6):
        mixed, targets = run(cfg, x, labels, key=jax.random.fold_in(jax.random.key(1), step))
        lam = targets[0, 7]
        np.testing.assert_allclose(targets.sum(1), 1.0, atol=1e-6)
        pasted = np.all(mixed == plain[::-1], axis=-1) & np.any(mixed != plain, axis=-1)
        assert np.all(pasted | np.all(mixed == plain, axis=-1))  # whole pixels, from self or partner
        assert np.all(pasted == pasted[0])  # batch mode: one box for every example
        rows, cols = np.flatnonzero(pasted[0].any(1)), np.flatnonzero(pasted[0].any(0))
        if rows.size:
            assert pasted[0, rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()  # a rectangle
        np.testing.assert_allclose(pasted[0].mean(), 1 - lam, atol=1e-6)
        np.testing.assert_allclose(targets[:, [7, 1, 2, 5]].diagonal(), lam, atol=1e-6)
        lams.append(lam)
    assert any(0 < lam < 1 for lam in lams) and len(set(lams)) > 1


def test_mixup_prob_zero_leaves_images_and_one_hot_targets():
    x, labels = images_u8(4), np.array([0, 1, 2, 3])
    plain, _ = run(make_cfg(size=32), x, labels)
    off, targets = run(make_cfg(size=32, mixup_alpha=0.8, cutmix_alpha=1.0, mixup_prob=0.0), x, labels)
    np.testing.assert_array_equal(off, plain)
    np.testing.assert_array_equal(targets, np.eye(10)[labels])


def test_mixup_lambda_is_beta_distributed():
    from onepfrac_jax.data.augment import _beta_symmetric  # the λ sampler; drawing whole batches is slower

    u = jax.random.uniform(jax.random.key(2), (4000,))
    for alpha in (0.8, 1.0):
        lam = np.asarray(jax.jit(jax.vmap(lambda v, a=alpha: _beta_symmetric(v, a)))(u))
        assert abs(lam.mean() - 0.5) < 0.02 and abs(lam.var() - 1 / (4 * (2 * alpha + 1))) < 0.006
    np.testing.assert_allclose(lam, u, atol=1e-6)  # Beta(1, 1) is the uniform: the quantile of u is u


# ---------------------------------------------------------------- grey batches: one channel, exactly the RGB result


def _grey_images(b=8, size=24) -> np.ndarray:
    """Grey images of two kinds: smooth levels, and binary 0/255 ones like the fractal banks'."""
    smooth = images_u8(b // 2, size, size)[..., 0]
    binary = np.where(images_u8(b - b // 2, size, size, seed=1)[..., 0] > 128, 255, 0).astype(np.uint8)
    return np.concatenate([smooth, binary])


@pytest.mark.parametrize(
    "overrides",
    [
        _RECIPE,  # mean 0.5: a grey fill, so RandAugment runs on the one channel
        dict(_RECIPE, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),  # a coloured fill: RGB from RandAugment
        dict(size=16, crop="pad_crop", hflip=0.5, re_prob=0.5),
    ],
    ids=["recipe", "imagenet-mean", "pad-crop"],
)
@pytest.mark.slow
def test_grey_batch_is_its_rgb_repeat_bit_for_bit(overrides):
    cfg = make_cfg(**overrides)
    grey = _grey_images()
    out, targets = run(cfg, grey)
    rgb_out, rgb_targets = run(cfg, np.repeat(grey[..., None], 3, axis=-1))
    assert out.shape == rgb_out.shape == (8, 16, 16, 3)
    np.testing.assert_array_equal(out, rgb_out)
    np.testing.assert_allclose(targets, rgb_targets, rtol=0, atol=6e-8)


@pytest.mark.slow
def test_grey_batch_costs_a_fraction_of_its_rgb_repeat():
    # Crop, flips, RandAugment and jitter on one channel: their pixel work is a third; the draws and the
    # tables are not per pixel, hence under a half rather than a third (measured 0.44).
    cfg = make_cfg(**_PER_EXAMPLE, auto_augment="rand-m9-mstd0.5-inc1", force_color_jitter=True)

    def flops(channels_shape):
        args = (KEY, jnp.zeros(channels_shape, jnp.uint8), jnp.zeros(8, jnp.int32), jnp.arange(8))
        cost = jax.jit(lambda k, x, y, i: augment_batch(cfg, k, x, y, i, 10)).lower(*args).compile().cost_analysis()
        return float((cost[0] if isinstance(cost, list | tuple) else cost)["flops"])

    assert flops((8, 64, 64)) < 0.5 * flops((8, 64, 64, 3))


def test_eval_transform_of_grey_is_its_rgb_repeat():
    cfg = make_cfg(size=16, interpolation="bicubic", crop_pct=0.875, mean=(0.485, 0.456, 0.406))
    grey = _grey_images(4, 30)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    np.testing.assert_array_equal(np.asarray(eval_transform(cfg, grey)), np.asarray(eval_transform(cfg, rgb)))
    with pytest.raises(ValueError, match="grey"):
        eval_transform(cfg, rgb[..., :2])


@pytest.mark.slow
@pytest.mark.parametrize("op", range(len(ra.OPS)))
def test_rand_augment_op_on_one_channel_is_any_channel_of_rgb(op):
    grey = _grey_images(2, 20)[1].astype(np.float32)  # a binary image: AutoContrast and Equalize see two levels
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    one = ra.apply_op(jnp.asarray(grey[..., None]), op, 7.0, -1.0, fill=(128, 128, 128))
    three = ra.apply_op(jnp.asarray(rgb), op, 7.0, -1.0, fill=(128, 128, 128))
    np.testing.assert_array_equal(np.asarray(three), np.repeat(np.asarray(one), 3, axis=-1))


def test_one_channel_needs_a_grey_fill():
    with pytest.raises(ValueError, match="grey fill"):
        ra.apply_op(jnp.zeros((8, 8, 1)), 3, 5.0, fill=_FILL)
