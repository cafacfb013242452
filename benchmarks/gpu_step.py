"""The pre-train step on whatever accelerator is present: `python -m benchmarks.gpu_step`.

    python -m benchmarks.gpu_step                                  # GPU/TPU: the paper's sizes, 128 a device
    python -m benchmarks.gpu_step --models paper_vit_tiny --steps 2   # CPU defaults (32², 2 a device): as CI

One row per model — ViT-Ti/16 on 1,000 classes (`paper_vit_tiny`) and ViT-B/16 on 21,000 (`paper_vit_base_21k`),
their recipes' augmentation, dtype and attention kernel as `auto` resolves them here — of the loop's own jitted
update step (loop.jit_train_step over bank_task.make_task, a zeros bank of the configured shape, packed to bits as
pretrain.run keeps it): images/s and ms per step (median of --steps timed steps after --warmup), the data share (the
step's make_batch — gather, unpack, augmentation, mixup — jitted alone, its median time over the step's), and MFU:
the model's FLOPs per step (`compiled.cost_analysis()` of its forward + backward on one device's batch: what the
step must do whatever the implementation) over the step's time and the device's dense bfloat16/float16 peak
(PEAK_TFLOPS, by device kind; an unknown device prints "peak unknown"). On a CPU the defaults are small
(--image-size 32, 2 a device) so the script stays a smoke test of itself there.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks.load import load_average

# Dense bfloat16/float16 tensor-core peaks, TFLOP/s per device (the vendors' figures; H200 has H100's compute).
PEAK_TFLOPS = {"V100": 125.0, "A100": 312.0, "H100": 989.0, "H200": 989.0}
MODELS = (("ViT-Ti/16, 1k", "paper_vit_tiny"), ("ViT-B/16, 21k", "paper_vit_base_21k"))


def peak_tflops(device_kind: str) -> float | None:
    """The PEAK_TFLOPS entry whose name the device kind contains (e.g. 'NVIDIA H100 80GB HBM3'), else None."""
    return next((peak for name, peak in PEAK_TFLOPS.items() if name in device_kind.upper()), None)


def flops_of(compiled: jax.stages.Compiled) -> float:
    """The 'flops' of a compiled program's cost analysis (a dict, or a list of one per program in older JAX)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost["flops"])


def _median_ms(fn, steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure(variant: str, image_size: int, batch_per_device: int, steps: int, warmup: int) -> dict:
    """One model's row: see the module docstring."""
    from onepfrac_jax.configs import pretrain as pretrain_configs

    from benchmarks.compile_cost import pretrain_task
    from onepfrac_jax.models import resolve_dtype
    from onepfrac_jax.parallel.mesh import make_data_mesh
    from onepfrac_jax.train import classify, loop

    config = pretrain_configs.get_config(variant)
    devices = jax.device_count()
    config.update(dict(image_size=image_size, render_size=image_size, batch_size=batch_per_device * devices,
                       dtype=resolve_dtype(config.dtype), total_steps=10_000))
    mesh = make_data_mesh(jax.devices())
    task = pretrain_task(config, "zeros", mesh)
    step_fn, tx = loop.jit_train_step(task, config, mesh, config.total_steps)
    state = loop.init_state(task, tx, config.seed, mesh)

    holder = {"state": state}

    def step():
        holder["state"], metrics = step_fn(holder["state"], None, task.resident)
        return metrics

    data_key, model_key = loop.step_keys(config.seed, jnp.int32(0))
    make_batch = jax.jit(task.make_batch)
    batch_of = lambda: make_batch(data_key, None, jnp.int32(0), task.resident)
    for _ in range(warmup):
        step()
        batch_of()
    step_ms, data_ms = _median_ms(step, steps), _median_ms(batch_of, steps)

    # the model's FLOPs: forward + backward on one device's share of the batch
    one = jax.tree.map(lambda x: x[:batch_per_device], jax.device_get(batch_of()))
    grad = jax.jit(jax.grad(lambda p: task.loss_fn(p, holder["state"].extra, one, model_key)[0]))
    flops = flops_of(grad.lower(jax.device_get(holder["state"].params)).compile())
    peak = peak_tflops(jax.devices()[0].device_kind)
    return {"model": variant, "dtype": config.dtype, "attention": classify.build_vit(config, 1).attention_impl,
            "batch": config.batch_size, "ms_step": step_ms,
            "images_s": config.batch_size / step_ms * 1e3, "data_share": data_ms / step_ms,
            "tflop_step_device": flops / 1e12,
            "mfu": None if peak is None else flops / (step_ms / 1e3) / (peak * 1e12)}


def main(argv: list[str] | None = None) -> None:
    on_cpu = jax.default_backend() == "cpu"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=32 if on_cpu else 224)
    parser.add_argument("--batch-per-device", type=int, default=2 if on_cpu else 128)
    parser.add_argument("--steps", type=int, default=3 if on_cpu else 20, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=1 if on_cpu else 3)
    parser.add_argument("--models", default=",".join(v for _, v in MODELS), help="comma-separated config variants")
    args = parser.parse_args(argv)
    names = dict((v, n) for n, v in MODELS)
    kind = jax.devices()[0].device_kind
    peak = peak_tflops(kind)
    load = load_average()
    print(f"{jax.device_count()} × {kind} ({jax.default_backend()}); peak "
          f"{'unknown' if peak is None else f'{peak:g} TFLOP/s a device'}; {args.image_size}², "
          f"{args.batch_per_device} images a device; load average {load}\n")
    print("| model | dtype | attention | global batch | images/s | ms/step | data share | model TFLOP/step/device | "
          "MFU |\n|---|---|---|---:|---:|---:|---:|---:|---:|")
    for variant in args.models.split(","):
        row = measure(variant, args.image_size, args.batch_per_device, args.steps, args.warmup)
        mfu = "peak unknown" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        print(f"| {names.get(variant, variant)} | {row['dtype']} | {row['attention']} | {row['batch']} | "
              f"{row['images_s']:.1f} | {row['ms_step']:.1f} | {100 * row['data_share']:.0f}% | "
              f"{row['tflop_step_device']:.4f} | {mfu} |", flush=True)


if __name__ == "__main__":
    main()
