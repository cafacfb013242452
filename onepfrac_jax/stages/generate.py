"""The generate stage: render a 1p-frac, OFDB or FractalDB bank on the accelerator and write it as an ImageFolder
tree with params.json and a preview grid."""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from onepfrac_jax.config import host_memory_bytes, require_choice, require_representable
from onepfrac_jax.files import write_errors, write_file
from onepfrac_jax.fractals import fdsl
from onepfrac_jax.fractals.bank import BankSpec, bank_bytes, build_bank, require_fits
from onepfrac_jax.fractals.fdsl import FdslSpec
from onepfrac_jax.fractals.grid import image_grid
from onepfrac_jax.parallel.mesh import Mesh, to_host
from onepfrac_jax.rundir import Result, RunDir

PREVIEW_CLASSES = 64
PREVIEW_TILE = 128


def preview(images: np.ndarray, tile: int = PREVIEW_TILE) -> Image.Image:
    """A square grid of the first classes, each shrunk to `tile` pixels."""
    return image_grid(images[:PREVIEW_CLASSES], tile)


def write_image_folder(root: Path, count: int, file_of: Callable[[int], tuple[str, np.ndarray]]) -> None:
    """Grayscale PNGs root/<file_of(i)[0]> = file_of(i)[1] for i < count, written by a thread pool (PNG encoding
    frees the GIL), each whole or absent (files.write_file). They are synced once at the end, not one by one: an
    fsync costs ~3 ms, an hour for FractalDB's million files. The first failure (a full disk) stops the pool and is
    raised, once."""
    start = time.perf_counter()

    def write(i: int) -> None:
        name, image = file_of(i)
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        png = functools.partial(Image.fromarray(image, mode="L").save, format="PNG", compress_level=1)
        write_file(root / name, png, durable=False)

    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
    try:
        for done, _ in enumerate(pool.map(write, range(count)), start=1):
            if done % 250 == 0 or done == count:
                rate = done / (time.perf_counter() - start)
                logging.info("wrote %d/%d PNGs (%.0f images/s)", done, count, rate)
    finally:
        pool.shutdown(cancel_futures=True)  # after a failure the queued images are not each tried, and fail, too
    os.sync()


def fdsl_file(spec: FdslSpec, images: np.ndarray, i: int) -> tuple[str, np.ndarray]:
    """Image i of an OFDB / FractalDB tree, named as the public generators name it: class/<class>_<grid row>_count_
    <draw>_flip<f>.png; i runs over (class, stored image, flip)."""
    flips = fdsl.FLIPS if spec.dataset == "fractaldb" else 1
    label, rest = divmod(i, spec.stored_per_class * flips)
    stored, code = divmod(rest, flips)
    row, draw = divmod(stored, spec.instances) if spec.dataset == "fractaldb" else (0, 0)
    image = images[label * spec.stored_per_class + stored]
    image = image[::-1] if code & 1 else image
    image = image[:, ::-1] if code & 2 else image
    return f"{label:05d}/{label:05d}_{row:02d}_count_{draw}_flip{code}.png", np.ascontiguousarray(image)


def validate(config: ml_collections.ConfigDict) -> BankSpec | FdslSpec:
    """Every check that needs no devices' work; returns the bank's spec."""
    require_choice("dataset", config.dataset, fdsl.DATASETS)
    spec = BankSpec.from_config(config) if config.dataset == "1p-frac" else FdslSpec.from_config(config)
    spec.validate()
    require_representable(config)
    require_fits(spec, bank_bytes(spec), host_memory_bytes(), "on the host that writes it")
    return spec


def run(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh | None = None) -> Result:
    """Renders the bank over all devices of all processes (or `mesh`'s); process 0 writes the files."""
    spec = validate(config)
    fractal = config.dataset == "1p-frac"
    with RunDir.open(config, workdir, resumable=False) as run_dir:
        start = time.perf_counter()
        say = functools.partial(logging.info, "%s")
        bank = build_bank(spec, mesh, progress=say) if fractal else fdsl.build_fdsl_bank(spec, mesh, progress=say)
        images = to_host(bank.images)  # on every process: a collective
        logging.info("%s bank of %d classes at %d² rendered in %.1f s", config.dataset, spec.num_classes,
                     spec.image_size, time.perf_counter() - start)
        run_dir.begin()  # an overwrite replaces the old set here, so no class folder of it survives
        path = run_dir.path
        files = {"images": str(path / "images"), "preview": str(path / "preview.png"),
                 "params": str(path / "params.json")}
        incomplete = (f"the set in {path} is incomplete (each file in it whole): make room, then run again with "
                      f"--config.overwrite=True")
        if jax.process_index() == 0:
            with write_errors(incomplete):
                if fractal:
                    write_image_folder(path / "images", spec.num_classes,
                                       lambda label: (f"{label:05d}/00000.png", images[label]))
                    grid = preview(images[: spec.num_classes])  # rows past L: padding
                    logging.info("σ=%.4f, %d classes re-drawn for fill ≤ %.2f, mean fill %.3f", bank.sigma,
                                 int((bank.redraws > 0).sum()), spec.fill_threshold, float(bank.fill.mean()))
                else:
                    write_image_folder(path / "images", spec.num_classes * spec.instances_per_class,
                                       functools.partial(fdsl_file, spec, images))
                    grid = preview(images[bank.eval_rows()])
                    logging.info("category search: %d classes from %d candidates", spec.num_classes, bank.tried)
                write_file(path / "preview.png", functools.partial(grid.save, format="PNG"))
                write_file(path / "params.json", json.dumps(bank.to_json(), indent=1))
        result = Result(stage="generate", step=0, total_steps=0, stopped=False, history=[], files=files, state=bank)
        result.write(path)
        return result
