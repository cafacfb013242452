"""Config helpers shared by every stage: the errors main.py reports in one line, validation, variants."""

from __future__ import annotations

import json
from collections.abc import Sequence

import ml_collections

# The stages, each a module onepfrac_jax.stages.<name> with validate(config) and run(config, workdir), and a config
# file configs/<name>.py; a config.json naming one marks a run of this project.
STAGES = ("generate", "pretrain", "finetune", "bootstrap", "evaluate", "linear_probe", "export", "demo")
# The stages that train a model: their runs hold checkpoints and export/ (inference.EXPORTERS writes it).
TRAINING_STAGES = ("pretrain", "finetune", "bootstrap")


class ConfigError(ValueError):
    """A bad config value or run directory: main.py prints it as one `error:` line and exits with code 2."""


class RunError(RuntimeError):
    """A fault in a run that had started (e.g. a checkpoint cannot be written): one `error:` line, exit code 4."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def require_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    require(value in choices, f"{name}={value!r} is not one of {', '.join(choices)}")


def first_few(items: Sequence[str], separator: str = ", ", shown: int = 3) -> str:
    """'a, b, c and 4 more': an error about many things names the first `shown` and counts the rest."""
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return separator.join(items[:shown]) + more


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def new_config(stage: str, variant: str | None, variants: Sequence[str], default: str) -> ml_collections.ConfigDict:
    """A stage config's first fields: `stage` and the checked `variant` (`default` when None)."""
    variant = variant or default
    if variant not in variants:
        raise ValueError(f"unknown variant {variant!r} of configs/{stage}.py; known: {', '.join(variants)}")
    return ml_collections.ConfigDict({"stage": stage, "variant": variant})


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """Sets dotted keys (`"optim.lr": 1e-3`) of a variant's table on `config`; returns it."""
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        target = config
        for part in filter(None, section.split(".")):
            target = target[part]
        target[name] = value
    return config
