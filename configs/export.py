"""Export a run's checkpoint to PyTorch: any kept step, of a finished, stopped or still-training run.

  python main.py --config configs/export.py --workdir runs/ft-c100-latest --config.run=runs/ft-c100
  python main.py --config configs/export.py --workdir runs/pt-200k --config.run=runs/pretrain-vit-tiny \
      --config.step=200000                                      # any step in RUN/checkpoints/

Writes into WORKDIR/export/ what the run writes to RUN/export/ when it finishes — model.safetensors + config.json
(the Hub layout: timm.create_model("local-dir:WORKDIR/export", pretrained=True)), model.pth and timm.json, and for a
bootstrap run agent.safetensors / agent.pth; for a run with an EMA (ema_decay > 0) export/ema/ holds the same
files for the average at that step — and beside it the stage's config.json and result.json (the exported
step and the run's evaluations up to it); WORKDIR then serves as an init_from like a run. It reads the checkpoint
on one CPU process whatever topology saved it, never writes into RUN and takes no lock there. A step that is not
kept is one error listing the kept steps.
"""

import ml_collections

from onepfrac_jax.config import new_config


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    c = new_config("export", variant, ("default",), "default")
    c.run = ""  # the run directory to export (a pretrain, finetune or bootstrap run)
    c.step = -1  # the checkpoint step to export; -1: the latest
    c.overwrite = False  # replace an earlier export in workdir
    return c
