"""Throughput of the on-device augmentation: `python -m onepfrac_jax.data.bench_augment`.

Prints one row per case: the full pre-training augmentation of SPEC §A4 (RandomResizedCrop, flips,
RandAugment rand-m9-mstd0.5-inc1, erasing, mixup/cutmix, label smoothing; colour jitter forced on, which
timm would skip under RandAugment, so the figure is an upper bound on the work) and the eval transform, on
whatever device JAX picks. Timings exclude compilation (reported apart) and are the median of a few calls;
on a shared machine they are noisy.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from onepfrac_jax.data.augment import (
    AugmentConfig,
    augment_batch,
    augment_config,
    default_augment_config,
    eval_transform,
)

REPEATS = 3
NUM_CLASSES = 1000


def pretrain_config(size: int) -> AugmentConfig:
    """SPEC §A4's augmentation at output size `size`."""
    c = default_augment_config()
    c.update(
        dict(
            size=size,
            crop="rrc",
            interpolation="bicubic",
            hflip=0.5,
            vflip=0.5,
            auto_augment="rand-m9-mstd0.5-inc1",
            color_jitter=0.4,
            force_color_jitter=True,
            re_prob=0.5,
            mixup_alpha=0.8,
            cutmix_alpha=1.0,
            label_smoothing=0.1,
        )
    )
    return augment_config(c)


def eval_config(size: int, crop_pct: float) -> AugmentConfig:
    """timm's eval transform at output size `size`, bicubic."""
    c = default_augment_config()
    c.update(dict(size=size, interpolation="bicubic", crop_pct=crop_pct))
    return augment_config(c)


def _time(fn, *args) -> tuple[float, float]:
    """(compile + first call seconds, median seconds per later call)."""
    start = time.perf_counter()
    jax.block_until_ready(fn(0, *args))
    first = time.perf_counter() - start
    times = []
    for step in range(1, REPEATS + 1):
        start = time.perf_counter()
        jax.block_until_ready(fn(step, *args))
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def bench_train(batch: int, in_size: int, out_size: int) -> tuple[float, float]:
    cfg = pretrain_config(out_size)
    seed_key = jax.random.key(0)
    step_fn = jax.jit(
        lambda step, x, y, i: augment_batch(cfg, jax.random.fold_in(seed_key, step), x, y, i, NUM_CLASSES)
    )
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (batch, in_size, in_size, 3), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, NUM_CLASSES, batch))
    return _time(step_fn, images, labels, jnp.arange(batch))


def bench_eval(batch: int, in_size: int, out_size: int, crop_pct: float) -> tuple[float, float]:
    cfg = eval_config(out_size, crop_pct)
    fn = jax.jit(lambda step, x: eval_transform(cfg, x))
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, in_size, in_size, 3), dtype=np.uint8))
    return _time(fn, images)


def main() -> None:
    device = jax.devices()[0]
    print(f"device: {device.device_kind} × {jax.device_count()} ({device.platform}), jax {jax.__version__}")
    print(
        f"{'transform':<28} {'input':>6} {'output':>6} {'batch':>6} {'compile s':>10} {'ms/batch':>9} {'images/s':>9}"
    )
    cases = [
        ("pre-train (SPEC §A4)", bench_train, (32, 64, 64)),
        ("pre-train (SPEC §A4)", bench_train, (128, 64, 64)),
        ("pre-train (SPEC §A4)", bench_train, (32, 256, 224)),
        ("eval, crop_pct 0.875", bench_eval, (64, 256, 224, 0.875)),
        ("eval, CIFAR 32 → 224", bench_eval, (64, 32, 224, 1.0)),
    ]
    for name, fn, args in cases:
        batch, in_size, out_size = args[:3]
        first, per_call = fn(*args)
        print(
            f"{name:<28} {in_size:>6} {out_size:>6} {batch:>6} {first:>10.1f} {per_call * 1e3:>9.1f} "
            f"{batch / per_call:>9.0f}"
        )


if __name__ == "__main__":
    main()
