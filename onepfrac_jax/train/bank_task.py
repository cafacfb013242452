"""The pre-train Task: a ViT classifies the L classes of a fractal bank rendered on the device (stages/pretrain.py).

No host input at all: step s's global batch is examples s·B … s·B + B − 1 of a stream in which every epoch is a
keyed permutation of the bank's examples (1p-frac and OFDB: the L classes; FractalDB: every class's instances,
flips applied as they are read), so the batch is a pure function of (seed, step) on any device count. `dataset`
selects the bank: 1p-frac (bank.py), ofdb or fractaldb (fdsl.py).

It evaluates top-1 on the bank's clean images (the eval transform only; label = class index) every
`eval_every_steps` (`bank_top1` in metrics.csv and result.json), and writes DIR/augmented_batch.png: the first
step's batch as the model sees it, de-normalised, each tile captioned with its target's top classes.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from onepfrac_jax.config import ConfigError, require_choice
from onepfrac_jax.data.augment import AugmentConfig, augment_batch, augment_config, eval_transform
from onepfrac_jax.files import write_file
from onepfrac_jax.fractals import fdsl, render
from onepfrac_jax.fractals.bank import BankSpec, build_bank, render_options
from onepfrac_jax.fractals.grid import image_grid
from onepfrac_jax.models.vit import ViT
from onepfrac_jax.parallel.mesh import Mesh, data_sharding, replicated, to_host
from onepfrac_jax.train import classify, loop
from onepfrac_jax.train.losses import top1_correct

DATA_MODES = ("bank", "fresh")
# Pre-train fields named after BankSpec's differ in two places: the bank has its own seed and render size.
_RENAMED = {"seed": "fractal_seed", "image_size": "render_size"}
_ORDER_STREAM = 2
BATCH_PNG = "augmented_batch.png"
BATCH_PNG_EXAMPLES = 64  # the first examples of step 0's batch
BATCH_PNG_TILE = 96  # tiles are the crops scaled up by a whole factor (nearest) to at least this many pixels


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a bank's E = L · stored · flips examples map to its rows: example e is class e // (stored · flips),
    its stored image (e mod stored · flips) // flips at row class · stored + that, flipped by e mod flips
    (fdsl.flip's codes). 1p-frac and OFDB: one row per class; FractalDB: its instances."""

    stored_per_class: int = 1
    flips: int = 1

    @property
    def per_class(self) -> int:
        return self.stored_per_class * self.flips


