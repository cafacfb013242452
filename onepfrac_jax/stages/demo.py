"""The CPU demo: generate a small 1p-frac set, pre-train a small ViT on it, fine-tune on digits, export to timm."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import ModuleType

import ml_collections

from onepfrac_jax.configs import finetune as finetune_configs
from onepfrac_jax.configs import generate as generate_configs
from onepfrac_jax.configs import pretrain as pretrain_configs
from onepfrac_jax.parallel.mesh import Mesh
from onepfrac_jax.rundir import Result, RunDir
from onepfrac_jax.stages import finetune, generate, pretrain


def sub_runs(config: ml_collections.ConfigDict, root: Path) -> list[tuple[str, ModuleType, ml_collections.ConfigDict]]:
    """(name, stage, config) of the demo's three runs, in order, each in root/name."""
    runs = [
        ("generate", generate, generate_configs.get_config("demo")),
        ("pretrain", pretrain, pretrain_configs.get_config("demo")),
        ("finetune", finetune, finetune_configs.get_config("digits_demo")),
    ]
    for name, _, stage_config in runs:
        if name != "generate":  # generate's own `seed` is the fractal's, which pre-training's fractal_seed matches
            stage_config.seed = config.seed
        if name == "finetune":
            stage_config.init_from = str(root / "pretrain")
    return runs


def validate(config: ml_collections.ConfigDict) -> None:
    """Validates each of the three runs' configs."""
    for _, stage, stage_config in sub_runs(config, Path(".")):
        stage.validate(stage_config)


def run(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh | None = None) -> Result:
    """Runs the three stages in workdir/{generate,pretrain,finetune}; returns the fine-tune's Result. A demo stopped
    part-way (SIGTERM, Ctrl-C: no result.json yet) goes on where it stopped; a finished one is only replaced."""
    validate(config)
    finished = (Path(workdir).expanduser() / "result.json").exists()
    with RunDir.open(config, workdir, resumable=not finished) as run_dir:
        run_dir.begin()  # an overwrite clears the earlier demo, sub-runs included
        root = run_dir.path
        for name, stage, stage_config in sub_runs(config, root):
            if name == "generate" and (root / name / "result.json").exists():
                continue  # rendered before the demo stopped (a generate run is never resumed)
            print(f"\n== {name} → {root / name}")
            result = stage.run(stage_config, str(root / name), mesh)
            if result.stopped:  # SIGTERM: the same command goes on from its checkpoint
                return result
        print(f"\nDone. The fractal classes: {root / 'generate' / 'preview.png'}\n"
              f"Pre-training curves (loss, bank_top1): {root / 'pretrain' / 'curves.png'}; its first augmented "
              f"batch: {root / 'pretrain' / 'augmented_batch.png'}\n"
              f"Fine-tuned timm weights: {root / 'finetune' / 'export'}; in PyTorch: "
              f"timm.create_model(\"local-dir:{root / 'finetune' / 'export'}\", pretrained=True)")
        result = dataclasses.replace(result, stage="demo")  # the demo's result is its fine-tune's
        result.write(root, quiet=True)
        return result
