"""Throughput of the on-device augmentation: `python -m benchmarks.augment_speed`.

Prints one row per case: the full pre-training augmentation of SPEC §A4 (RandomResizedCrop, flips,
RandAugment rand-m9-mstd0.5-inc1, erasing, mixup/cutmix, label smoothing; colour jitter forced on, which
timm would skip under RandAugment, so the figure is an upper bound on the work) and the eval transform, on
whatever device JAX picks. The 'in' column says what goes in: RGB images, or grey ones — the fractal banks' —
which augment_batch keeps on one channel while that is exact; the 'RGB repeat' rows feed the same grey images
repeated to three channels, the way the pre-train step did before, so each pair is the before/after of that
change measured in one run. Timings exclude compilation (reported apart) and are the median of a few calls;
on a shared machine they are noisy (the load average is printed).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.load import load_average
from onepfrac_jax.data.augment import (
    AugmentConfig,
    augment_batch,
    augment_config,
    default_augment_config,
    eval_transform,
)

REPEATS = 3
NUM_CLASSES = 1000


def pretrain_config(size: int, rand_augment: bool = True) -> AugmentConfig:
    """SPEC §A4's augmentation at output size `size` (without RandAugment: what RandAugment costs)."""
    c = default_augment_config()
    c.update(
        dict(
            size=size,
            crop="rrc",
            interpolation="bicubic",
            hflip=0.5,
            vflip=0.5,
            auto_augment="rand-m9-mstd0.5-inc1" if rand_augment else "",
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


def _images(batch: int, in_size: int, kind: str) -> jax.Array:
    """'rgb': random RGB levels; 'grey': binary 0/255 images like a bank's; 'RGB repeat': those, as three channels."""
    rng = np.random.default_rng(0)
    if kind == "rgb":
        return jnp.asarray(rng.integers(0, 256, (batch, in_size, in_size, 3), dtype=np.uint8))
    grey = np.where(rng.random((batch, in_size, in_size)) < 0.3, 255, 0).astype(np.uint8)
    return jnp.asarray(grey if kind == "grey" else np.repeat(grey[..., None], 3, axis=-1))


def bench_train(kind: str, batch: int, in_size: int, out_size: int, rand_augment: bool = True) -> tuple[float, float]:
    cfg = pretrain_config(out_size, rand_augment)
    seed_key = jax.random.key(0)
    step_fn = jax.jit(
        lambda step, x, y, i: augment_batch(cfg, jax.random.fold_in(seed_key, step), x, y, i, NUM_CLASSES)
    )
    rng = np.random.default_rng(0)
    images = _images(batch, in_size, kind)
    labels = jnp.asarray(rng.integers(0, NUM_CLASSES, batch))
    return _time(step_fn, images, labels, jnp.arange(batch))


def bench_eval(kind: str, batch: int, in_size: int, out_size: int, crop_pct: float) -> tuple[float, float]:
    cfg = eval_config(out_size, crop_pct)
    fn = jax.jit(lambda step, x: eval_transform(cfg, x))
    return _time(fn, _images(batch, in_size, kind))


def main() -> None:
    device = jax.devices()[0]
    load = load_average()
    print(f"device: {device.device_kind} × {jax.device_count()} ({device.platform}), jax {jax.__version__}; "
          f"load average {load}")
    print(
        f"{'transform':<22} {'in':<10} {'input':>6} {'output':>6} {'batch':>6} {'compile s':>10} {'ms/batch':>9} "
        f"{'images/s':>9}"
    )
    cases = [
        ("pre-train (SPEC §A4)", bench_train, ("rgb", 32, 64, 64)),
        ("pre-train (SPEC §A4)", bench_train, ("rgb", 128, 64, 64)),
        ("pre-train (SPEC §A4)", bench_train, ("rgb", 32, 256, 224)),
        ("pre-train (SPEC §A4)", bench_train, ("RGB repeat", 32, 512, 224)),
        ("pre-train (SPEC §A4)", bench_train, ("grey", 32, 512, 224)),
        ("… without RandAugment", bench_train, ("grey", 32, 512, 224, False)),
        ("eval, crop_pct 0.875", bench_eval, ("rgb", 64, 256, 224, 0.875)),
        ("eval, crop_pct 0.875", bench_eval, ("RGB repeat", 64, 512, 224, 0.875)),
        ("eval, crop_pct 0.875", bench_eval, ("grey", 64, 512, 224, 0.875)),
        ("eval, CIFAR 32 → 224", bench_eval, ("rgb", 64, 32, 224, 1.0)),
    ]
    for name, fn, args in cases:
        kind, batch, in_size, out_size = args[:4]
        first, per_call = fn(*args)
        print(
            f"{name:<22} {kind:<10} {in_size:>6} {out_size:>6} {batch:>6} {first:>10.1f} {per_call * 1e3:>9.1f} "
            f"{batch / per_call:>9.0f}"
        )


if __name__ == "__main__":
    main()
