"""The CPU demo, end to end in a few minutes: generate → pre-train → fine-tune on digits → export to timm.

  python main.py --config configs/demo.py --workdir runs/demo

Writes runs/demo/generate (64 fractal classes + preview.png), runs/demo/pretrain (a 4-block ViT pre-trained on
the same classes, rendered at 32², for 300 steps: bank_top1 reaches 100%; augmented_batch.png),
runs/demo/finetune (that ViT fine-tuned on scikit-learn's digits; prints val top-1) and
the timm-loadable weights in runs/demo/finetune/export. The sub-runs are configs/generate.py:demo,
configs/pretrain.py:demo and configs/finetune.py:digits_demo.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = "demo"
    c.seed = 0  # training seed of both training stages
    c.overwrite = False
    return c
