"""The generate stage: render a 1p-frac bank on the accelerator and write it as an ImageFolder tree."""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from onepfrac_jax.fractals.bank import BankSpec, build_bank
from onepfrac_jax.parallel.mesh import Mesh, to_host
from onepfrac_jax.rundir import Result, RunDir

PREVIEW_CLASSES = 64
PREVIEW_TILE = 128


def preview(images: np.ndarray, tile: int = PREVIEW_TILE) -> Image.Image:
    """A square grid of the first classes, each shrunk to `tile` pixels with a 2-px gap."""
    count = min(len(images), PREVIEW_CLASSES)
    side = int(np.ceil(np.sqrt(count)))
    gap = 2
    grid = Image.new("L", (side * (tile + gap) + gap,) * 2, color=40)
    for i in range(count):
        thumb = Image.fromarray(images[i]).resize((tile, tile), Image.Resampling.BOX)
        grid.paste(thumb, (gap + (i % side) * (tile + gap), gap + (i // side) * (tile + gap)))
    return grid


def write_image_folder(images: np.ndarray, root: Path) -> None:
    """root/00000/00000.png ...: one grayscale PNG per class, written by a thread pool (PNG encoding frees the GIL)."""
    start = time.perf_counter()
    total = len(images)

    def write(label: int) -> None:
        folder = root / f"{label:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[label], mode="L").save(folder / "00000.png", compress_level=1)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for done, _ in enumerate(pool.map(write, range(total)), start=1):
            if done % 250 == 0 or done == total:
                rate = done / (time.perf_counter() - start)
                logging.info("wrote %d/%d PNGs (%.0f images/s)", done, total, rate)


def run(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh | None = None) -> Result:
    """Renders the bank over all devices of all processes (or `mesh`'s); process 0 writes the files."""
    spec = BankSpec.from_config(config)
    spec.validate()
    with RunDir.open(config, workdir, resumable=False) as run_dir:
        start = time.perf_counter()
        bank = build_bank(spec, mesh, progress=lambda line: logging.info("%s", line))
        images = to_host(bank.images)[: spec.num_classes]  # on every process: a collective
        logging.info("bank of %d classes at %d² rendered in %.1f s", spec.num_classes, spec.image_size,
                     time.perf_counter() - start)
        run_dir.begin()  # an overwrite clears the old set here, so no class folder of it survives
        path = run_dir.path
        files = {"images": str(path / "images"), "preview": str(path / "preview.png"),
                 "params": str(path / "params.json")}
        if jax.process_index() == 0:
            write_image_folder(images, path / "images")
            (path / "params.json").write_text(json.dumps(bank.to_json(), indent=1))
            preview(images).save(path / "preview.png")
            logging.info("σ=%.4f, %d classes re-drawn for fill ≤ %.2f, mean fill %.3f", bank.sigma,
                         int((bank.redraws > 0).sum()), spec.fill_threshold, float(bank.fill.mean()))
        result = Result(stage="generate", step=0, total_steps=0, stopped=False, history=[], files=files, state=bank)
        result.write(path)
        return result
