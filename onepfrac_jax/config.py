"""Config validation and the run directory: shared by every stage."""

from __future__ import annotations

import json
import os
from pathlib import Path

import ml_collections


class ConfigError(ValueError):
    """A bad config value or run directory: main.py prints it as one line and exits non-zero."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def require_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    require(value in choices, f"{name}={value!r} is not one of {', '.join(choices)}")


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def prepare_workdir(workdir: str | os.PathLike, overwrite: bool) -> Path:
    """Creates `workdir`; refuses a non-empty one unless `overwrite` (then files are replaced one by one)."""
    path = Path(workdir)
    require(not path.exists() or path.is_dir(), f"workdir {path} exists and is not a directory")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise ConfigError(f"workdir {path} is not empty; pass --config.overwrite=True to write into it anyway")
    return create_dir(path)


def create_dir(path: Path) -> Path:
    """Creates the workdir `path` (and parents); an impossible or unwritable one is a ConfigError."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"workdir {path} cannot be created: {e.strerror}") from e
    require(os.access(path, os.W_OK), f"workdir {path} is not writable")
    return path
