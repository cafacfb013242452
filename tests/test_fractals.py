"""σ-factor sampling, Δ perturbation, the parallel chaos game, the rasteriser and the class bank."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onepfrac_jax.config import ConfigError
from onepfrac_jax.fractals import ifs, render
from onepfrac_jax.fractals.bank import BankSpec, base_system, build_bank
from onepfrac_jax.parallel.mesh import make_data_mesh

SMALL = BankSpec(seed=2, num_classes=12, image_size=64, pad=2, num_points=8_000, classes_per_call=8)


@pytest.mark.parametrize("num_maps", [2, 3, 4])
def test_singular_values_sum_to_sigma(num_maps):
    for seed in range(20):
        sigma = 0.2 + (3 * num_maps - 0.4) * seed / 19  # spans the valid range (0, 3N)
        sv = np.asarray(ifs.sample_singular_values(jax.random.key(seed), num_maps, jnp.float32(sigma)))
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


def test_perturbation_modes_stay_in_their_ranges():
    base, _ = ifs.sample_ifs(jax.random.key(0))
    labels = jnp.arange(200)
    zeros = jnp.zeros(200, jnp.int32)
    mult = np.asarray(ifs.perturb_classes(jax.random.key(1), base, labels, zeros, 0.1, "multiplicative"))
    ratio = mult / np.asarray(base)[None]
    assert ratio.min() >= 0.9 - 1e-6 and ratio.max() <= 1.1 + 1e-6
    assert ratio.min() < 0.92 and ratio.max() > 1.08  # the whole range is used
    add = np.asarray(ifs.perturb_classes(jax.random.key(1), base, labels, zeros, 0.1, "additive"))
    diff = add - np.asarray(base)[None]
    assert diff.min() >= -0.05 - 1e-6 and diff.max() <= 0.05 + 1e-6 and diff.max() > 0.04
    same = np.asarray(ifs.perturb_classes(jax.random.key(1), base, labels, zeros, 0.0, "multiplicative"))
    np.testing.assert_array_equal(same, np.broadcast_to(base, same.shape))
    # a class's perturbation depends on (label, attempt) only, not on which other classes are drawn with it
    np.testing.assert_array_equal(mult[7], np.asarray(
        ifs.perturb_classes(jax.random.key(1), base, jnp.array([7]), jnp.array([0]), 0.1, "multiplicative"))[0])
    redrawn = ifs.perturb_classes(jax.random.key(1), base, jnp.array([7]), jnp.array([1]), 0.1, "multiplicative")
    assert not np.array_equal(mult[7], np.asarray(redrawn)[0])


def sequential_chain(params: np.ndarray, choices: np.ndarray) -> np.ndarray:
    """The plain chaos game, one step at a time, in float64."""
    x = np.zeros(2)
    points = np.empty((len(choices), 2))
    for t, j in enumerate(choices):
        a, b, c, d, e, f = params[j]
        x = np.array([a * x[0] + b * x[1] + e, c * x[0] + d * x[1] + f])
        points[t] = x
    return points


def occupancy(points: np.ndarray, size: int, pad: int) -> np.ndarray:
    """The rasteriser's normalisation, written independently: per-axis min/max, floor, vertical flip."""
    lo, hi = points.min(0), points.max(0)
    cells = size - 2 * pad
    ij = np.clip(np.floor((points - lo) / (hi - lo) * cells), 0, cells - 1).astype(int)
    grid = np.zeros((size, size), bool)
    grid[size - 1 - pad - ij[:, 1], pad + ij[:, 0]] = True
    return grid


def test_parallel_chain_is_the_sequential_chain():
    base, _ = base_system(SMALL)
    probs = np.asarray(ifs.map_probabilities(base))
    choices = np.random.default_rng(0).choice(2, size=(50, 40), p=probs)
    xs, ys = render.chain_points(base[None], jnp.asarray(choices))
    ours = np.stack([np.asarray(xs)[:, 0, :].T.ravel(), np.asarray(ys)[:, 0, :].T.ravel()], axis=1)
    reference = sequential_chain(np.asarray(base, np.float64), choices.ravel())
    extent = reference.max(0) - reference.min(0)
    assert np.abs(ours - reference).max() < 1e-4 * extent.max()