def epoch_examples(order_key: jax.Array, indices: jax.Array, num_examples: int, batch: int) -> jax.Array:
    """Examples of consecutive global indices: index g is position g mod E of epoch g // E's permutation."""
    first_epoch = indices[0] // num_examples
    spanned = math.ceil(batch / num_examples) + 1  # a batch touches at most this many epochs
    epochs = first_epoch + jnp.arange(spanned)
    perms = jax.vmap(lambda e: jax.random.permutation(jax.random.fold_in(order_key, e), num_examples))(epochs)
    return perms[indices // num_examples - first_epoch, indices % num_examples]


def bank_spec(config: ml_collections.ConfigDict) -> BankSpec | fdsl.FdslSpec:
    """The spec of the configured dataset's bank (`dataset`: 1p-frac, ofdb or fractaldb)."""
    require_choice("dataset", config.dataset, fdsl.DATASETS)
    if config.dataset == "1p-frac":
        return BankSpec.from_config(config, _RENAMED)
    return fdsl.FdslSpec.from_config(config, _RENAMED)


def validate_bank(spec: BankSpec | fdsl.FdslSpec) -> None:
    """spec.validate(), its messages naming the pre-train config's fields (render_size, not image_size)."""
    try:
        spec.validate()
    except ConfigError as e:
        message = str(e)
        for field, key in _RENAMED.items():
            message = re.sub(rf"\b{field}=", f"{key}=", message)
        raise ConfigError(message) from None


def make_bank_evaluate(model: ViT, augment: AugmentConfig, mesh: Mesh, images: jax.Array, num_classes: int,
                       batch: int) -> Callable[[loop.TrainState], dict[str, float]]:
    """Top-1 over the clean bank images (≥ L, S, ⌈S/8⌉) packed (render.pack_images): class l is row l, through the
    eval transform, in batches of `batch` split over the mesh (the last one masked)."""
    sharding = data_sharding(mesh)

    @functools.partial(jax.jit, out_shardings=replicated(mesh))
    def correct(params, images, start):
        labels = jax.lax.with_sharding_constraint(start + jnp.arange(batch, dtype=jnp.int32), sharding)
        gray = render.unpack_images(images[jnp.minimum(labels, num_classes - 1)])
        x = eval_transform(augment, gray, model.dtype)
        logits = model.apply({"params": params}, x)
        return top1_correct(logits, labels, labels < num_classes)[0]

    def evaluate(state: loop.TrainState) -> dict[str, float]:
        hits = [correct(state.params, images, jnp.int32(start)) for start in range(0, num_classes, batch)]
        return {"bank_top1": 100.0 * int(sum(hits)) / num_classes}

    return evaluate


def first_batch(make_batch: Callable, seed: int, resident: Any) -> dict:
    """Step 0's batch exactly as the loop's update step makes it (from the loop's step-0 data key)."""
    data_key, _ = loop.step_keys(seed, 0)
    return jax.jit(make_batch)(data_key, None, jnp.int32(0), resident)


def batch_picture(batch: dict, augment: AugmentConfig, examples: int = BATCH_PNG_EXAMPLES) -> Image.Image:
    """The first `examples` images of a batch de-normalised to uint8 RGB, in a grid captioned with each target's
    top class and weight (and the second where mixup/cutmix gave it ≥ 5%)."""
    x = np.asarray(to_host(batch["image"][:examples]), np.float32)
    pixels = np.clip(np.rint((x * np.asarray(augment.std) + np.asarray(augment.mean)) * 255), 0, 255)
    targets = np.asarray(to_host(batch["target"][:examples]))
    top = np.argsort(-targets, axis=1)[:, :2]
    captions = [" ".join(f"{c}:{t[c]:.2f}" for k, c in enumerate(order) if k == 0 or t[c] >= 0.05)
                for order, t in zip(top, targets, strict=True)]
    size = pixels.shape[1]
    return image_grid(pixels.astype(np.uint8), size * math.ceil(BATCH_PNG_TILE / size), captions,
                      resample=Image.Resampling.NEAREST)


def packed_bank(images: jax.Array, mesh: Mesh) -> jax.Array:
    """The rendered bank (R, S, S) uint8, as built (sharded over the devices), packed to bits where it lies and then
    replicated, so every device gathers its batch locally from 1/8 of the bytes (21k classes at 512²: 0.69 GB, not
    5.5); make_batch unpacks only the gathered rows. Raises if a pixel is neither 0 nor render.VALUE."""
    binary = jax.jit(lambda x: jnp.all((x == 0) | (x == render.VALUE)))(images)
    if not bool(binary):
        raise ValueError(f"the bank has pixels other than 0 and {render.VALUE}: it cannot be packed to bits")
    return jax.device_put(jax.jit(render.pack_images)(images), replicated(mesh))


def make_task(config: ml_collections.ConfigDict, spec: BankSpec, model: ViT, augment: AugmentConfig, mesh: Mesh,
              images: jax.Array, class_params: jax.Array, probs: jax.Array,
              workdir: Path | None = None, layout: Layout = Layout(),
              eval_images: jax.Array | None = None) -> loop.Task:
    """The pre-train Task over a bank's arrays: `images` (rows as `layout` says, S, ⌈S/8⌉) packed by
    `packed_bank` and `class_params`
    (L, N, 6) placed on the mesh (or jax.ShapeDtypeStructs with shardings, to lower the step without a bank);
    `probs` (N,) is small. bank_top1 scores `eval_images` (L, S, ⌈S/8⌉) (default: `images`, row l = class l). With a
    `workdir`, the Task's inputs write workdir/augmented_batch.png before the first step.

    The bank travels as the step's `resident` argument: closed over, jit would embed it in the program.
    """
    batch = config.batch_size
    # fresh mode: a new chain (map choices) and new patch masks for every sample, from its own key
    render_one = functools.partial(render.render, **render_options(spec))

    def make_batch(key, inputs, step, bank):
        render_key, augment_key = jax.random.split(key)
        indices = step * batch + jnp.arange(batch, dtype=jnp.int32)
        indices = jax.lax.with_sharding_constraint(indices, data_sharding(mesh))
        examples = epoch_examples(bank["order_key"], indices, spec.num_classes * layout.per_class, batch)
        labels, instance = examples // layout.per_class, examples % layout.per_class
        if config.data_mode == "bank":
            rows = labels * layout.stored_per_class + instance // layout.flips
            gray = fdsl.flip(render.unpack_images(bank["images"][rows]), instance % layout.flips)
        else:  # fresh chaos-game points for every sample, keyed by its global index
            keys = jax.vmap(lambda i: jax.random.fold_in(render_key, i))(indices)
            gray = jax.vmap(lambda p, k: render_one(p[None], probs, k)[0][0])(bank["class_params"][labels], keys)
        # grey in: augment_batch works on one channel for as long as that is exact
        x, targets = augment_batch(augment, augment_key, gray, labels, indices, spec.num_classes, model.dtype)
        return {"image": x, "target": targets}

    # Each mode gets only the array it reads. The epoch permutations' key (a stream of its own) is an argument too:
    # closed over, it would be a constant of the program, which then differs from seed to seed.
    resident = {"images": images} if config.data_mode == "bank" else {"class_params": class_params}
    resident["order_key"] = loop.replicated_key(loop.stream_key(config.seed, _ORDER_STREAM), mesh)

    def inputs(start: int):
        """No host input; before the first step (after the run directory is set up) the batch picture."""
        if workdir is not None and not (workdir / BATCH_PNG).exists():
            picture = batch_picture(first_batch(make_batch, config.seed, resident), augment)
            if jax.process_index() == 0:
                write_file(workdir / BATCH_PNG, functools.partial(picture.save, format="PNG"))
        return itertools.repeat(None)

    return loop.Task(
        init_variables=lambda key: model.init(key, jnp.zeros((1, config.image_size, config.image_size, 3))),
        make_batch=make_batch,
        loss_fn=classify.soft_target_loss(model),
        inputs=inputs,
        evaluate=make_bank_evaluate(model, augment, mesh, images if eval_images is None else eval_images,
                                    spec.num_classes, batch),
        export=classify.make_export(model, augment),
        # an epoch is one pass over the bank's examples (1p-frac: the L images, as in the seeds)
        steps_per_epoch=spec.num_classes * layout.per_class / batch,
        eval_names=("bank_top1",),
        resident=resident,
    )


def render_task(config: ml_collections.ConfigDict, spec: BankSpec | fdsl.FdslSpec, model: ViT, mesh: Mesh,
                workdir: Path | None, progress: Callable[[str], None]) -> loop.Task:
    """Renders the configured bank once on the devices, packs and replicates it (`packed_bank`), and returns the
    Task over it (which writes the batch picture into `workdir`, if given: `make_task`)."""
    augment = augment_config(config.augment)
    if config.dataset == "1p-frac":
        bank = build_bank(spec, mesh, progress=progress)
        images = packed_bank(bank.images, mesh)
        class_params = jax.device_put(jnp.asarray(bank.class_params), replicated(mesh))
        return make_task(config, spec, model, augment, mesh, images, class_params, jnp.asarray(bank.probs), workdir)
    bank = fdsl.build_fdsl_bank(spec, mesh, progress=progress)
    images = packed_bank(bank.images, mesh)
    layout = Layout(spec.stored_per_class, fdsl.FLIPS if config.dataset == "fractaldb" else 1)
    return make_task(config, spec, model, augment, mesh, images, None, None, workdir, layout,
                     images[jnp.asarray(bank.eval_rows())])
