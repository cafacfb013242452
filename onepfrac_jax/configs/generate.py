"""Generate a 1p-frac dataset: one σ-factor fractal, L Δ-perturbed classes, rendered on the accelerator.

  python main.py --config configs/generate.py --workdir runs/1p-frac-1k           # the paper's 1k set, 512²
  python main.py --config configs/generate.py:21k --workdir runs/1p-frac-21k      # the ViT-B set
  python main.py --config configs/generate.py:demo --workdir runs/demo-generate   # 64 classes at 128², seconds on CPU

Writes DIR/images/<class>/00000.png (an ImageFolder tree), DIR/params.json (base system, σ, Δ, every class's
maps), DIR/preview.png (the first 64 classes: one shape, slightly perturbed) and DIR/config.json.
Overrides: --config.num_classes, delta, sigma, num_maps, seed, image_size, draw_mode, perturbation, ...
"""

import dataclasses

import ml_collections

from onepfrac_jax.config import new_config
from onepfrac_jax.fractals.bank import BankSpec

VARIANTS = {
    "paper_1k": {},
    "21k": {"num_classes": 21_000},
    "demo": {"num_classes": 64, "image_size": 128, "pad": 2, "num_points": 20_000},
}


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = new_config("generate", variant, tuple(VARIANTS), "paper_1k")
    config.update(dataclasses.asdict(BankSpec()))
    config.overwrite = False  # replace the set an earlier generate run wrote into workdir
    config.update(VARIANTS[config.variant])
    return config
