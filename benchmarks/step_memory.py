"""Device memory of the ViT-B/16 (21k classes) pre-train update step, from XLA's buffer assignment: no data, no run.

    python -m benchmarks.step_memory                        # 128 images per device, f32/bf16/f16 × remat
    python -m benchmarks.step_memory --batch 64 --dtypes bfloat16 --remat on
    python -m benchmarks.step_memory --dtypes float32,bfloat16 --remat off --accum 1,2,4   # accumulation

Each row lowers and compiles the update step the training loop runs (`loop.jit_train_step`: AdamW, the soft-target
loss, float16's dynamic loss scaling, donated state) for one device, from ShapeDtypeStructs, and prints
`compiled.memory_analysis()`: arguments (the train state — params, AdamW moments — and the batch), outputs, the
bytes outputs alias in donated arguments, temporaries (activations kept for the backward pass, gradients, XLA's
scratch), and peak ≈ arguments + outputs − aliased + temporaries. Compilation allocates no buffers, so a host with
less memory than the step needs can measure it (the compile itself takes a few GB and a minute or two per row).

On a CPU these are XLA:CPU's figures, estimates of a GPU's: the same HLO, but XLA:GPU fuses differently, may keep
bfloat16 where XLA:CPU widens to float32, and adds cuBLAS/cuDNN workspaces and the CUDA context (~0.3-0.5 GB). By
default XLA:CPU drops the barriers that keep `nn.remat`'s recomputation apart from the forward pass and then merges
the two (remat would show no saving); this script disables that pass (`cse_barrier_expander`) so the CPU figures
keep the recomputation as XLA:GPU does. The batch enters as the augmented images and soft targets: the on-device
augmentation's temporaries and the fractal bank (wall 1/2 of issue 10) are not in these figures.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

from benchmarks.load import load_average

GIB = 2**30
V100_GB = (16, 32)
# A GPU never gives all of its memory to XLA: the CUDA context, library workspaces and fragmentation take some;
# "fits" means peak ≤ this fraction of the card (XLA's own default is to preallocate 75%: raise it with
# XLA_PYTHON_CLIENT_MEM_FRACTION=.92 to use this much).
USABLE = 0.9
KEEP_REMAT_FLAG = "--xla_disable_hlo_passes=cse_barrier_expander"


def measure(dtype: str, remat: bool, batch: int, model_name: str, num_classes: int, compile: bool = True,
            accum_steps: int = 1) -> dict:
    """memory_analysis() of one compiled update step and its compile seconds (when `compile`), and the bytes of the
    residuals the forward pass leaves for the backward (jax.vjp's closure, traced only: no backend involved)."""
    import jax
    import jax.numpy as jnp
    from onepfrac_jax.configs import pretrain as pretrain_configs

    from onepfrac_jax.parallel.mesh import make_data_mesh
    from onepfrac_jax.train import classify, loop

    config = pretrain_configs.get_config("paper_vit_base_21k")
    config.update(dict(model=model_name, num_classes=num_classes, dtype=dtype, remat=remat, batch_size=batch,
                       accum_steps=accum_steps))
    model = classify.build_vit(config, num_classes)
    size = config.image_size
    task = loop.Task(
        init_variables=lambda key: model.init(key, jnp.zeros((1, size, size, 3))),
        make_batch=lambda key, inputs, step: inputs,  # the batch arrives augmented: the model's step alone
        loss_fn=classify.soft_target_loss(model),
        inputs=lambda start: iter(()),
        evaluate=None,
        export=None,
        steps_per_epoch=num_classes / batch,
    )
    mesh = make_data_mesh(jax.devices()[:1])
    step_fn, tx = loop.jit_train_step(task, config, mesh, total=100_000)
    state = loop.abstract_state(task, tx, mesh)
    inputs = {"image": jax.ShapeDtypeStruct((batch, size, size, 3), model.dtype),
              "target": jax.ShapeDtypeStruct((batch, num_classes), jnp.float32)}
    params = sum(leaf.size for leaf in jax.tree.leaves(state.params))

    def backward_closure(params, batch):
        loss = lambda p: task.loss_fn(p, {}, batch, jax.random.key(0))[0]
        return jax.vjp(loss, params)[1]

    micro = {k: jax.ShapeDtypeStruct((batch // accum_steps, *v.shape[1:]), v.dtype) for k, v in inputs.items()}
    closure = jax.eval_shape(backward_closure, state.params, micro)  # one micro-batch's: they live one at a time
    residuals = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(closure))
    if not compile:
        return dict(residuals=residuals, params=params)
    start = time.perf_counter()
    compiled = step_fn.lower(state, inputs, None).compile()
    seconds = time.perf_counter() - start
    m = compiled.memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return dict(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes, alias=m.alias_size_in_bytes,
                temp=m.temp_size_in_bytes, peak=peak, seconds=seconds, params=params, residuals=residuals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128, help="images per device")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16", help="comma-separated computation dtypes")
    parser.add_argument("--remat", choices=("off", "on", "both"), default="both")
    parser.add_argument("--accum", default="1", help="comma-separated accum_steps (micro-batches per step)")
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--num_classes", type=int, default=21_000)
    parser.add_argument("--xla_cpu_drops_remat", action="store_true",
                        help=f"leave XLA:CPU's default pipeline (without {KEEP_REMAT_FLAG})")
    parser.add_argument("--no_compile", action="store_true",
                        help="only the traced residual bytes (seconds, no XLA): the backend-free column alone")
    args = parser.parse_args()
    if not args.xla_cpu_drops_remat:  # before JAX starts its backends, which read XLA_FLAGS once
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {KEEP_REMAT_FLAG}".strip()

    import jax

    device = jax.devices()[0]
    print(f"{args.model}, {args.num_classes:,} classes, {args.batch} images of 224² per device; backend "
          f"{jax.default_backend()} ({device.device_kind}); XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r};"
          f" load average {load_average()}")
    if jax.default_backend() == "cpu":
        print("XLA:CPU's buffer assignment: estimates of a GPU's (see the module docstring)")
    print(f"GiB per device; 'fits' = peak ≤ {USABLE:.0%} of the card's 16 or 32 GiB; 'residuals': what the forward "
          f"pass keeps for the backward, traced (no backend: bfloat16/float16 as a GPU keeps them; params included)\n")
    header = ["dtype", "remat", "accum_steps", "residuals"]
    if not args.no_compile:
        header += ["arguments", "outputs", "aliased", "temporaries", "peak", *(f"V100 {gb} GB" for gb in V100_GB),
                   "compile s"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * 2 + "---:|" * (len(header) - 2))
    accums = [int(k) for k in args.accum.split(",")]
    remats = {"off": (False,), "on": (True,), "both": (False, True)}[args.remat]
    params = 0
    for dtype in args.dtypes.split(","):
        for remat in remats:
            for accum in accums:
                r = measure(dtype, remat, args.batch, args.model, args.num_classes, compile=not args.no_compile,
                            accum_steps=accum)
                params = r["params"]
                cells = [dtype, "on" if remat else "off", str(accum), f"{r['residuals'] / GIB:.2f}"]
                if not args.no_compile:
                    fits = ["yes" if r["peak"] <= USABLE * gb * GIB else "no" for gb in V100_GB]
                    cells += [*(f"{r[k] / GIB:.2f}" for k in ("argument", "output", "alias", "temp", "peak")),
                              *fits, f"{r['seconds']:.0f}"]
                print("| " + " | ".join(cells) + " |", flush=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\n{params:,} parameters (float32; AdamW keeps two moments of each); host peak RSS {rss:.1f} GiB")


if __name__ == "__main__":
    main()
