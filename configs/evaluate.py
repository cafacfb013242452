"""Score a trained run or a timm weights file on a dataset: top-1, top-5 and a confusion matrix; nothing is trained.

  python main.py --config configs/evaluate.py --workdir runs/eval-ft --config.init_from=runs/demo/finetune
  python main.py --config configs/evaluate.py --workdir runs/eval-ft-100 --config.init_from=runs/demo/finetune \
      --config.step=100                                                           # any kept checkpoint
  python main.py --config configs/evaluate.py --workdir runs/eval-agent --config.init_from=runs/demo-boot \
      --config.bootstrap_model=agent                                              # a bootstrap run's CNN agent
  python main.py --config configs/evaluate.py:digits_demo --workdir runs/eval-weights \
      --config.init_from=runs/demo/finetune/export/model.safetensors              # a weights file (the demo ViT)

init_from: a pretrain, finetune or bootstrap run directory (its latest checkpoint, or `step`; `ema=True` scores the
moving average of a run trained with ema_decay > 0), or weights (an export folder, a .safetensors or a .pth) whose
ViT this config's model fields (model, patch_size, embed_dim, ..., image_size) and augment.mean/std describe.
The data (`data.name` '' by default): a fine-tune or bootstrap run's own data section and eval split, else
scikit-learn's bundled digits (val split); any other `data` section as in configs/finetune.py. The model's head
must have the data's class count (a pre-trained backbone is read out by configs/linear_probe.py).
Writes WORKDIR/result.json (top1, top5, examples, ...), confusion.png and confusion.csv. On the demo fine-tune
(runs/demo/finetune) it prints its val top-1 again, within a few seconds.
"""

import ml_collections
from onepfrac_jax.configs.finetune import data_config

from onepfrac_jax.config import apply_overrides, new_config
from onepfrac_jax.data.augment import default_augment_config
from onepfrac_jax.train import classify

# The demo ViT of configs/pretrain.py:demo and configs/finetune.py:digits_demo, for weights files of it.
DEMO_VIT = {"image_size": 32, "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3, "mlp_dim": 384}
VARIANTS = {"default": {}, "digits_demo": DEMO_VIT}


def add_source_fields(c: ml_collections.ConfigDict) -> None:
    """What to read the model from (evaluate and linear_probe); the model fields describe a weights file's ViT."""
    c.init_from = ""  # a run directory, an export folder, or a .safetensors / .pth weights file
    c.step = -1  # a run's checkpoint step; -1: the latest
    c.ema = False  # a run's moving average of its weights (runs with ema_decay > 0) instead of the weights
    classify.add_model_fields(c, "vit_tiny_patch16_224")
    c.image_size = 224  # a weights file's ViT input size (a run's own is in its config)
    c.augment = default_augment_config()  # a weights file's eval transform: crop_pct, interpolation, mean, std
    c.batch_size = 256  # images per forward pass, over all devices
    c.overwrite = False  # replace an earlier result in workdir


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    c = new_config("evaluate", variant, tuple(VARIANTS), "default")
    add_source_fields(c)
    c.bootstrap_model = "vit"  # a bootstrap run's 'vit' or 'agent' (a shared agent: the CNN its ViT defines)
    c.data = data_config("", 32, "val")  # name '': the run's own data, else digits; see the docstring
    apply_overrides(c, VARIANTS[c.variant])
    c.augment.size = c.get_ref("image_size")
    return c
