"""Where the pre-train bank lives, measured: `python -m benchmarks.bank_layout`.

    python -m benchmarks.bank_layout [--devices 4 --classes 2000 --size 512 --batch-per-device 32]

Every step gathers its batch's rows of the rendered bank (R, S, S) on the devices. Four ways to keep the bank, each
timed as a jitted program that takes keyed random rows (sharded over `data`, as pre-training's) and returns the
batch's (B, S, S) uint8 canvases sharded over `data`:
  - replicated bytes: every device holds the whole bank as rendered (before the bank was packed);
  - replicated bits: `bank_task.packed_bank`'s layout (what pre-training keeps), unpacked after the gather;
  - sharded bytes / sharded bits: the bank split over `data` (1/D of it a device); the gather then needs a
    collective (XLA's choice, counted in the table from the compiled program's collective ops).
All four give the same batch bit for bit (checked before timing). The table prints bank bytes per device, the
median milliseconds per batch, and the collectives. On a CPU the devices are host threads (`--devices` of them,
`jax_num_cpu_devices`) sharing one memory, so a collective costs a memory copy, not an interconnect transfer: the
timings rank the layouts' local work, and the collectives column says what a GPU run would add on NVLink / the
network. On a GPU host, run the same command without --devices.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from collections.abc import Callable

import jax
import numpy as np

from benchmarks.load import load_average

LAYOUTS = ("replicated bytes", "replicated bits", "sharded bytes", "sharded bits")
_COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


def gather_program(layout: str, mesh, batch: int) -> Callable:
    """The jitted (bank, key) -> (B, S, S) uint8 batch of keyed random rows for one layout (bank already placed)."""
    from onepfrac_jax.fractals import render
    from onepfrac_jax.parallel.mesh import data_sharding

    sharding = data_sharding(mesh)

    def gather(bank: jax.Array, key: jax.Array) -> jax.Array:
        rows = jax.lax.with_sharding_constraint(jax.random.randint(key, (batch,), 0, bank.shape[0]), sharding)
        picked = bank[rows]
        return render.unpack_images(picked) if layout.endswith("bits") else picked

    return jax.jit(gather, out_shardings=sharding)


def place_bank(layout: str, images: np.ndarray, mesh) -> jax.Array:
    """The (R, S, S) {0, VALUE} bank as `layout` keeps it on the mesh, placed as rendered (split over `data`) first;
    replicated bits are `bank_task.packed_bank`'s own."""
    from onepfrac_jax.fractals import render
    from onepfrac_jax.parallel.mesh import data_sharding, replicated
    from onepfrac_jax.train import bank_task

    rendered = jax.device_put(images, data_sharding(mesh))
    if layout == "replicated bits":
        return bank_task.packed_bank(rendered, mesh)
    if layout == "sharded bits":
        return jax.jit(render.pack_images, out_shardings=data_sharding(mesh))(rendered)
    return rendered if layout == "sharded bytes" else jax.device_put(images, replicated(mesh))


def collectives(compiled: jax.stages.Compiled) -> str:
    """The compiled program's collective ops by kind, with the MB each device's results of that kind hold
    ('none' if it has none)."""
    found: dict[str, float] = {}
    for dtype, dims, op in re.findall(rf"= (\w+)\[([\d,]*)\]\S* ({'|'.join(_COLLECTIVES)})(?:-start)?\(",
                                      compiled.as_text()):
        element = 1 if dtype == "pred" else int(re.sub(r"\D", "", dtype)) // 8  # u8 → 1, s32 → 4, bf16 → 2
        size = np.prod([int(d) for d in dims.split(",") if d]) * element
        found[op] = found.get(op, 0.0) + size / 2**20
    return ", ".join(f"{op} {mb:.3g} MB" for op, mb in found.items()) or "none"


def measure(images: np.ndarray, mesh, batch: int, steps: int) -> list[dict]:
    """One row per layout; raises if a layout's batch differs from the replicated bytes'."""
    key = jax.random.key(0)
    rows, reference = [], None
    for layout in LAYOUTS:
        bank = place_bank(layout, images, mesh)
        program = gather_program(layout, mesh, batch)
        compiled = program.lower(bank, key).compile()
        out = np.asarray(compiled(bank, key))
        if reference is None:
            reference = out
        elif not np.array_equal(out, reference):
            raise AssertionError(f"{layout}: the batch differs from the replicated bytes' one")
        times = []
        for step in range(steps + 1):  # the first call is warm-up
            step_key = jax.random.fold_in(key, step)
            start = time.perf_counter()
            jax.block_until_ready(compiled(bank, step_key))
            times.append(time.perf_counter() - start)
        shard = bank.addressable_shards[0].data
        rows.append({"layout": layout, "mb_device": shard.nbytes / 2**20, "ms": 1e3 * statistics.median(times[1:]),
                     "collectives": collectives(compiled)})
        del bank
    return rows


def random_bank(classes: int, size: int) -> np.ndarray:
    """A bank of the rendered kind: each pixel 0 or render.VALUE (the gather's cost does not depend on which)."""
    from onepfrac_jax.fractals import render

    rng = np.random.default_rng(0)
    return np.where(rng.integers(0, 5, (classes, size, size), np.uint8) == 0, render.VALUE, 0).astype(np.uint8)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=4, help="CPU devices to simulate (a GPU/TPU host: its own)")
    parser.add_argument("--classes", type=int, default=2000, help="bank rows")
    parser.add_argument("--size", type=int, default=512, help="canvas side (the paper's 512)")
    parser.add_argument("--batch-per-device", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed batches (median)")
    args = parser.parse_args(argv)
    if args.size % 8:
        parser.error("--size must be a multiple of 8 (bits are packed 8 pixels a byte)")
    jax.config.update("jax_num_cpu_devices", args.devices)  # before any JAX operation; a GPU's count is its own
    from onepfrac_jax.parallel.mesh import make_data_mesh

    mesh = make_data_mesh()
    batch = args.batch_per_device * mesh.size
    images = random_bank(args.classes, args.size)
    load = load_average()
    print(f"{mesh.size} × {jax.devices()[0].device_kind} ({jax.default_backend()}); bank {args.classes} × "
          f"{args.size}² ({images.nbytes / 2**20:,.0f} MB as bytes); batch {batch} ({args.batch_per_device} a "
          f"device); median of {args.steps}; load average {load}\n")
    print("| bank kept as | MB a device | ms per batch | collectives in the program (MB of results a device) |\n"
          "|---|---:|---:|---|")
    for row in measure(images, mesh, batch, args.steps):
        print(f"| {row['layout']} | {row['mb_device']:,.1f} | {row['ms']:.2f} | {row['collectives']} |", flush=True)


if __name__ == "__main__":
    main()
