"""Linear probe: the frozen ViT's features (its cls token after the final LayerNorm), a linear head trained on them.

  python main.py --config configs/linear_probe.py --workdir runs/probe-demo --config.init_from=runs/demo/pretrain
  python main.py --config configs/linear_probe.py:cifar100 --workdir runs/probe-c100 \
      --config.init_from=runs/pretrain-vit-tiny --config.data.data_dir=~/tensorflow_datasets

The standard read-out of formula-driven pre-training: nothing of the backbone is trained. Every image of the train
and val splits goes once through the eval transform (no augmentation) and the ViT on the devices; the features are
standardised with the train split's mean and std (MAE's BatchNorm without affine), and a linear head is trained on
them with `optim` (AdamW, cosine) in minibatches of `probe.batch_size`, each epoch a permutation keyed by `seed`.
Val top-1 after every epoch goes to metrics.csv and result.json (val_top1_max / val_top1_final).

digits_demo (default): the demo pre-train (runs/demo/pretrain, python main.py --config configs/demo.py) on
scikit-learn's digits, 100 epochs; seconds on a CPU. init_from takes the same as configs/evaluate.py (a run, its
checkpoint `step`, `ema`, or weights described by the model fields). photos_demo: the same on crops of
scikit-learn's two photos (40 regions, data.name photo_crops). cifar100: CIFAR-100 at the run's image size,
90 epochs (MAE's probe length; not run here).
"""

import ml_collections
from onepfrac_jax.configs.evaluate import DEMO_VIT, add_source_fields
from onepfrac_jax.configs.finetune import data_config

from onepfrac_jax.config import apply_overrides, new_config
from onepfrac_jax.train import optim

VARIANTS = {
    "digits_demo": DEMO_VIT,
    "photos_demo": {**DEMO_VIT, "data.name": "photo_crops"},
    "cifar100": {"data.name": "tfds:cifar100", "data.eval_split": "test", "probe.epochs": 90,
                 "probe.batch_size": 1024, "batch_size": 512},
}


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    c = new_config("linear_probe", variant, tuple(VARIANTS), "digits_demo")
    add_source_fields(c)
    c.seed = 0  # the head's init and the minibatch order
    c.data = data_config("digits", 32, "val")
    c.probe = ml_collections.ConfigDict()
    c.probe.epochs = 100  # passes over the train split's features
    c.probe.batch_size = 256  # features per head update
    c.probe.log_every_epochs = 10  # the console line; metrics.csv has every epoch
    c.optim = optim.default_optim_config()
    c.optim.update(dict(name="adamw", lr=0.05, weight_decay=0.0, warmup_epochs=5.0, min_lr=0.0, warmup_lr=0.0,
                        scale_lr=False))
    apply_overrides(c, VARIANTS[c.variant])
    c.augment.size = c.get_ref("image_size")
    return c
