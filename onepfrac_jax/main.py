"""onepfrac-jax entry point: `python main.py --config configs/X.py[:variant] --workdir DIR [--config.key=value ...]`."""

from __future__ import annotations

import importlib
import logging as logging_std
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from onepfrac_jax.config import ConfigError
from onepfrac_jax.parallel import distributed
from onepfrac_jax.train.loop import NonFiniteLossError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (path.py[:variant]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: outputs, checkpoints, logs.")
flags.mark_flags_as_required(["config", "workdir"])

# stage name -> module whose run(config, workdir) executes it
STAGES = {
    "generate": "onepfrac_jax.fractals.generate",
    "pretrain": "onepfrac_jax.train.pretrain",
    "finetune": "onepfrac_jax.train.finetune",
    "bootstrap": "onepfrac_jax.train.bootstrap",
    "demo": "onepfrac_jax.demo",
}


CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def resolve_config_path(value: str) -> str:
    """`configs/X.py[:variant]` names the packaged config when no such file exists here (any working directory)."""
    path, sep, variant = value.partition(":")
    if not Path(path).exists() and Path(path).parts[:1] == ("configs",):
        packaged = CONFIG_DIR.joinpath(*Path(path).parts[1:])
        if packaged.exists():
            return f"{packaged}{sep}{variant}"
    return value


def _with_config_resolved(argv: list[str]) -> list[str]:
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith("--config="):
            out[i] = "--config=" + resolve_config_path(arg[len("--config="):])
        elif arg == "--config" and i + 1 < len(out):
            out[i + 1] = resolve_config_path(out[i + 1])
    return out


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with a config override naming an unknown key turned into one clear line."""
    argv = _with_config_resolved(argv)
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        key = str(e).strip("\"'")
        given = next((a for a in argv[1:] if a.startswith("--config.") and f".{key}" in a.split("=")[0]), key)
        print(f"error: unknown config key {key!r} in {given}; see the config file for the known keys", file=sys.stderr)
        sys.exit(2)


def _quiet_libraries(record: logging_std.LogRecord) -> bool:
    """Orbax logs every save step at INFO through absl; keep its warnings, drop the rest."""
    return record.levelno >= logging_std.WARNING or "/orbax/" not in record.pathname


def main(argv: list[str]) -> None:
    logging.get_absl_handler().addFilter(_quiet_libraries)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = _CONFIG.value
    stage = config.get("stage")
    try:
        distributed.initialize()  # before any JAX computation; single-process when nothing is set
        if stage not in STAGES:
            raise ConfigError(f"config.stage={stage!r} is not one of {', '.join(STAGES)}")
        importlib.import_module(STAGES[stage]).run(config, _WORKDIR.value)
    except (ConfigError, NonFiniteLossError) as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        # exit_now: peers blocked in a collective would otherwise hold this process at JAX's exit barrier
        distributed.exit_now(2 if isinstance(e, ConfigError) else 3)


def cli() -> None:
    """The console entry point (`onepfrac` once installed, or `python main.py`)."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    cli()
