"""Bootstrapping's joint and shared train steps against a lone-ViT step at the same batch, on this machine.

    python -m benchmarks.bootstrap_step [--variants digits_demo,cifar100_small --batch 16 --steps 7]

Every column is the median time of the loop's own jitted train step (on-device augmentation, forward and
backward, AdamW update, donated state) on one fixed batch of random uint8 images; the lone ViT is the stage's
own ViT (same batch, augmentation and optimizer) trained with plain cross-entropy. `digits_demo` runs at its
batch of 64 unless --batch is given; the paper variants at --batch.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from onepfrac_jax.configs import bootstrap as bootstrap_config

from benchmarks.load import load_average
from onepfrac_jax.data import pipeline
from onepfrac_jax.models import resolve_dtype
from onepfrac_jax.models.vit import ViT
from onepfrac_jax.parallel.mesh import Mesh, data_sharding, make_data_mesh
from onepfrac_jax.stages import bootstrap
from onepfrac_jax.train import classify, loop, pair

_VARIANTS = flags.DEFINE_list("variants", ["digits_demo", "cifar100_small"],
                              "config families: <family>_joint and <family>_shared of configs/bootstrap.py")
_BATCH = flags.DEFINE_integer("batch", 16, "global batch of the paper variants (and of the demo when given)")
_STEPS = flags.DEFINE_integer("steps", 7, "timed rounds; each round times one step of every column")
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed steps first (compilation, allocator warm-up)")


class RandomSource:
    """Random uint8 images at the config's decode size: the step's cost does not depend on the pixels."""

    def __init__(self, image_size: int, num_classes: int, length: int):
        self.image_size, self.num_classes, self.length = image_size, num_classes, length
        self.class_names = tuple(str(i) for i in range(num_classes))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng(index)
        size = self.image_size
        return {"image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "label": index % self.num_classes}


def _host_batch(source: RandomSource, batch: int, mesh: Mesh) -> dict[str, jax.Array]:
    items = [source[i] for i in range(batch)]
    arrays = {"image": np.stack([it["image"] for it in items]),
              "label": np.array([it["label"] for it in items], np.int32),
              "index": np.arange(batch, dtype=np.int32)}
    return jax.device_put(arrays, data_sharding(mesh))


def compiled_step(task: loop.Task, config: ml_collections.ConfigDict, mesh: Mesh,
                  item: dict[str, jax.Array]) -> Callable[[], None]:
    """The loop's own jitted train step of `task` as a no-argument call that runs one step to completion."""
    step, tx = loop.jit_train_step(task, config, mesh, loop.total_steps(config, task.steps_per_epoch))
    state = loop.init_state(task, tx, config.seed, mesh)

    def run() -> None:
        nonlocal state
        state, _ = step(state, item)
        jax.block_until_ready(state)

    for _ in range(_WARMUP.value):
        run()
    return run


def median_ms(steps: dict[str, Callable[[], None]]) -> dict[str, float]:
    """Median milliseconds per step of each, timed in turns so that they share the machine's changing load."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(_STEPS.value):
        for name, run in steps.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def lone_vit(task: loop.Task, vit: ViT, image_size: int) -> loop.Task:
    """The same task (batch, augmentation, optimizer settings) training only its ViT, with cross-entropy."""
    images = jnp.zeros((1, image_size, image_size, 3))
    return dataclasses.replace(task, init_variables=lambda key: vit.init(key, images),
                               loss_fn=classify.soft_target_loss(vit), optimizer_labels=None)


def _config(family: str, mode: str, batch: int | None) -> ml_collections.ConfigDict:
    config = bootstrap_config.get_config(f"{family}_{mode}")
    if batch is not None:
        config.batch_size = batch
    return config


def main(argv: list[str]) -> None:
    del argv
    mesh = make_data_mesh()
    print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind} ({jax.device_count()} device(s)), "
          f"median of {_STEPS.value} interleaved timed steps after {_WARMUP.value} warm-up; "
          f"load average {load_average()}")
    print(f"{'variant':<16}{'dtype':>10}{'px':>5}{'batch':>6}{'ViT ms':>9}{'joint ms':>10}{'joint/ViT':>11}"
          f"{'shared ms':>11}{'shared/ViT':>12}")
    for family in _VARIANTS.value:
        demo = family.startswith("digits")
        batch = None if demo and _BATCH.value == _BATCH.default else _BATCH.value
        steps = {}
        for mode in pair.MODES:
            config = _config(family, mode, batch)
            # 100 classes as CIFAR-100; the source is long enough for any batch.
            source = RandomSource(config.data.image_size, 10 if demo else 100, 4 * config.batch_size)
            data = pipeline.HostData(source, source, config.data, config.seed, config.batch_size,
                                     data_sharding(mesh))
            bootstrap.validate(config)  # as the stage does first: `auto` that means float16 is written as such
            task, vit, _ = pair.build_task(config, data)
            item = _host_batch(source, config.batch_size, mesh)
            if mode == "joint":
                steps["vit"] = compiled_step(lone_vit(task, vit, config.image_size), config, mesh, item)
            steps[mode] = compiled_step(task, config, mesh, item)
        times = median_ms(steps)
        print(f"{family:<16}{resolve_dtype(config.dtype):>10}{config.image_size:>5}{config.batch_size:>6}"
              f"{times['vit']:>9.1f}{times['joint']:>10.1f}{times['joint'] / times['vit']:>11.2f}"
              f"{times['shared']:>11.1f}{times['shared'] / times['vit']:>12.2f}")


if __name__ == "__main__":
    app.run(main)
