"""Renderer benchmark: images/s at 512² per batch size, and the wall time of the 1,000-class bank.

  python -m onepfrac_jax.fractals.bench                # all host cores as CPU devices
  python -m onepfrac_jax.fractals.bench --classes 1000 --batches 16,64,256

The baseline row is a plain NumPy renderer (a sequential 100k-step chain per image, one core), measured in the
same run, so the speed-up column compares like with like on this machine.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def numpy_render(params: np.ndarray, probs: np.ndarray, rng: np.random.Generator, size: int, pad: int,
                 num_points: int) -> np.ndarray:
    """The sequential chaos game and patch drawing, as the public NumPy/PIL code does it (vectorised writes)."""
    choices = rng.choice(len(probs), size=num_points, p=probs)
    masks = rng.integers(1, 512, size=num_points)
    points = np.empty((num_points, 2))
    x = y = 0.0
    for t, j in enumerate(choices):
        a, b, c, d, e, f = params[j]
        x, y = a * x + b * y + e, c * x + d * y + f
        points[t] = x, y
    lo, span = points.min(0), np.ptp(points, axis=0)
    cells = size - 2 * pad
    ij = np.clip(np.floor((points - lo) / span * cells), 0, cells - 1).astype(int)
    rows, cols = size - 1 - pad - ij[:, 1], pad + ij[:, 0]
    image = np.zeros((size, size), np.uint8)
    for bit in range(9):
        on = (masks >> bit) & 1 == 1
        image[rows[on] + bit // 3 - 1, cols[on] + bit % 3 - 1] = 127
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="16,32,64,256", help="classes per device call")
    parser.add_argument("--classes", type=int, default=1000, help="bank size for the wall-time row")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--cpu_devices", type=int, default=os.cpu_count(), help="CPU devices (one per core)")
    parser.add_argument("--numpy_images", type=int, default=2)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    from onepfrac_jax.fractals import ifs
    from onepfrac_jax.fractals.bank import BankSpec, _sharded_renderer, base_system, build_bank, patch_bits, render_key
    from onepfrac_jax.parallel.mesh import data_sharding, make_data_mesh

    mesh = make_data_mesh()
    spec = BankSpec(image_size=args.size, num_points=args.points)
    base, _ = base_system(spec)
    probs = ifs.map_probabilities(base)
    renderer = _sharded_renderer(mesh, spec.image_size, spec.pad, spec.num_points)
    bits = patch_bits(spec)
    devices = mesh.devices.size
    print(f"backend {jax.default_backend()}, {devices} devices ({jax.devices()[0].device_kind}), "
          f"{args.size}², {args.points:,} points/image, draw mode patch\n")
    print("| renderer | classes per call | images/s | speed-up vs NumPy |\n|---|---:|---:|---:|")

    rng = np.random.default_rng(0)
    base_np, probs_np = np.asarray(base, np.float64), np.asarray(probs, np.float64)
    start = time.perf_counter()
    for _ in range(args.numpy_images):
        numpy_render(base_np, probs_np / probs_np.sum(), rng, args.size, spec.pad, args.points)
    numpy_rate = args.numpy_images / (time.perf_counter() - start)
    print(f"| NumPy sequential chain (1 core) | 1 | {numpy_rate:.2f} | 1.0× |")

    for batch in (int(b) for b in args.batches.split(",")):
        batch = -(-batch // devices) * devices
        params = ifs.perturb_classes(jax.random.key(1), base, jnp.arange(batch), jnp.zeros(batch, jnp.int32),
                                     spec.delta, spec.perturbation)
        params = jax.device_put(params, data_sharding(mesh))
        jax.block_until_ready(renderer(params, probs, render_key(spec.seed), bits))  # compile
        reps = max(1, 512 // batch)
        start = time.perf_counter()
        for _ in range(reps):
            out = renderer(params, probs, render_key(spec.seed), bits)
        jax.block_until_ready(out)
        rate = reps * batch / (time.perf_counter() - start)
        print(f"| JAX sharded over {devices} devices | {batch} | {rate:.1f} | {rate / numpy_rate:,.0f}× |")

    start = time.perf_counter()
    bank = build_bank(BankSpec(num_classes=args.classes, image_size=args.size, num_points=args.points))
    jax.block_until_ready(bank.images)
    wall = time.perf_counter() - start
    print(f"\n{args.classes}-class bank at {args.size}²: {wall:.1f} s wall (compiles, fill-rate re-draws of "
          f"{int((bank.redraws > 0).sum())} classes and the base-system check included)")


if __name__ == "__main__":
    main()
