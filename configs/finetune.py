"""Fine-tune a ViT on a real dataset, from scratch or from pre-trained weights (SPEC §A5).

  python main.py --config configs/finetune.py:cifar100 --workdir runs/ft-c100 \
      --config.init_from=runs/pretrain-vit-tiny --config.data.data_dir=~/tensorflow_datasets
  python main.py --config configs/finetune.py:imagefolder --workdir runs/ft-x \
      --config.data.data_dir=/data/x --config.init_from=pretrain_deit_tiny_1p-frac.pth   # the authors' weights
  python main.py --config configs/finetune.py:digits_demo --workdir runs/demo/finetune \
      --config.init_from=runs/demo/pretrain                                                # minutes on a CPU
  python main.py --config configs/finetune.py:digits_demo_64 --workdir runs/demo/finetune-64 \
      --config.init_from=runs/demo/pretrain                      # the 32-px pre-train fine-tuned at 64 px
  python main.py --config configs/finetune.py:digits_demo_ema --workdir runs/demo/finetune-ema \
      --config.init_from=runs/demo/pretrain       # + an EMA of the weights, evaluated and exported beside them

cifar100: the 1p-frac fine-tuning recipe — SGD momentum 0.9, lr 0.01 × batch/512, weight decay 1e-4, cosine with
10 warm-up epochs, batch 768, RandAugment + mixup/cutmix + label smoothing 0.1 + random erasing 0.25, images
resized to 224. The paper reports ViT-Ti top-1 84.2% from 1p-frac, 64.2% from scratch; this stage prints the max
and final val top-1. `init_from` takes a run directory (its export/), an export folder, a .safetensors, or a .pth
holding a timm state dict or {'model': state_dict}; the head is replaced when the class count differs. Weights of
another image size (patch grid) load into a ViT of `image_size`: their position embeddings are resampled as timm
does (bicubic, antialiased, class token kept), up or down, and the log says so; digits_demo_64 fine-tunes the 32-px
demo pre-train (4×4 patches) at 64 px (8×8).
"""

import ml_collections

from onepfrac_jax.config import new_config
from onepfrac_jax.data.augment import default_augment_config
from onepfrac_jax.train import classify, loop


def data_config(name: str, image_size: int, eval_split: str) -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    d.name = name  # 'imagefolder' | 'tfds:<name>' (e.g. tfds:cifar100) | 'digits'
    d.data_dir = ""  # imagefolder: the folder holding train/ and val/; tfds: the TFDS data_dir ('' = default)
    d.image_size = image_size  # the host decodes every image to this square size (uint8)
    d.fraction = 1.0  # keep this fraction of each class of the train split (first files in sorted order)
    d.eval_split = eval_split
    d.num_threads = 2  # host decode threads (also of the start-up check)
    # decode every image once at start-up, naming any that is corrupt, when a split has at most this many files
    # (10k small files take seconds, ImageNet's 1.28M would take an hour: then a corrupt file stops the run when it
    # is read, naming it, and the last checkpoint resumes once it is fixed); 0 turns the check off
    d.verify_max_files = 50_000
    d.prefetch_batches = 4
    # grain worker processes decoding in parallel, each with num_threads threads; 0: decode in this process. Host
    # decode is CPU-bound (~150 photo-sized JPEGs/s a core here): at ImageNet scale set it near the host's cores
    # less one or two (python -m benchmarks.host_input measures images/s against it). The batches are the
    # same for any value.
    d.worker_count = 0
    return d


def recipe_augment(size: int) -> ml_collections.ConfigDict:
    a = default_augment_config()
    a.update(dict(size=size, crop="rrc", interpolation="bicubic", hflip=0.5, auto_augment="rand-m9-mstd0.5-inc1",
                  re_prob=0.25, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1,
                  mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
    return a


VARIANTS = ("cifar100", "imagefolder", "digits_demo", "digits_demo_64", "digits_demo_ema", "photos_demo")


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    c = new_config("finetune", variant, tuple(VARIANTS), "cifar100")
    loop.default_train_config(c)
    classify.add_model_fields(c, "vit_tiny_patch16_224")
    # '' (scratch), a run directory, an export folder (model.safetensors + config.json), or a .safetensors / .pth file
    c.init_from = ""
    c.image_size = 224
    c.optim.name = "sgd"
    c.optim.lr = 0.01
    c.optim.momentum = 0.9
    c.optim.weight_decay = 1e-4
    c.optim.warmup_epochs = 10.0
    c.optim.warmup_lr = 1e-6
    c.optim.min_lr = 1e-5
    c.batch_size = 768
    c.num_epochs = 1000.0  # set to your budget
    c.log_every_steps = 50
    c.checkpoint_every_steps = 1000
    c.data = data_config("tfds:cifar100", 32, "test")
    c.augment = recipe_augment(224)
    if c.variant == "imagefolder":
        c.data = data_config("imagefolder", 256, "val")
    elif c.variant in ("digits_demo", "digits_demo_64", "digits_demo_ema", "photos_demo"):
        # scikit-learn's bundled 8×8 digits upsampled to 32² (photos_demo: crops of its two photos, 40 regions);
        # the demo ViT of configs/pretrain.py:demo.
        c.data = data_config("photo_crops" if c.variant == "photos_demo" else "digits", 32, "val")
        c.image_size = 32
        c.update(dict(patch_size=8, embed_dim=96, depth=4, num_heads=3, mlp_dim=384, drop_path=0.0))
        c.batch_size = 64
        c.num_epochs = 12.0
        c.optim.update(dict(name="adamw", lr=5e-4, weight_decay=0.05, warmup_epochs=1.0, scale_lr=False))
        c.augment = default_augment_config()
        c.augment.update(dict(crop="rrc", scale=(0.6, 1.0), interpolation="bilinear", label_smoothing=0.1,
                              mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
        c.log_every_steps = 22
        c.checkpoint_every_steps = 100
        if c.variant == "digits_demo_64":
            c.image_size = 64  # the digits, decoded at 32², upsampled by the crop
        if c.variant == "digits_demo_ema":
            c.ema_decay = 0.99  # ~270 steps: the average's half-life is ~70 steps; val_top1_ema beside val_top1
    c.augment.size = c.get_ref("image_size")  # follows --config.image_size
    return c
