"""onepfrac-jax entry point: `python main.py --config configs/X.py[:variant] --workdir DIR [--config.key=value ...]`."""

from __future__ import annotations

import importlib
import logging as logging_std
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from absl import app, flags, logging
from ml_collections import config_flags

from onepfrac_jax import configs
from onepfrac_jax.config import STAGES, ConfigError, Interrupted, RunError, on_ctrl_c
from onepfrac_jax.parallel import distributed
from onepfrac_jax.train.loop import NonFiniteLossError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (path.py[:variant]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: outputs, checkpoints, logs.")
flags.mark_flags_as_required(["config", "workdir"])

# exit codes: 2 bad input (nothing written), 3 non-finite loss or state, 4 a fault of a started run (disk full),
# 130 Ctrl-C (the shell's 128 + SIGINT)
EXIT_CODES = {ConfigError: 2, NonFiniteLossError: 3, RunError: 4, Interrupted: 130}
CONFIG_DIR = Path(configs.__file__).resolve().parent  # the repository's configs/, installed as onepfrac_jax.configs
# Stages whose work XLA:CPU runs one core per device (rendering is scatters and elementwise loops): on a CPU they
# get one device per core unless --cpu_devices says otherwise. Training keeps one device, whose matmuls and
# convolutions use every core already.
CPU_DEVICE_PER_CORE = ("generate",)


def stage_module(stage: str) -> ModuleType:
    """onepfrac_jax.stages.<stage>: its validate(config) and run(config, workdir, mesh=None)."""
    return importlib.import_module(f"onepfrac_jax.stages.{stage}")


def resolve_config_path(value: str) -> str:
    """`configs/X.py[:variant]` names the packaged config when no such file exists here (any working directory)."""
    path, sep, variant = value.partition(":")
    if not Path(path).exists() and Path(path).parts[:1] == ("configs",):
        packaged = CONFIG_DIR.joinpath(*Path(path).parts[1:])
        if packaged.exists():
            return f"{packaged}{sep}{variant}"
    return value


def _config_values(argv: list[str]) -> Iterator[tuple[int, str, str]]:
    """(index in argv, what precedes the value there, the value) of each `--config=VALUE` or `--config VALUE`."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            yield i, "--config=", arg[len("--config="):]
        elif arg == "--config" and i + 1 < len(argv):
            yield i + 1, "", argv[i + 1]


def _with_config_resolved(argv: list[str]) -> list[str]:
    out = list(argv)
    for i, prefix, value in _config_values(argv):
        out[i] = prefix + resolve_config_path(value)
    return out


def _parse_error(e: Exception, argv: list[str]) -> str:
    """What `argv` got wrong, in one line, from what absl, ml_collections or the config file raised parsing it."""
    if isinstance(e, AttributeError | KeyError):
        key = str(e).strip("\"'")
        override = next((a for a in argv[1:] if a.startswith("--config.") and f".{key}" in a.split("=")[0]), None)
        if override is not None:
            return f"unknown config key {key!r} in {override}; see the config file for the known keys"
    # absl recasts what loading the config file raised as a bad --config value, the cause chained
    if isinstance(e, flags.Error) and not (str(e).startswith("flag --config=") and e.__context__):
        return str(e).removeprefix("flag ")  # a bad override or other flag: absl's message names it
    given = next(reversed([value for _, _, value in _config_values(argv)]), "")  # "": given in a --flagfile
    if not Path(resolve_config_path(given).partition(":")[0]).is_file():
        packaged = ", ".join(f"configs/{p.name}" for p in sorted(CONFIG_DIR.glob("[!_]*.py")))
        return f"--config={given}: no such config file (the packaged ones: {packaged})"
    cause = e
    while (inner := cause.__cause__ or cause.__context__) is not None:
        cause = inner
    return f"--config={given}: " + " ".join(str(cause).split())


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser; a bad config file, variant, override or flag, or a stray argument, ends the process with one
    `error:` line (exit 2)."""
    try:
        rest = flags.FLAGS(_with_config_resolved(argv))
        _CONFIG.value.keys()  # a config file that could not be read raises only here, where first used
    except Exception as e:  # from the config file's own code too: all of it is bad input, to report, not a crash
        distributed.fail(_parse_error(e, argv), 2)
    if len(rest) > 1:
        distributed.fail(f"unexpected argument {rest[1]!r}: settings are flags (--workdir=DIR, "
                         f"--config.KEY=VALUE)", 2)
    return rest


def _quiet_libraries(record: logging_std.LogRecord) -> bool:
    """Orbax logs every save step at INFO through absl: keep its warnings and errors, without their tracebacks (the
    run's own `error:` line says what failed), and drop the rest."""
    if "/orbax/" not in record.pathname:
        return True
    record.exc_info, record.exc_text = None, None
    return record.levelno >= logging_std.WARNING


def main(argv: list[str]) -> None:
    del argv  # parse_flags refused any positional argument
    logging.get_absl_handler().addFilter(_quiet_libraries)
    signal.signal(signal.SIGINT, on_ctrl_c)  # the training loop has its own handler, which checkpoints first
    config = _CONFIG.value
    stage = config.get("stage")
    try:
        # before any JAX computation; single-process when nothing is set
        distributed.initialize(default_cpu_devices=os.cpu_count() if stage in CPU_DEVICE_PER_CORE else None)
        if stage not in STAGES:
            raise ConfigError(f"config.stage={stage!r} is not one of {', '.join(STAGES)}")
        stage_module(stage).run(config, _WORKDIR.value)
    except (ConfigError, NonFiniteLossError, RunError, KeyboardInterrupt) as e:
        if type(e) is KeyboardInterrupt:  # outside a run directory (RunDir and the loop raise Interrupted)
            e = Interrupted("interrupted (Ctrl-C) before this command wrote anything; run it again")
        logging.error("%s", e)
        distributed.fail(e, EXIT_CODES[type(e)])  # with peers failing alike; not held by those in a collective


def cli() -> None:
    """The console entry point (`onepfrac` once installed, or `python main.py`)."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    cli()
