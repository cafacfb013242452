"""What the compiled training programs hold: no large constants (the bank and pre-trained weights are arguments),
no loop whose trip count depends on the data (mixup/cutmix's λ comes from a table), and the λ that table gives."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.scipy.special import betainc
from scipy.special import betaincinv

from benchmarks import compile_cost
from benchmarks.compile_cost import (
    bench_config,
    large_constants,
    lower_pretrain_step,
    pretrain_step,
    while_trip_counts,
)
from onepfrac_jax.data.augment import _beta_symmetric
from onepfrac_jax.parallel.mesh import make_data_mesh
from onepfrac_jax.train import loop

pytestmark = pytest.mark.slow  # the fast tier leaves this file out (pyproject.toml, markers)

MB = 1 << 20
# The loops a CPU lowering of the pre-train step keeps, all of a static trip count: threefry2x32's 5 rounds of
# 4 (JAX rolls them into a loop on CPU only), RandAugment's scan over its num_layers=2 layers (one compiled
# layer), and in fresh mode the chaos game's scans (render.py). None of them waits on the data.
THREEFRY_ROUNDS = 5


def _bisection_quantile(u, alpha):
    """The quantile the step used before: 32 bisection steps on betainc (itself a while loop until converged)."""

    def halve(_, bounds):
        low, high = bounds
        mid = 0.5 * (low + high)
        below = betainc(alpha, alpha, mid) < u
        return jnp.where(below, mid, low), jnp.where(below, high, mid)

    low, high = jax.lax.fori_loop(0, 32, halve, (jnp.float32(0.0), jnp.float32(1.0)))
    return 0.5 * (low + high)


# ---------------------------------------------------------------- constants


def test_the_pretrain_step_takes_the_bank_as_an_argument_not_a_constant():
    config = bench_config(num_classes=256, render_size=256)  # a 2 MB bank: 256² binary pixels packed 8 a byte
    before = large_constants(lower_pretrain_step(config, "random", closed=True).as_text(), MB)
    assert before == [("256x256x32xui8", 2 * MB)]  # the old code's closure: the check sees the bank
    text = lower_pretrain_step(config, "random").as_text()
    assert large_constants(text, MB) == []
    main = next(line for line in text.splitlines() if "func.func public @main(" in line)
    assert "tensor<256x256x32xui8>" in main  # the bank is one of the step's parameters


def test_the_bank_as_an_argument_gives_the_closed_over_steps_bits():
    config = bench_config(num_classes=16, render_size=64)
    outputs = []
    for closed in (True, False):
        step_fn, args = pretrain_step(config, "random", closed=closed, abstract_state=False)
        for _ in range(2):
            state, metrics = step_fn(*args)
            args = (state, *args[1:])
        outputs.append(jax.device_get((state, metrics)))
    for before, now in zip(*(jax.tree.leaves(o) for o in outputs), strict=True):
        np.testing.assert_array_equal(now, before)


def test_the_fresh_mode_step_takes_the_class_systems_as_an_argument():
    maps = bench_config(8, 32).num_maps
    classes = 2 * MB // (maps * 6 * 4)  # (L, maps, 6) float32: 2 MB
    config = bench_config(num_classes=classes, render_size=32)
    config.update({"data_mode": "fresh", "num_points": 2000})
    before = large_constants(lower_pretrain_step(config, "random", closed=True).as_text(), MB)
    assert [kind for kind, _ in before] == [f"{classes}x{maps}x6xf32"]
    assert large_constants(lower_pretrain_step(config, "random").as_text(), MB) == []


def test_initial_weights_are_an_argument_of_the_init_and_come_back_bitwise():
    """Fine-tuning's pre-trained params (Task.initial): closed over, they were constants of the jitted init."""
    weights = {"w": np.random.default_rng(0).normal(size=(512, 1024)).astype(np.float32)}  # 2 MB
    task = loop.Task(init_variables=lambda key, initial: {"params": initial}, make_batch=None, loss_fn=None,
                     inputs=None, evaluate=None, export=None, steps_per_epoch=1, initial=weights)
    tx = optax.adamw(1e-3)
    state = loop.init_state(task, tx, 0, make_data_mesh(jax.devices()[:2]))
    np.testing.assert_array_equal(np.asarray(state.params["w"]), weights["w"])
    root = jax.random.key(0)
    assert large_constants(jax.jit(loop._make_init(task, tx)).lower(weights, root).as_text(), MB) == []
    closed = dataclasses.replace(task, init_variables=lambda key: {"params": weights}, initial=None)
    assert large_constants(jax.jit(loop._make_init(closed, tx)).lower(None, root).as_text(), MB) == [
        ("512x1024xf32", 2 * MB)]


# ---------------------------------------------------------------- seeds


