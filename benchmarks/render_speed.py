"""Renderer benchmark: ours per image vs the plain NumPy + Pillow reference, the 1,000-class bank, and `generate`.

  python -m benchmarks.render_speed                # all host cores as CPU devices
  python -m benchmarks.render_speed --classes 1000 --batches 8,16,32,64 --reference_images 3

Rows, all measured in this run on this machine:
  - ours: ms per image at 512² (100,000 points, patch drawing), per classes-per-call, sharded over all devices;
  - the reference (`fractals/reference.py`: a sequential float64 chain and Pillow's paste, as the public code
    draws), ms per image on one core, and the ratio;
  - the wall time of building the bank (first call in this process: compiles and re-draws included);
  - the `generate` stage end to end in a fresh process (process start to the last file written).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.load import load_average


def time_generate(classes: int) -> float:
    """Seconds from starting `python main.py --config configs/generate.py` to its exit, in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "onepfrac_jax.main", "--config", "configs/generate.py",
                        "--workdir", str(Path(tmp) / "gen"), f"--config.num_classes={classes}"],
                       check=True, capture_output=True)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="8,16,32,64", help="classes per device call")
    parser.add_argument("--classes", type=int, default=1000, help="bank size for the bank and generate rows")
    parser.add_argument("--cpu_devices", type=int, default=os.cpu_count(), help="CPU devices (one per core)")
    parser.add_argument("--reference_images", type=int, default=3)
    args = parser.parse_args()

    generate_wall = time_generate(args.classes)  # first, in its own process: nothing compiled or cached here yet

    import jax

    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    from onepfrac_jax.fractals import ifs, reference, render
    from onepfrac_jax.fractals.bank import (
        BankSpec,
        base_system,
        build_bank,
        class_inputs,
        render_options,
        shared_choice_renderer,
    )
    from onepfrac_jax.parallel.mesh import data_sharding, make_data_mesh

    start = time.perf_counter()
    bank = build_bank(BankSpec(num_classes=args.classes))
    jax.block_until_ready(bank.images)
    bank_wall = time.perf_counter() - start

    mesh = make_data_mesh()
    spec = BankSpec()
    base, _ = base_system(spec)
    probs = ifs.map_probabilities(base)
    choices = render.choice_sequence(jax.random.key(0), probs, spec.num_points - 1)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(args.reference_images):
        reference.render(np.asarray(base, np.float64), np.asarray(probs, np.float64), spec.image_size, spec.pad,
                         spec.num_points, spec.draw_mode, rng)
    reference_ms = (time.perf_counter() - start) / args.reference_images * 1e3

    devices = mesh.devices.size
    print(f"backend {jax.default_backend()}, {devices} devices ({jax.devices()[0].device_kind}), "
          f"{spec.image_size}², {spec.num_points:,} points/image, draw mode {spec.draw_mode}; "
          f"load average {load_average()}\n")
    print("| renderer | classes per call | ms per image | reference ÷ ours |\n|---|---:|---:|---:|")
    print(f"| reference: float64 chain + Pillow paste (1 core) | 1 | {reference_ms:.0f} | 1.0 |")
    renderer = shared_choice_renderer(mesh, **render_options(spec))
    sharded = data_sharding(mesh)
    for batch in (int(b) for b in args.batches.split(",")):
        batch = -(-batch // devices) * devices
        labels = jax.numpy.arange(batch)
        params, mask_keys = class_inputs(spec, base, labels, 0 * labels, labels >= 0)
        inputs = (jax.device_put(params, sharded), choices, jax.device_put(mask_keys, sharded))
        jax.block_until_ready(renderer(*inputs))  # compile
        reps = max(2, 256 // batch)
        start = time.perf_counter()
        for _ in range(reps):
            out = renderer(*inputs)
        jax.block_until_ready(out)
        ms = (time.perf_counter() - start) / (reps * batch) * 1e3
        print(f"| ours, sharded over {devices} devices | {batch} | {ms:.1f} | {reference_ms / ms:,.0f} |")

    print(f"\n{args.classes}-class bank at {spec.image_size}²: {bank_wall:.1f} s wall (compiles and fill-rate "
          f"re-draws of {int((bank.redraws > 0).sum())} classes included)")
    print(f"`generate` of {args.classes} classes, process start to exit: {generate_wall:.1f} s")


if __name__ == "__main__":
    main()
