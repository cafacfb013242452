"""The CPU demo: generate a small 1p-frac set, pre-train a small ViT on it, fine-tune on digits, export to timm."""

from __future__ import annotations

import dataclasses

import ml_collections

from onepfrac_jax.configs import finetune as finetune_configs
from onepfrac_jax.configs import generate as generate_configs
from onepfrac_jax.configs import pretrain as pretrain_configs
from onepfrac_jax.fractals import generate
from onepfrac_jax.parallel.mesh import Mesh
from onepfrac_jax.rundir import Result, RunDir
from onepfrac_jax.train import finetune, pretrain


def run(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh | None = None) -> Result:
    """Runs the three stages in workdir/{generate,pretrain,finetune}; returns the fine-tune's Result."""
    with RunDir.open(config, workdir, resumable=False) as run_dir:
        run_dir.begin()  # an overwrite clears the earlier demo, sub-runs included
        root = run_dir.path
        stages = [
            ("generate", generate, generate_configs.get_config("demo")),
            ("pretrain", pretrain, pretrain_configs.get_config("demo")),
            ("finetune", finetune, finetune_configs.get_config("digits_demo")),
        ]
        for name, stage, stage_config in stages:
            if name != "generate":  # generate's own `seed` is the fractal's, which pre-training's fractal_seed matches
                stage_config.seed = config.seed
            if name == "finetune":
                stage_config.init_from = str(root / "pretrain")
            print(f"\n== {name} → {root / name}")
            result = stage.run(stage_config, str(root / name), mesh)
        print(f"\nDone. The fractal classes: {root / 'generate' / 'preview.png'}\n"
              f"Pre-training curves (loss, bank_top1): {root / 'pretrain' / 'curves.png'}; its first augmented "
              f"batch: {root / 'pretrain' / 'augmented_batch.png'}\n"
              f"Fine-tuned timm weights: {root / 'finetune' / 'export'} "
              f"(timm.create_model(**timm.json) + load_state_dict(safetensors))")
        result = dataclasses.replace(result, stage="demo")  # the demo's result is its fine-tune's
        result.write(root, quiet=True)
        return result
