"""The export stage: a run's checkpoint at any kept step → WORKDIR/export/, exactly what the run writes to its own
export/ when it finishes (a folder `timm.create_model("local-dir:WORKDIR/export", pretrained=True)` loads).

The folder sits beside the stage's own config.json and result.json, as in a training run's directory (timm reads
export/config.json, the Hub's; a run's config.json is this project's), so WORKDIR also serves as an `init_from`.
It reads the checkpoint read-only onto host arrays (train/checkpoint.read_checkpoint: only finalised steps, any
saving topology, no lock), so a run still training is neither blocked nor changed, and calls the very export
function the run's own end calls (inference.EXPORTERS: `export_checkpoint` of classify or pair). A run that kept an
EMA of its weights (ema_decay > 0) also gets export/ema/, the same files for the average at that step, as its own
end writes. The folder appears complete or not at all (files.write_folder): a full disk leaves no truncated weights.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import ml_collections
from absl import logging

from onepfrac_jax.config import ConfigError, require, require_int, require_path, require_representable
from onepfrac_jax.inference import EXPORTERS
from onepfrac_jax.parallel.mesh import Mesh
from onepfrac_jax.rundir import Result, RunDir, read_run_config, without_model
from onepfrac_jax.train.checkpoint import read_checkpoint
from onepfrac_jax.train.loop import write_export


def _nested(a: Path, b: Path) -> bool:
    """Whether one of the two directories is, or lies inside, the other."""
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def validate(config: ml_collections.ConfigDict) -> None:
    """Every check that reads nothing."""
    require(str(config.run).strip() != "", "run is empty; name the run directory to export: --config.run=RUN_DIR")
    require_path("run", config.run)
    require(config.step >= -1, f"step={config.step} must be a checkpoint's step, or -1 for the latest")
    require_int("step", config.step, -1)
    require_representable(config)


def run(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh | None = None) -> Result:
    """Exports config.run's checkpoint at config.step (-1: the latest) into workdir; `mesh` is unused (host arrays)."""
    validate(config)
    source = Path(config.run).expanduser()
    saved = read_run_config(source)
    if saved.stage not in EXPORTERS:
        raise ConfigError(f"{without_model(str(source), saved.stage, 'has no checkpoints to export')} (export "
                          f"reads {', '.join(EXPORTERS)} runs)")
    require(str(workdir).strip() == "" or not _nested(Path(workdir).expanduser(), source),
            f"workdir {workdir} and the run {source} are nested; export never writes into the run (nor replaces "
            f"a folder holding it): choose a workdir outside it")
    with RunDir.open(config, workdir, resumable=False) as out:
        step, variables, data = read_checkpoint(source, None if config.step == -1 else config.step)
        out.begin()  # an overwrite replaces the earlier export here
        files = {}
        if jax.process_index() == 0:
            exporter = functools.partial(EXPORTERS[saved.stage], saved)
            averaged = None  # the same step's average, as the run's end writes it
            if saved.get("ema_decay", 0.0) > 0:
                averaged = functools.partial(exporter, read_checkpoint(source, step, ema=True)[1])
            files = write_export(out.path / "export", functools.partial(exporter, variables), averaged,
                                 f"no export was written; the run {source} is untouched")
        logging.info("exported the %s run %s at step %d to %s", saved.stage, source, step, out.path / "export")
        # step: the exported checkpoint's; history: the run's evaluations up to it, as saved beside it
        result = Result(stage="export", step=step, total_steps=0, stopped=False, history=list(data.get("history", [])),
                        files=files, state=variables)
        result.write(out.path)
        return result
