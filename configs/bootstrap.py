"""Bootstrapping ViTs (SPEC §B): a ViT trained with a CNN agent, as two models (joint) or one tree (shared).

  python main.py --config configs/bootstrap.py:cifar100_small_joint --workdir runs/boot-c100-s-joint \
      --config.data.data_dir=~/tensorflow_datasets
  python main.py --config configs/bootstrap.py:imagenet10_joint --workdir runs/boot-in10 \
      --config.data.data_dir=/data/imagenet                  # an ImageFolder holding train/ and val/
  python main.py --config configs/bootstrap.py:digits_demo_joint --workdir runs/demo/boot-joint   # minutes on a CPU
  python main.py --config configs/bootstrap.py:digits_demo_alone --workdir runs/demo/boot-alone   # its lone ViT
  python main.py --config configs/finetune.py:cifar100 --workdir runs/ft --config.init_from=runs/boot-c100-s-joint

The recipe (SPEC §B3): AdamW lr 1e-3, weight decay 0.05, cosine over 240 epochs, no warm-up, batch 64; CIFAR:
random crop 32 with padding 4, hflip, resize to 224, CIFAR mean/std; ImageNet-10%: RandomResizedCrop scale
(0.6, 1), hflip. The paper's final-epoch top-1 on CIFAR-100: ViT-S scratch 61.25 → joint 76.19, shared 75.50
(agent-S alone 74.62); ImageNet-10%: ViT-B 28.11 → joint 49.73, shared 45.75. The run prints both models'
final-epoch top-1 and writes them to result.json; export/ holds the ViT as timm weights (so the fine-tune stage
takes the run directory as `init_from`) and the agent as a PyTorch state dict (agent.safetensors / agent.pth).

Pairs, as the authors' configs: ViT-S (vit_small_bootstrap) with agent_small; ViT-B (vit_base_bootstrap) with
agent_base_res_like, 2×2 pooled after blocks 2 and 8. The loss weights default to the mode's paper values
(-1); `--config.mode` switches between joint and shared on any variant.
"""

import ml_collections
from onepfrac_jax.configs.finetune import data_config

from onepfrac_jax.config import apply_overrides, new_config
from onepfrac_jax.data.augment import default_augment_config
from onepfrac_jax.train import classify, loop

CIFAR_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_SMALL = {"model": "vit_small_bootstrap", "dropout": 0.1, "agent.preset": "agent_small"}
_BASE = {"model": "vit_base_bootstrap", "dropout": 0.0, "agent.preset": "agent_base_res_like",
         "agent.down_sample_layers": (2, 8)}
# A minute or two on a 2-core CPU: scikit-learn's digits at 32², 4 blocks of width 96 over a 4×4 grid on both
# sides; 6 heads, because the shared agent's many-head conv needs an odd kernel ⌈√H⌉.
_DEMO = {"data.name": "digits", "data.image_size": 32, "data.eval_split": "val", "image_size": 32, "patch_size": 8,
         "embed_dim": 96, "depth": 4, "num_heads": 6, "mlp_dim": 384, "dropout": 0.0,
         "agent.embed_dim": 96, "agent.depth": 4, "agent.num_heads": 6, "num_epochs": 16.0,
         # At this budget the authors' init starves the shared agent (docs/stages.md, "bootstrap"): its
         # N(0, 1) stem swamps the blocks computed from the ViT, so the agent is little more than stem + head.
         "vit_init": "xavier", "agent.stem_init": "torch",
         "augment.hflip": 0.0, "augment.mean": (0.5, 0.5, 0.5), "augment.std": (0.5, 0.5, 0.5),
         "log_every_steps": 22, "checkpoint_every_steps": 176}

