"""σ-factor sampling, Δ perturbation, the parallel chaos game, the drawing (against a Pillow reference), the bank."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onepfrac_jax.config import ConfigError
from onepfrac_jax.fractals import ifs, reference, render
from onepfrac_jax.fractals.bank import BankSpec, base_system, build_bank, choice_key, class_inputs, class_keys
from onepfrac_jax.parallel.mesh import make_data_mesh

SMALL = BankSpec(seed=2, num_classes=12, image_size=64, pad=2, num_points=8_000, classes_per_call=8)


@pytest.mark.parametrize("num_maps", [2, 3, 4])
def test_singular_values_sum_to_sigma(num_maps):
    for seed in range(20):
        sigma = 0.2 + (3 * num_maps - 0.4) * seed / 19  # spans the valid range (0, 3N)
        u = jax.random.uniform(jax.random.key(seed), (2 * num_maps,))
        sv = np.asarray(ifs.singular_values(u, num_maps, jnp.float32(sigma)))
        assert sv.shape == (num_maps, 2)
        np.testing.assert_allclose((sv[:, 0] + 2 * sv[:, 1]).sum(), sigma, rtol=1e-5)
        assert (sv >= -1e-6).all() and (sv <= 1 + 1e-6).all()
        assert (sv[:, 0] >= sv[:, 1] - 1e-6).all()


def test_sample_ifs_has_the_drawn_singular_values_and_sigma_range():
    for seed in range(10):
        params, sigma = ifs.sample_ifs(jax.random.key(seed), num_maps=2, sigma0=3.5)
        assert 3.4 <= float(sigma) <= 3.6
        a = np.asarray(params[:, :4]).reshape(2, 2, 2).astype(np.float64)
        sv = np.linalg.svd(a, compute_uv=False)
        np.testing.assert_allclose((sv[:, 0] + 2 * sv[:, 1]).sum(), float(sigma), rtol=1e-5)
        assert (np.abs(params[:, 4:]) <= 1).all()
        probs = np.asarray(ifs.map_probabilities(params))
        np.testing.assert_allclose(probs, np.abs(np.linalg.det(a)) / np.abs(np.linalg.det(a)).sum(), rtol=1e-5)


def perturbed(key, base, labels, attempts, delta, mode):
    """The class systems the bank would draw for (labels, attempts) under root key `key`."""
    keys = jax.vmap(lambda label, attempt: ifs.class_keys(key, label, attempt)[0])(labels, attempts)
    return np.asarray(ifs.perturb_classes(keys, base, delta, mode))


def test_perturbation_modes_stay_in_their_ranges():
    base, _ = ifs.sample_ifs(jax.random.key(0))
    labels = jnp.arange(200)
    zeros = jnp.zeros(200, jnp.int32)
    key = jax.random.key(1)
    mult = perturbed(key, base, labels, zeros, 0.1, "multiplicative")
    ratio = mult / np.asarray(base)[None]
    assert ratio.min() >= 0.9 - 1e-6 and ratio.max() <= 1.1 + 1e-6
    assert ratio.min() < 0.92 and ratio.max() > 1.08  # the whole range is used
    add = perturbed(key, base, labels, zeros, 0.1, "additive")
    diff = add - np.asarray(base)[None]
    assert diff.min() >= -0.05 - 1e-6 and diff.max() <= 0.05 + 1e-6 and diff.max() > 0.04
    same = perturbed(key, base, labels, zeros, 0.0, "multiplicative")
    np.testing.assert_array_equal(same, np.broadcast_to(base, same.shape))
    # a class's perturbation depends on (label, attempt) only, not on which other classes are drawn with it
    np.testing.assert_array_equal(mult[7], perturbed(key, base, jnp.array([7]), jnp.array([0]), 0.1,
                                                     "multiplicative")[0])
    redrawn = perturbed(key, base, jnp.array([7]), jnp.array([1]), 0.1, "multiplicative")
    assert not np.array_equal(mult[7], redrawn[0])


def test_parallel_chain_is_the_sequential_chain():
    base, _ = base_system(SMALL)
    probs = np.asarray(ifs.map_probabilities(base))
    choices = np.random.default_rng(0).choice(2, size=1_999, p=probs)
    xs, ys = render.chain_points(base[None], jnp.asarray(choices), num_chunks=50)  # 50 chunks of 40 steps
    ours = np.stack([np.asarray(xs)[0], np.asarray(ys)[0]], axis=1)
    reference_points = np.zeros((2_000, 2))
    for t, j in enumerate(choices, start=1):
        a, b, c, d, e, f = np.asarray(base, np.float64)[j]
        x, y = reference_points[t - 1]
        reference_points[t] = a * x + b * y + e, c * x + d * y + f
    extent = reference_points.max(0) - reference_points.min(0)
    assert np.abs(ours - reference_points).max() < 1e-4 * extent.max()
    assert (ours[0] == 0).all()  # the origin is the first point, as in the public code


def our_draw_inputs(spec: BankSpec, num_classes: int):
    """Our chain points (float32), patch masks and map probabilities for the first classes of `spec`'s bank."""
    base, _ = base_system(spec)
    probs = ifs.map_probabilities(base)
    labels = jnp.arange(num_classes)
    params, mask_keys = class_inputs(spec, base, labels, jnp.zeros(num_classes, jnp.int32),
                                     jnp.ones(num_classes, bool))
    choices = render.choice_sequence(choice_key(spec.seed), probs, spec.num_points - 1)
    xs, ys = render.chain_points(params, choices)
    masks = jax.vmap(render.mask_sequence, in_axes=(0, None))(jax.random.wrap_key_data(mask_keys), spec.num_points)
    return params, probs, xs, ys, masks


