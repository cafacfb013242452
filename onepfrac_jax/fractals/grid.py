"""Image grids for a glance at a dataset: generate's preview.png and pre-training's augmented_batch.png."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

GAP = 2  # pixels between tiles and around the grid
BACKGROUND = 40
CAPTION = 12  # height of the caption strip under each tile, when there are captions


def grid_side(count: int) -> int:
    """Tiles per row (and rows) of the square grid of `count` images."""
    return int(np.ceil(np.sqrt(count)))


def tile_origin(i: int, side: int, tile: int, captioned: bool) -> tuple[int, int]:
    """(left, top) of tile i in the grid."""
    height = tile + (CAPTION if captioned else 0)
    return GAP + (i % side) * (tile + GAP), GAP + (i // side) * (height + GAP)


def image_grid(images: np.ndarray, tile: int, captions: Sequence[str] | None = None,
               resample: Image.Resampling = Image.Resampling.BOX) -> Image.Image:
    """A square grid of uint8 images (N, H, W) (grey) or (N, H, W, 3) (RGB), each resized to `tile` × `tile`
    with `resample`; `captions` (one per image) are written in a strip under each tile."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) == 0:
        raise ValueError(f"images must be a non-empty uint8 (N, H, W) or (N, H, W, 3) array, got "
                         f"{images.dtype} {images.shape}")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images")
    mode = "L" if images.ndim == 3 else "RGB"
    side = grid_side(len(images))
    captioned = captions is not None
    width = GAP + side * (tile + GAP)
    height = GAP + side * (tile + (CAPTION if captioned else 0) + GAP)
    grid = Image.new(mode, (width, height), color=BACKGROUND if mode == "L" else (BACKGROUND,) * 3)
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        left, top = tile_origin(i, side, tile, captioned)
        grid.paste(Image.fromarray(image, mode).resize((tile, tile), resample), (left, top))
        if captioned:
            draw.text((left + 1, top + tile), captions[i], fill=255 if mode == "L" else (255, 255, 255))
    return grid