def test_render_matches_an_independent_100k_step_chain():
    base, _ = base_system(BankSpec(seed=2))
    probs = np.asarray(ifs.map_probabilities(base))
    images, ok = render.render(base[None], jnp.asarray(probs), jax.random.key(5), image_size=64, pad=1,
                               num_points=100_000, draw_mode="point")
    assert bool(ok[0])
    ours = np.asarray(images[0]) > 0
    choices = np.random.default_rng(123).choice(2, size=100_000, p=probs)
    reference = occupancy(sequential_chain(np.asarray(base, np.float64), choices), 64, 1)
    iou = (ours & reference).sum() / (ours | reference).sum()
    assert iou >= 0.9, iou


def test_patch_masks_and_vertical_flip():
    # Two fixed points of x ↦ 0·x + t: the chain alternates between (0, 0) and (1, 1).
    params = jnp.array([[[0.0, 0, 0, 0, 0, 0], [0.0, 0, 0, 0, 1, 1]]])
    xs = jnp.array([0.0, 1.0])[:, None, None]
    ys = jnp.array([0.0, 1.0])[:, None, None]
    valid = jnp.ones((2, 1, 1), bool)
    # masks 0b111111111 at (0, 0) and 0b000000001 at (1, 1): cell 0 lists both points, cells 1-8 the first only
    bits = (jnp.array([0, 1]),) + (jnp.array([0]),) * 8
    img, ok = render.rasterise(xs, ys, valid, bits, image_size=16, pad=2)
    img = np.asarray(img[0])
    assert bool(ok[0]) and params.shape == (1, 2, 6)
    # (0, 0) is bottom-left: row 16-1-2 = 13, col 2, full 3×3 around it
    assert (img[12:15, 1:4] == render.VALUE).all()
    # (1, 1) is top-right: row 2, col 13; bit 0 is the patch's top-left cell
    assert img[1, 12] == render.VALUE
    assert img.sum() == 10 * render.VALUE
    point_img, _ = render.rasterise(xs, ys, valid, None, image_size=16, pad=2)
    assert np.asarray(point_img[0]).sum() == 2 * render.VALUE


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
    # the escaping chain keeps only its few finite steps before overflow (as the public code does): it fails
    # the fill-rate check instead of drawing garbage
    assert set(np.unique(images[1])) <= {0, render.VALUE}
    assert (np.asarray(render.fill_rate(images)) <= BankSpec().fill_threshold).all()


def test_bank_is_bitwise_the_same_on_1_and_4_devices():
    one = build_bank(SMALL, mesh=make_data_mesh(jax.devices()[:1]))
    four = build_bank(SMALL, mesh=make_data_mesh(jax.devices()[:4]))
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
        ("delta", 1.0, "must be < 1 in multiplicative mode"),
        ("num_classes", 0, "num_classes=0 must be > 0"),
        ("image_size", 15, "image_size=15 must be ≥ 16"),
        ("draw_mode", "blob", "draw_mode='blob'"),
        ("perturbation", "scaled", "perturbation='scaled'"),
    ],
)
def test_bad_specs_are_rejected(field, value, message):
    with pytest.raises(ConfigError, match=message):
        BankSpec(**{**SMALL.__dict__, field: value}).validate()


def test_additive_mode_allows_delta_of_one():
    BankSpec(**{**SMALL.__dict__, "delta": 1.0, "perturbation": "additive"}).validate()


def test_patch_bits_follow_the_mask_sequence():
    key = jax.random.key(3)
    masks = np.asarray(render.mask_sequence(key, 20)).reshape(4, 5)  # 4 chunks of 5 steps
    bits = render.patch_bits(key, 20, num_chunks=4)
    for cell in range(9):
        on = {(i % 4) * 5 + i // 4 for i in bits[cell]}  # rasteriser index k·C + c -> step c·K + k
        assert on == {t for t in range(20) if masks.reshape(-1)[t] >> cell & 1}
