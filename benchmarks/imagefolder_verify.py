"""Speed of the ImageFolder start-up check: `python -m benchmarks.imagefolder_verify`.

Writes a 10,000-image ImageFolder tree (10 classes) into a temporary directory, once as 64×64 PNGs checked
for 64 px training and once as 256×256 JPEGs (quality 90, ~20 KB) checked for 224 px training (too close for
JPEG draft decoding to shrink them), and times `verify_source` over each with 1 and 2 threads. The files were
just written, so they are in the page cache: the figures are decoding speed, not disk or network-filesystem
reads. Full-size photos (ImageNet's average ~400×350, ~110 KB) decode a few times slower per file. The load
average is printed beside them because a busy machine slows every row.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.load import load_average
from onepfrac_jax.data.sources import ImageFolderSource, verify_source

FILES = 10_000
CLASSES = 10
THREADS = (1, 2)
# (format, file extension, stored side, decoded side)
CASES = (("PNG", "png", 64, 64), ("JPEG", "jpg", 256, 224))


def write_tree(root: Path, fmt: str, ext: str, side: int) -> None:
    """FILES images under root/<class>/, smooth random colour fields plus noise (photo-like to compress)."""
    rng = np.random.default_rng(0)
    for i in range(FILES):
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((side, side),
                                                                                      Image.Resampling.BICUBIC)
        noise = rng.integers(-12, 13, (side, side, 3))
        pixels = np.clip(np.asarray(coarse, dtype=np.int64) + noise, 0, 255).astype(np.uint8)
        folder = root / f"class{i % CLASSES}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i:05d}.{ext}", fmt, **({"quality": 90} if fmt == "JPEG" else {}))


def time_verify(source: ImageFolderSource, num_threads: int) -> float:
    """Seconds `verify_source` takes to check every file of `source`."""
    start = time.perf_counter()
    verify_source(source, max_files=len(source), num_threads=num_threads)
    return time.perf_counter() - start


def main() -> None:
    print(f"cpus: {os.cpu_count()}, load average before: {load_average()}")
    print(f"{'images':<18} {'decoded':>7} {'files':>6} {'MiB':>5} {'threads':>7} {'seconds':>8} {'files/s':>8}")
    for fmt, ext, side, size in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            write_tree(root, fmt, ext, side)
            source = ImageFolderSource(root, image_size=size)
            mib = sum(p.stat().st_size for p in source.paths) / 2**20
            for num_threads in THREADS:
                seconds = time_verify(source, num_threads)
                print(f"{fmt + f' {side}x{side}':<18} {size:>7} {len(source):>6} {mib:>5.0f} {num_threads:>7} "
                      f"{seconds:>8.2f} {len(source) / seconds:>8.0f}")
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
