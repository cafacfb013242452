"""Host input throughput vs decode processes: `python -m benchmarks.host_input`.

Writes a JPEG ImageFolder of photo-sized images (default 500×375, ImageNet's typical size; smooth random content,
quality 90) to a temporary folder, then reads it through the fine-tune stage's own host path — ImageFolder source
(JPEG draft decode + one bicubic resize to `data.image_size`²), `pipeline.train_dataset`, `pipeline.host_iterator`
with `data.num_threads` decode threads in each of `data.worker_count` grain worker processes (0: threads in the
training process) — and prints images/s for each setting. The first batch (worker start-up) is timed apart.

What to pick: decode is CPU-bound, so images/s grows with worker_count until the host's cores are busy; the main
process still has to place batches on the devices, so leave it a core or two. On this project's 2-core CI machine
the table stops at 2 workers; on a 16-core GPU host the same command with `--workers 0,4,8,14` shows where it
flattens (docs/stages.md, "finetune": host input at ImageNet scale).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.load import load_average
from onepfrac_jax.data import pipeline, sources


def write_jpeg_folder(root: Path, num_images: int, width: int, height: int, num_classes: int = 10) -> None:
    """root/train/class_k/img_i.jpg: smooth random colour images (noise upsampled), so JPEG sizes are photo-like."""
    rng = np.random.default_rng(0)
    for i in range(num_images):
        folder = root / "train" / f"class_{i % num_classes}"
        folder.mkdir(parents=True, exist_ok=True)
        noise = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
        Image.fromarray(noise).resize((width, height), Image.Resampling.BICUBIC).save(folder / f"img_{i}.jpg",
                                                                                         quality=90)


def images_per_second(source: sources.Source, *, batch: int, batches: int, num_threads: int,
                      worker_count: int) -> tuple[float, float]:
    """(seconds to the first batch, images/s over the next `batches`) of the host iterator at these settings."""
    dataset = pipeline.train_dataset(source, seed=0, global_batch=batch, rows=np.arange(batch))
    start = time.perf_counter()
    stream = pipeline.host_iterator(dataset, num_threads=num_threads, prefetch_batches=4, worker_count=worker_count)
    try:
        next(stream)
        first = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(batches):
            item = next(stream)
            assert item["image"].shape == (batch, source.image_size, source.image_size, 3)
        return first, batch * batches / (time.perf_counter() - start)
    finally:
        stream.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=640, help="JPEGs written (the stream repeats them)")
    parser.add_argument("--photo", default="500x375", help="written image size WxH")
    parser.add_argument("--image-size", type=int, default=256, help="data.image_size: the host's output side")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=8, help="timed batches after the first")
    parser.add_argument("--workers", default="0,1,2", help="worker_count values, comma-separated")
    parser.add_argument("--threads", default="1,2", help="num_threads values, comma-separated")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.photo.lower().split("x"))
    load = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_jpeg_folder(root, args.images, width, height)
        source = sources.ImageFolderSource(root / "train", args.image_size)
        mib = sum(p.stat().st_size for p in root.rglob("*.jpg")) / 2**20
        print(f"{os.cpu_count()} cores; load average {load}; {len(source)} JPEGs {width}×{height} "
              f"({mib / len(source) * 1024:.0f} KiB each) → {args.image_size}², batches of {args.batch}\n")
        print("| worker_count | num_threads | first batch s | images/s |\n|---:|---:|---:|---:|")
        for workers in (int(w) for w in args.workers.split(",")):
            for threads in (int(t) for t in args.threads.split(",")):
                first, rate = images_per_second(source, batch=args.batch, batches=args.batches,
                                                num_threads=threads, worker_count=workers)
                print(f"| {workers} | {threads} | {first:.1f} | {rate:.0f} |", flush=True)


if __name__ == "__main__":
    main()