VARIANTS = {
    "cifar100_small_joint": {**_SMALL, "mode": "joint"},
    "cifar100_small_shared": {**_SMALL, "mode": "shared"},
    "cifar100_base_joint": {**_BASE, "mode": "joint"},
    "cifar100_base_shared": {**_BASE, "mode": "shared"},
    "imagenet10_joint": {**_BASE, "mode": "joint", "data.name": "imagefolder", "data.image_size": 256,
                         "data.eval_split": "val", "data.fraction": 0.1, "augment.crop": "rrc",
                         "augment.scale": (0.6, 1.0), "augment.crop_pct": 224 / 256,
                         "augment.mean": IMAGENET_MEAN, "augment.std": IMAGENET_STD},
    # The paper's hint weight ÷ 10: at the demo's 352 steps the full weight holds the ViT to the agent's features
    # for most of training (docs/stages.md, "bootstrap"); `--config.loss.hint=-1` restores it.
    "digits_demo_joint": {**_SMALL, **_DEMO, "mode": "joint", "loss.hint": 1.0},
    "digits_demo_shared": {**_SMALL, **_DEMO, "mode": "shared", "loss.hint": 0.5},
}
# The lone baselines: each joint variant with no KD and no hint, so the ViT trains alone on identical settings
# (init, data, augmentation, budget) while its agent trains beside it, untouched: "alone vs joint vs shared" are
# three variants of one recipe.
_ALONE = {"loss.kd_vit": 0.0, "loss.kd_cnn": 0.0, "loss.hint": 0.0}
VARIANTS.update({name.removesuffix("_joint") + "_alone": {**fields, **_ALONE}
                 for name, fields in list(VARIANTS.items()) if name.endswith("_joint")})


def agent_config() -> ml_collections.ConfigDict:
    a = ml_collections.ConfigDict()
    a.preset = "agent_small"  # agent_small | agent_base | agent_small_res_like | agent_base_res_like
    a.embed_dim = -1  # block width; -1 keeps the preset's (must equal the ViT's for the hints)
    a.depth = -1  # block count; -1 keeps the preset's
    a.num_heads = -1  # many-head conv heads (agent_base, and every shared agent); -1 keeps the preset's
    a.patch_size = -1  # vit_like input projection; -1 takes the ViT's patch size
    a.dropout = -1.0  # MLP dropout; -1: 0.1 in joint mode (the authors' agents), the ViT's dropout in shared mode
    a.down_sample_layers = ()  # 2×2 average pool after these blocks
    a.stem_init = "normal"  # vit_like stem: 'normal' N(0, 1) (the authors'), 'torch' PyTorch's U(±1/√fan_in)
    a.residual_dropout = -1.0  # on each block branch; -1: the ViT's dropout in shared mode (the authors'), 0 joint
    return a


def loss_config() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    # -1 takes the mode's paper weight: joint 1, 1, 1, 1, 10; shared 0.5, 0.5, 0.5, 0.5, 5.
    s.ce_vit = -1.0  # ViT cross-entropy
    s.ce_cnn = -1.0  # agent cross-entropy
    s.kd_vit = -1.0  # KD(vit ← agent)
    s.kd_cnn = -1.0  # KD(agent ← vit)
    s.hint = -1.0  # Σ hint (ViT as student), further × max(0, 1 − epoch / epochs)
    s.temperature = 4.0  # KD temperature, both directions
    s.hint_layers = ()  # hinted block indices; () = every block
    return s


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    c = new_config("bootstrap", variant, tuple(VARIANTS), "cifar100_small_joint")
    c.mode = "joint"  # 'joint': two models, two optimizer states; 'shared': the agent computed from the ViT
    loop.default_train_config(c)
    classify.add_model_fields(c, "vit_small_bootstrap")
    c.drop_path = 0.0  # the authors' ViTs have no stochastic depth
    c.vit_init = "bootstrap"  # ViT init: 'bootstrap' (the authors' code), 'xavier' (its matrices only), 'timm'
    c.image_size = 224
    c.agent = agent_config()
    c.loss = loss_config()
    c.batch_size = 64
    c.num_epochs = 240.0
    # The authors' PyTorch AdamW decays every parameter; their cosine steps once per epoch.
    c.optim.update(dict(name="adamw", lr=1e-3, weight_decay=0.05, warmup_epochs=0.0, min_lr=0.0, scale_lr=False,
                        decay_all=True, per_epoch=True))
    c.log_every_steps = 50
    c.checkpoint_every_steps = 2000
    c.data = data_config("tfds:cifar100", 32, "test")
    c.augment = default_augment_config()
    c.augment.update(dict(crop="pad_crop", pad=4, hflip=0.5, interpolation="bilinear", mean=CIFAR_MEAN,
                          std=CIFAR_STD))
    apply_overrides(c, VARIANTS[c.variant])
    c.augment.size = c.get_ref("image_size")  # follows --config.image_size
    return c
