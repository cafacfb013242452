"""Generate a 1p-frac dataset: one σ-factor fractal, L Δ-perturbed classes, rendered on the accelerator.

  python main.py --config configs/generate.py --workdir runs/1p-frac-1k           # the paper's 1k set, 512²
  python main.py --config configs/generate.py:21k --workdir runs/1p-frac-21k      # the ViT-B set
  python main.py --config configs/generate.py:demo --workdir runs/demo-generate   # 64 classes at 128², seconds on CPU

Writes DIR/images/<class>/00000.png (an ImageFolder tree), DIR/params.json (base system, σ, Δ, every class's
maps), DIR/preview.png (the first 64 classes: one shape, slightly perturbed) and DIR/config.json.
Overrides: --config.num_classes, delta, sigma, num_maps, seed, image_size, draw_mode, perturbation, ...

  python main.py --config configs/generate.py:ofdb_1k --workdir runs/ofdb-1k             # OFDB-1k: 1 image a class
  python main.py --config configs/generate.py:fractaldb_1k --workdir runs/fractaldb-1k   # 1k classes × 1k instances
  python main.py --config configs/generate.py:demo_fractaldb --workdir runs/demo-fdb     # 16 × 100 at 64², CPU

`dataset` ('1p-frac' | 'ofdb' | 'fractaldb') selects the set; ofdb/fractaldb use seed, num_classes, image_size,
pad, num_points, draw_mode and max_maps, search_fill, weight_step, instances (the 1p-frac fields are ignored).
"""

import dataclasses

import ml_collections

from onepfrac_jax.config import new_config
from onepfrac_jax.fractals.bank import BankSpec
from onepfrac_jax.fractals.fdsl import FdslSpec

VARIANTS = {
    "paper_1k": {},
    "21k": {"num_classes": 21_000},
    "demo": {"num_classes": 64, "image_size": 128, "pad": 2, "num_points": 20_000},
    # the FDSL baselines (docs/stages.md, "FDSL baselines"): the public generators' sizes
    "ofdb_1k": {"dataset": "ofdb"},
    "fractaldb_1k": {"dataset": "fractaldb"},
    "fractaldb_21k": {"dataset": "fractaldb", "num_classes": 21_000},
    "demo_fractaldb": {"dataset": "fractaldb", "num_classes": 16, "image_size": 64, "pad": 2, "num_points": 10_000,
                       "instances": 1},
}


def add_fdsl_fields(config: ml_collections.ConfigDict) -> None:
    """The dataset choice and the OFDB / FractalDB fields (fractals/fdsl.py), which 1p-frac ignores."""
    spec = FdslSpec()
    config.dataset = "1p-frac"  # '1p-frac' | 'ofdb' | 'fractaldb'
    config.max_maps = spec.max_maps  # ofdb/fractaldb: a searched system has U{2..max_maps} maps
    config.search_fill = spec.search_fill  # ofdb/fractaldb: the category search keeps point drawings filling ≥ this
    config.weight_step = spec.weight_step  # fractaldb: the weighting grid's factors 1 ± s, 1 ± 2s
    config.instances = spec.instances  # fractaldb: mask draws per grid row (× 25 rows × 4 flips per class)


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = new_config("generate", variant, tuple(VARIANTS), "paper_1k")
    config.update(dataclasses.asdict(BankSpec()))
    add_fdsl_fields(config)
    config.overwrite = False  # replace the set an earlier generate run wrote into workdir
    config.update(VARIANTS[config.variant])
    return config
