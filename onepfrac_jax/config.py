"""Config helpers shared by every stage: the errors main.py reports in one line, validation, variants."""

from __future__ import annotations

import json
import math
import os
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path

import ml_collections

# The stages, each a module onepfrac_jax.stages.<name> with validate(config) and run(config, workdir), and a config
# file configs/<name>.py; a config.json naming one marks a run of this project.
STAGES = ("generate", "pretrain", "finetune", "bootstrap", "evaluate", "linear_probe", "export", "demo")
# The stages that train a model: their runs hold checkpoints and export/ (inference.EXPORTERS writes it).
TRAINING_STAGES = ("pretrain", "finetune", "bootstrap")
# Steps, sizes and counts index int32 arrays on the device; JAX keys hold 32 bits of a seed (with 64-bit mode off,
# seed 2**32 makes the key of seed 0).
INT32_MAX = 2**31 - 1
SEED_MAX = 2**32 - 1
MAX_IMAGE_SIDE = 46_340  # math.isqrt(INT32_MAX): an image's side² pixels are indexed in int32


class ConfigError(ValueError):
    """A bad config value or run directory: main.py prints it as one `error:` line and exits with code 2."""


class RunError(RuntimeError):
    """A fault in a run that had started (e.g. a checkpoint cannot be written): one `error:` line, exit code 4."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what it left and how to go on (the training loop's checkpoint, the run directory's state): one
    `error:` line, exit code 130. A KeyboardInterrupt, so that no `except Exception` on the way out holds it."""


_ctrl_c = {"pending": False}


def on_ctrl_c(signum: int, frame: object) -> None:
    """main.py's SIGINT handler outside the training loop: Ctrl-C unwinds the command as an error would (RunDir says
    what it left, in one line); a second one ends the process at once.

    Python drops an exception raised in a callback it calls for itself (a weakref's, a finaliser's: "Exception
    ignored in ..."), and the handler runs wherever the signal lands, so the KeyboardInterrupt can be lost and the
    command go on. The Ctrl-C is kept as pending: the training loop, once started, acts on it (`take_ctrl_c`)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    _ctrl_c["pending"] = True
    raise KeyboardInterrupt


def take_ctrl_c() -> bool:
    """Whether a Ctrl-C came before now that nothing has acted on; it counts as acted on from here."""
    pending, _ctrl_c["pending"] = _ctrl_c["pending"], False
    return pending


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def require_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    require(value in choices, f"{name}={value!r} is not one of {', '.join(choices)}")


def require_int(name: str, value: object, low: int, high: int = INT32_MAX, why: str = "") -> None:
    """An integer field in [low, high]: a value past what the program represents is one error, not an overflow deep
    in JAX or NumPy (`why`, e.g. " (…)", says where the bound comes from)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    require(ok, f"{name}={value!r} must be an integer in [{low:,}, {high:,}]{why}")


def require_seed(name: str, value: object) -> None:
    """A seed that JAX's keys hold whole: an integer in [0, SEED_MAX]."""
    require_int(name, value, 0, SEED_MAX, " (JAX keys hold 32 bits of it)")


def _numbers(node: object, name: str) -> Iterator[tuple[str, object]]:
    """(dotted name, value) of every number in a config, tuples and lists included."""
    if isinstance(node, ml_collections.ConfigDict | dict):
        for key, value in node.items():
            yield from _numbers(value, f"{name}.{key}" if name else key)
    elif isinstance(node, tuple | list):
        for i, value in enumerate(node):
            yield from _numbers(value, f"{name}[{i}]")
    elif isinstance(node, int | float) and not isinstance(node, bool):
        yield name, node


def require_representable(config: ml_collections.ConfigDict) -> None:
    """Every number of a config is finite and every integer fits 64 bits: the machine's own range, checked after a
    stage's field-by-field ranges (which are narrower where a field needs it, e.g. int32 steps, 32-bit seeds)."""
    for name, value in _numbers(config, ""):
        if isinstance(value, float):
            require(math.isfinite(value), f"{name}={value} must be a finite number")
        else:
            require_int(name, value, -(2**63), 2**63 - 1, " (64-bit)")


def _nearest_existing(path: Path) -> Path:
    """`path` or its nearest ancestor that can be stat'ed (a name too long for the filesystem cannot)."""
    for candidate in (path, *path.parents):
        try:
            os.stat(candidate)
            return candidate
        except OSError:
            continue
    return Path(path.anchor)


def require_path(name: str, value: str | os.PathLike) -> None:
    """A path the run will create or read fits the filesystem's limits: each component at most NAME_MAX bytes and
    the whole under PATH_MAX, as the nearest existing directory's filesystem reports them ('' passes: unset)."""
    text = os.fspath(value)
    if not text.strip():
        return
    path = Path(text).expanduser().absolute()
    base = _nearest_existing(path.parent)
    name_max, path_max = (os.pathconf(base, key) for key in ("PC_NAME_MAX", "PC_PATH_MAX"))
    for part in path.parts:
        size = len(os.fsencode(part))
        require(size <= name_max, f"{name}: the name {part[:24]}… is {size} bytes long, past the {name_max} a name "
                                  f"may have on the filesystem of {base}; choose a shorter one")
    size = len(os.fsencode(str(path)))
    require(size < path_max, f"{name}={text[:40]}… is {size} bytes long, past the {path_max - 1} a path may have "
                             f"here; choose a shorter one")


def host_memory_bytes() -> int:
    """This host's physical memory (what a bank gathered on the host must fit in)."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def byte_size(size: float) -> str:
    """'5.3 MiB', '31.3 TiB': a byte count in the largest binary unit it fills."""
    units = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB")
    power = min(int(math.log(max(size, 1), 1024)), len(units) - 1)
    return f"{size / 1024**power:,.1f} {units[power]}"


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
