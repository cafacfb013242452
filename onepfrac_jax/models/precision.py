"""Computation dtypes a config may name, and what `dtype='auto'` picks on the devices at hand.

'auto' (every stage's default): bfloat16 on TPUs and on GPUs of compute capability ≥ 8.0 (A100, H100: bfloat16
tensor cores, float32's range, no loss scaling); float16 on compute capability 7.x (V100, T4: float16 tensor cores,
no bfloat16), which the training loop runs with dynamic loss scaling; float32 on CPUs (XLA:CPU computes bfloat16
and float16 no faster, and the CPU demos and tests keep their float32 results), on older GPUs and on anything it
does not recognise. Parameters, LayerNorm, softmax and logits stay float32 in every case (models.vit).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

# Computation dtypes a config may name (`dtype`); parameters always stay float32. 'auto' has no dtype of its own:
# resolve_dtype names the one it means on the devices at hand.
AUTO = "auto"
DTYPES = {AUTO: None, "float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# When devices disagree (never within one JAX backend in practice), the most cautious of their picks wins.
_CAUTION = ("float32", "float16", "bfloat16")
_logged: set[str] = set()


def _capability(device: Any) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device's compute capability ('8.0' in jaxlib); None when absent or not CUDA's."""
    value = str(getattr(device, "compute_capability", "") or "")
    major, _, minor = value.partition(".")
    return (int(major), int(minor)) if major.isdigit() and minor.isdigit() else None


def device_dtype(device: Any) -> tuple[str, str]:
    """(dtype name, why) that 'auto' picks for one device (a jax.Device, or anything with its attributes)."""
    platform = str(getattr(device, "platform", "")).lower()
    kind = getattr(device, "device_kind", platform or "unknown device")
    if platform == "cpu":
        return "float32", f"{kind}: XLA:CPU runs bfloat16/float16 no faster than float32"
    if platform == "tpu":
        return "bfloat16", f"{kind}: TPUs compute in bfloat16 natively"
    if platform in ("gpu", "cuda", "rocm"):
        capability = _capability(device)
        if capability is None:
            return "float32", (f"{kind}: compute capability {getattr(device, 'compute_capability', None)!r} "
                               f"unknown; set dtype explicitly")
        cc = "{}.{}".format(*capability)
        if capability >= (8, 0):
            return "bfloat16", f"{kind}: compute capability {cc} ≥ 8.0 has bfloat16 tensor cores"
        if capability >= (7, 0):
            return "float16", (f"{kind}: compute capability {cc} has float16 tensor cores but no bfloat16; "
                               f"dynamic loss scaling")
        return "float32", f"{kind}: compute capability {cc} < 7.0 has no tensor cores"
    return "float32", f"{kind}: unknown platform {platform!r}"


def auto_dtype(devices: Sequence[Any]) -> tuple[str, str]:
    """(dtype name, why) that 'auto' picks for these devices: their common pick, else the most cautious one."""
    if not devices:
        return "float32", "no devices"
    picks = [device_dtype(d) for d in devices]
    name, why = min(picks, key=lambda pick: _CAUTION.index(pick[0]))
    if len({n for n, _ in picks}) > 1:
        why += " (the most cautious pick of mixed devices)"
    return name, f"{len(devices)} × {why}" if len(devices) > 1 else why


def resolve_dtype(name: str, devices: Sequence[Any] | None = None) -> str:
    """The concrete DTYPES name that config value `name` means on `devices` (default: jax.devices(), every
    process's): 'auto' is resolved by `auto_dtype` and logged once per process per outcome, the other names stand
    for themselves, anything else is a ValueError naming the choices.
    """
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} is not one of {', '.join(DTYPES)}")
    if name != AUTO:
        return name
    picked, why = auto_dtype(jax.devices() if devices is None else devices)
    message = f"dtype='auto' → {picked}: {why}"
    if message not in _logged:
        _logged.add(message)
        logging.info("%s", message)
    return picked