@pytest.mark.slow
@pytest.mark.parametrize("draw_mode", ["patch", "point"])
def test_drawing_equals_the_pillow_reference_fed_the_same_points(draw_mode):
    """The public code's drawing, point by point with Pillow, gets our float32 points and our masks: only a
    coordinate that float32 rounds across a pixel edge may differ."""
    spec = BankSpec()  # the default bank: 512², pad 6, 100,000 points
    _, _, xs, ys, masks = our_draw_inputs(spec, 16)
    ours, ok = render.rasterise(xs, ys, masks if draw_mode == "patch" else None, spec.image_size, spec.pad)
    assert np.asarray(ok).all()
    for label in range(16):
        x, y = reference.pixel_coordinates(np.stack([np.asarray(xs[label]), np.asarray(ys[label])], 1),
                                           spec.image_size, spec.pad)
        theirs = reference.draw(x, y, np.asarray(masks[label]) if draw_mode == "patch" else None, spec.image_size)
        agree = np.mean(np.asarray(ours[label]) == theirs)
        assert agree >= 0.9999, (label, agree)


@pytest.mark.slow
def test_the_default_bank_fills_the_canvas_as_the_reference_renderer_does():
    """Each renderer end to end on its own (own chain, own masks): the mean fill of 16 classes agrees to 2%,
    and it is the speckled "last point wins" fill, about half what OR-ing the patches' on-cells gives."""
    spec = BankSpec()
    params, probs, xs, ys, masks = our_draw_inputs(spec, 16)
    ours, _ = render.rasterise(xs, ys, masks, spec.image_size, spec.pad)
    ours_fill = float(np.mean(render.fill_rate(ours)))
    rng = np.random.default_rng(0)
    theirs_fill = np.mean([
        np.mean(reference.render(np.asarray(p, np.float64), np.asarray(probs, np.float64), spec.image_size,
                                 spec.pad, spec.num_points, "patch", rng) > 1)
        for p in params])
    assert abs(ours_fill / theirs_fill - 1) < 0.02, (ours_fill, theirs_fill)
    # the OR of every on-cell: the same points and masks, no erasing
    col, row, _, _ = render.pixel_coordinates(xs, ys, spec.image_size, spec.pad)
    ored = np.zeros((16, spec.image_size, spec.image_size), bool)
    for cell in range(9):
        on = (np.asarray(masks) >> cell & 1).astype(bool)
        labels = np.broadcast_to(np.arange(16)[:, None], on.shape)
        ored[labels[on], np.asarray(row)[on] + 1 + cell // 3, np.asarray(col)[on] + 1 + cell % 3] = True
    assert ored.mean() > 1.5 * ours_fill


def test_the_last_point_decides_every_pixel_its_patch_covers():
    # points (0, 0), (0, 0), (1, 1) on a 16² canvas, pad 2: x = 0 → column 2, x = 1 → column 14 = 16 − pad
    xs = ys = jnp.array([[0.0, 0.0, 1.0]])
    full, one = 511, 1  # bit 3i + j switches patch cell (i, j); bit 0 is the top-left cell before the flip
    for first, second, expected_on in [(full, one, 1), (one, full, 9)]:
        img, ok = render.rasterise(xs, ys, jnp.array([[first, second, full]]), image_size=16, pad=2)
        img = np.flipud(np.asarray(img[0]))  # back to the public code's orientation before its flip
        assert bool(ok[0])
        # the patch of (2, 2) spans rows and columns 3-5: the second point's mask alone decides it
        assert (img[3:6, 3:6] > 0).sum() == expected_on and img[3, 3] == render.VALUE
        # (14, 14)'s patch reaches past the canvas (rows 15-17): Pillow clips it, so do we
        assert (img[15, 15] == render.VALUE) and img.sum() == (expected_on + 1) * render.VALUE
    point, _ = render.rasterise(xs, ys, None, image_size=16, pad=2)
    point = np.flipud(np.asarray(point[0]))
    assert point[2, 2] == point[14, 14] == render.VALUE and point.sum() == 2 * render.VALUE


def test_masks_are_uniform_over_1_to_511_and_each_class_has_its_own():
    masks = np.asarray(render.mask_sequence(jax.random.key(3), 511 * 200))
    assert masks.min() == 1 and masks.max() == 511
    counts = np.bincount(masks, minlength=512)[1:]
    assert counts.min() > 120 and counts.max() < 290  # 200 expected each; ±6σ
    _, mask_keys = class_keys(SMALL.seed, jnp.array([0, 1, 0]), jnp.array([0, 0, 1]))
    draws = [np.asarray(render.mask_sequence(k, 100)) for k in mask_keys]
    assert not np.array_equal(draws[0], draws[1]) and not np.array_equal(draws[0], draws[2])


@pytest.mark.slow
def test_non_finite_and_degenerate_classes_fail_cleanly():
    probs = jnp.array([0.5, 0.5])
    params = jnp.stack([
        jnp.full((2, 6), jnp.nan),  # NaN maps
        jnp.array([[3.0, 0, 0, 3.0, 1, 1], [3.0, 0, 0, 3.0, -1, 1]]),  # expanding: the chain escapes
        jnp.zeros((2, 6)),  # every point at the origin: no extent
        jnp.array([[0.5, 0, 0, 0.5, 0, 0], [0.5, 0, 0, 0.5, 1, 0]]),  # a segment: no extent in y
    ])
    images, ok = render.render(params, probs, jax.random.key(0), image_size=32, pad=2, num_points=5_000)
    ok, images = np.asarray(ok), np.asarray(images)
    assert not ok[[0, 2, 3]].any() and not images[[0, 2, 3]].any()
    # the escaping chain leaves the box within ~20 steps; those and the 100 points before are dropped (the public
    # code drops the 100 before its first NaN): nothing is left to draw, so it fails the fill-rate check
    assert not ok[1] and not images[1].any()
    _, _, kept, _ = render.pixel_coordinates(*render.chain_points(params[1:2], jnp.zeros(299, jnp.int32)), 32, 2)
    assert not np.asarray(kept).any()
    # a chain that escapes late keeps its points up to 100 before the escape
    late = jnp.array([[[0.5, 0, 0, 0.5, 0.1, 0.2], [0.5, 0, 0, 0.5, 0.1, 0.2]]])
    xs, ys = render.chain_points(late, jnp.zeros(499, jnp.int32))
    xs = xs.at[0, 300].set(jnp.nan)
    _, _, kept, ok_late = render.pixel_coordinates(xs, ys, 32, 2)
    assert np.asarray(kept)[0].sum() == 200 and bool(ok_late[0])


@pytest.mark.slow
def test_bank_is_bitwise_the_same_on_1_3_and_4_devices():
    one = build_bank(SMALL, mesh=make_data_mesh(jax.devices()[:1]))
    four = build_bank(SMALL, mesh=make_data_mesh(jax.devices()[:4]))
    three = build_bank(SMALL, mesh=make_data_mesh(jax.devices()[:3]))  # 4 rows per device, 3 per call
    np.testing.assert_array_equal(np.asarray(one.images)[:12], np.asarray(three.images)[:12])
    np.testing.assert_array_equal(one.redraws, three.redraws)
    assert four.images.sharding.mesh.devices.size == 4
    np.testing.assert_array_equal(np.asarray(one.images)[:12], np.asarray(four.images)[:12])
    np.testing.assert_array_equal(one.class_params, four.class_params)
    assert (one.fill > SMALL.fill_threshold).all()
    assert one.images.dtype == jnp.uint8 and set(np.unique(np.asarray(one.images))) <= {0, 127}
    # padding rows (12 classes → 12 rows on 4 devices; 13 would pad to 16) stay empty
    odd = build_bank(BankSpec(**{**SMALL.__dict__, "num_classes": 13}), mesh=make_data_mesh(jax.devices()[:4]))
    assert odd.images.shape[0] == 16 and not np.asarray(odd.images)[13:].any()
    np.testing.assert_array_equal(np.asarray(odd.images)[:12], np.asarray(one.images)[:12])


def test_rejected_classes_are_redrawn_and_kept_images_pass():
    spec = BankSpec(**{**SMALL.__dict__, "fill_threshold": 0.12})
    bank = build_bank(spec, mesh=make_data_mesh(jax.devices()[:2]))
    assert bank.redraws.max() > 0
    assert (bank.fill > 0.12).all()
    fills = np.asarray(render.fill_rate(bank.images))[: spec.num_classes]
    np.testing.assert_allclose(fills, bank.fill)


def test_a_system_that_cannot_make_valid_classes_stops_with_advice():
    with pytest.raises(ConfigError, match=r"seed=2.*sigma=3.5.*try another --config.seed"):
        build_bank(BankSpec(**{**SMALL.__dict__, "fill_threshold": 0.9}))
    spec = BankSpec(**{**SMALL.__dict__, "fill_threshold": 0.12, "max_redraws": 0})
    with pytest.raises(ConfigError, match=r"classes .* after 0 re-draws"):
        build_bank(spec)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("sigma", 0.0, "sigma=0.0 must lie in"),
        ("sigma", 6.0, "sigma=6.0 must lie in"),
        ("delta", -0.1, "delta=-0.1 must be ≥ 0"),
        ("delta", 1.5, "delta=1.5 must be ≤ 1 in multiplicative mode"),
        ("num_classes", 0, "num_classes=0 must be > 0"),
        ("image_size", 15, "image_size=15 must be ≥ 16"),
        ("draw_mode", "blob", "draw_mode='blob'"),
        ("perturbation", "scaled", "perturbation='scaled'"),
    ],
)
def test_bad_specs_are_rejected(field, value, message):
    with pytest.raises(ConfigError, match=message):
        BankSpec(**{**SMALL.__dict__, field: value}).validate()


def test_the_papers_largest_delta_is_valid_in_both_modes_and_additive_goes_beyond():
    BankSpec(**{**SMALL.__dict__, "delta": 1.0}).validate()  # factors U(0, 2): no sign flips
    BankSpec(**{**SMALL.__dict__, "delta": 1.5, "perturbation": "additive"}).validate()
