"""Forward+backward throughput of the Flax ViT against timm/PyTorch, same dims and batch, in one run.

    python -m benchmarks.vit_vs_timm [--batch 16 --demo_batch 64 --steps 3]

Rows: ViT-Ti/16 at 224 px, and ViT-Ti dims on a small demo image (default 32 px, patch 4). Both frameworks
compute the gradient of the cross-entropy of the logits w.r.t. all parameters, float32, drop rates 0.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import jax
import optax
from absl import app, flags

from benchmarks.load import load_average
from onepfrac_jax.models.vit import ViT, create_vit

_BATCH = flags.DEFINE_integer("batch", 16, "batch size of the 224 px row")
_DEMO_BATCH = flags.DEFINE_integer("demo_batch", 64, "batch size of the demo row")
_DEMO_SIZE = flags.DEFINE_integer("demo_size", 32, "image side of the demo row")
_DEMO_PATCH = flags.DEFINE_integer("demo_patch", 4, "patch size of the demo row")
_STEPS = flags.DEFINE_integer("steps", 3, "timed steps per measurement")
_WARMUP = flags.DEFINE_integer("warmup", 1, "untimed steps first (compilation, allocator warm-up)")
_TORCH_DEVICE = flags.DEFINE_string("torch_device", None, "torch device; default cuda if available, else cpu")


def _images_per_s(step: Callable[[], object], batch: int) -> float:
    for _ in range(_WARMUP.value):
        step()
    start = time.perf_counter()
    for _ in range(_STEPS.value):
        step()
    return batch * _STEPS.value / (time.perf_counter() - start)


def bench_jax(model: ViT, batch: int) -> float:
    """Images/s of jitted loss-and-gradient steps on JAX's default device."""
    x = jax.random.normal(jax.random.key(1), (batch, model.img_size, model.img_size, 3))
    y = jax.random.randint(jax.random.key(2), (batch,), 0, model.num_classes)
    params = jax.jit(model.init)(jax.random.key(0), x[:1])["params"]

    @jax.jit
    def grad_step(params, x, y):
        def loss(p):
            logits = model.apply({"params": p}, x, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        return jax.value_and_grad(loss)(params)

    return _images_per_s(lambda: jax.block_until_ready(grad_step(params, x, y)), batch)


def bench_torch(model: ViT, batch: int, device: str) -> float:
    """Images/s of timm's twin of `model` doing forward+backward in PyTorch."""
    import timm
    import torch

    from onepfrac_jax.export.timm import timm_config

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = timm_config(model, (0.5,) * 3, (0.5,) * 3)
    net = timm.create_model(cfg["model_name"], pretrained=False, **cfg["kwargs"]).to(device).train()
    x = torch.randn(batch, 3, model.img_size, model.img_size, device=device)
    y = torch.randint(0, model.num_classes, (batch,), device=device)

    def step() -> None:
        net.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return _images_per_s(step, batch)


def main(argv: list[str]) -> None:
    del argv
    try:
        import torch
    except ImportError:
        torch = None
    torch_device = _TORCH_DEVICE.value or ("cuda" if torch is not None and torch.cuda.is_available() else "cpu")
    rows = [
        ("vit_tiny_patch16 224px", create_vit("vit_tiny_patch16_224"), _BATCH.value),
        (f"vit_tiny dims {_DEMO_SIZE.value}px/p{_DEMO_PATCH.value}",
         create_vit("vit_tiny_patch16_224", img_size=_DEMO_SIZE.value, patch_size=_DEMO_PATCH.value),
         _DEMO_BATCH.value),
    ]
    print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind} ({jax.device_count()} device(s)); "
          + (f"torch {torch.__version__} on {torch_device}, {os.cpu_count()} threads" if torch else "no torch"))
    print(f"forward+backward, float32, {_STEPS.value} timed steps after {_WARMUP.value} warm-up; "
          f"load average {load_average()}")
    print(f"{'model':<28}{'batch':>6}{'JAX img/s':>12}{'torch img/s':>13}{'JAX/torch':>11}")
    for name, model, batch in rows:
        jax_rate = bench_jax(model, batch)
        torch_rate = bench_torch(model, batch, torch_device) if torch else float("nan")
        print(f"{name:<28}{batch:>6}{jax_rate:>12.1f}{torch_rate:>13.1f}{jax_rate / torch_rate:>11.2f}")


if __name__ == "__main__":
    app.run(main)
