"""The CPU demo: generate a small 1p-frac set, pre-train a small ViT on it, fine-tune on digits, export to timm."""

from __future__ import annotations

from pathlib import Path

import ml_collections

from onepfrac_jax.config import prepare_workdir
from onepfrac_jax.configs import finetune as finetune_configs
from onepfrac_jax.configs import generate as generate_configs
from onepfrac_jax.configs import pretrain as pretrain_configs
from onepfrac_jax.fractals import generate
from onepfrac_jax.train import finetune, pretrain


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    root = prepare_workdir(workdir, overwrite=config.overwrite)
    stages = [
        ("generate", generate, generate_configs.get_config("demo")),
        ("pretrain", pretrain, pretrain_configs.get_config("demo")),
        ("finetune", finetune, finetune_configs.get_config("digits_demo")),
    ]
    for name, stage, stage_config in stages:
        stage_config.seed = config.seed
        stage_config.overwrite = config.overwrite
        if name == "finetune":
            stage_config.init_from = str(root / "pretrain")
        print(f"\n== {name} → {root / name}")
        stage.run(stage_config, str(root / name))
    print(f"\nDone. The fractal classes: {root / 'generate' / 'preview.png'}\n"
          f"Pre-training curves: {root / 'pretrain' / 'curves.png'}\n"
          f"Fine-tuned timm weights: {Path(root / 'finetune' / 'export')} "
          f"(timm.create_model(**timm.json) + load_state_dict(safetensors))")