def test_runs_that_differ_only_in_their_seed_share_one_step_and_one_init():
    """The root key and the data-order key are arguments of the programs, not constants: a grid's seeds compile
    one step and one init (docs/reproducibility.md)."""
    mesh = make_data_mesh(jax.devices()[:1])
    texts, params, requests, hits = [], [], [], []
    listener = lambda event, **_: (requests if event.endswith("compile_requests_use_cache") else
                                   hits if event.endswith("cache_hits") else []).append(event)
    for seed in (0, 1):
        config = bench_config(num_classes=8, render_size=32)
        config.seed = seed
        step_fn, args = pretrain_step(config, mesh=mesh)
        texts.append(step_fn.lower(*args).as_text())
        task = compile_cost.pretrain_task(config, "zeros", mesh)
        tx = loop.jit_train_step(task, config, mesh, config.total_steps)[1]
        jax.monitoring.register_event_listener(listener)
        try:
            state = loop.init_state(task, tx, seed, mesh)  # a jit of its own: a compile request, or a cache hit
        finally:
            jax.monitoring.unregister_event_listener(listener)
        params.append(jax.device_get(state.params))
    assert texts[0] == texts[1]
    assert not all(np.array_equal(a, b) for a, b in zip(*map(jax.tree.leaves, params), strict=True))  # still keyed
    assert len(requests) == 2 and len(hits) >= 1  # seed 1's init is seed 0's program, read back from the cache


# ---------------------------------------------------------------- loops


def test_the_while_checker_tells_counted_loops_from_data_dependent_ones():
    counted = jax.jit(lambda x: jax.lax.fori_loop(0, 7, lambda i, y: y * 2, x)).lower(1.0).as_text()
    assert while_trip_counts(counted) == [7]
    scanned = jax.jit(lambda x: jax.lax.scan(lambda c, _: (c + 1, None), x, length=3)[0]).lower(1.0).as_text()
    assert while_trip_counts(scanned) == [3]
    until = jax.jit(lambda x: jax.lax.while_loop(lambda y: y < 10, lambda y: y * 2, x)).lower(1.0).as_text()
    assert while_trip_counts(until) == [None]
    # The old λ: the bisection's 32 steps are counted, betainc's continued fraction inside is not.
    old = jax.jit(lambda u: _bisection_quantile(u, 0.8)).lower(0.3).as_text()
    assert sorted(while_trip_counts(old), key=str) == [32, None]


@pytest.mark.parametrize("data_mode", ["bank", "fresh"])
def test_the_pretrain_step_has_no_data_dependent_loop(data_mode):
    config = bench_config(num_classes=8, render_size=64)
    # The paper's whole augmentation: RandAugment, erasing, mixup and cutmix (each λ a Beta quantile).
    config.augment.update({"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.5, "mixup_alpha": 0.8,
                           "cutmix_alpha": 1.0, "switch_prob": 0.5})
    config.update({"data_mode": data_mode, "num_points": 2000})
    trips = while_trip_counts(lower_pretrain_step(config).as_text())
    assert None not in trips, trips
    if data_mode == "bank":
        assert set(trips) <= {THREEFRY_ROUNDS, 2} and trips.count(2) == 1, trips


# ---------------------------------------------------------------- the λ table


@pytest.mark.parametrize("alpha", [0.8, 1.0])
def test_the_beta_quantile_matches_scipy_and_the_old_bisection(alpha):
    u = np.concatenate([np.linspace(0, 1, 4001, endpoint=False),
                        [1e-7, 1e-5, 0.5 - 1e-7, 0.5, 1 - 1e-7, 1 - 2**-24]]).astype(np.float32)
    new = np.asarray(jax.jit(jax.vmap(lambda v: _beta_symmetric(v, alpha)))(u))
    exact = betaincinv(alpha, alpha, u.astype(np.float64))
    # The table interpolates to < 5e-7; float32 rounding adds about 1e-7.
    np.testing.assert_allclose(new, exact, rtol=0, atol=1e-6)
    # The bisection was itself only as good as float32 betainc: 2.6e-6 off at α = 0.8.
    old = np.asarray(jax.jit(jax.vmap(lambda v: _bisection_quantile(v, alpha)))(u))
    np.testing.assert_allclose(new, old, rtol=0, atol=5e-6)
    assert np.all((new >= 0) & (new <= 1))
    if alpha == 1.0:
        np.testing.assert_allclose(new, u, rtol=0, atol=1e-7)  # Beta(1, 1) is uniform


@pytest.mark.parametrize("alpha", [0.1, 0.2, 0.4, 2.0, 5.0])
def test_the_beta_quantile_holds_for_other_alphas(alpha):
    u = np.linspace(0, 1, 2001, endpoint=False).astype(np.float32)
    new = np.asarray(jax.jit(jax.vmap(lambda v: _beta_symmetric(v, alpha)))(u))
    np.testing.assert_allclose(new, betaincinv(alpha, alpha, u.astype(np.float64)), rtol=0, atol=1e-6)
    assert np.all(np.diff(new) >= 0)  # a quantile: non-decreasing in u
