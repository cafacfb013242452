"""Computation dtypes a config may name, and what `dtype='auto'` picks on the devices at hand.

'auto' (every stage's default): bfloat16 on TPUs and on GPUs of compute capability ≥ 8.0 (A100, H100: bfloat16
tensor cores, float32's range, no loss scaling); float16 on compute capability 7.x (V100, T4: float16 tensor cores,
no bfloat16), which the training loop runs with dynamic loss scaling; float32 on CPUs (XLA:CPU computes bfloat16
and float16 no faster, and the CPU demos and tests keep their float32 results), on older GPUs and on anything it
does not recognise. Parameters, LayerNorm, softmax and logits stay float32 in every case (models.vit).

And which kernel computes attention (`attention`, every ViT stage; default 'auto'): 'cudnn' (cuDNN's fused flash
attention) on NVIDIA GPUs of compute capability ≥ 8.0 computing in bfloat16/float16, if a probe of the model's own
attention shape — forward and backward, jitted on the first local device — compiles there and agrees with XLA's;
'xla' everywhere else (CPUs, TPUs, V100s, float32, or a probe that failed: the log says why). 'xla' and 'cudnn'
stand for themselves; 'cudnn' off a GPU or in float32 is refused at start-up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
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
    _log_once(f"dtype='auto' → {picked}: {why}")
    return picked


ATTENTIONS = (AUTO, "xla", "cudnn")
_GPU_PLATFORMS = ("gpu", "cuda")
_CUDNN_DTYPES = ("bfloat16", "float16")  # what cuDNN's flash attention computes in
# bfloat16 keeps 8 bits of mantissa: cuDNN's and XLA's float32-accumulated results agree to a few of its ulps
_PROBE_TOLERANCE = 0.05
_probed: dict[tuple, tuple[str, str]] = {}


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logging.info("%s", message)


def validate_attention(name: str, dtype: str, devices: Sequence[Any] | None = None) -> None:
    """Raises ValueError for an `attention` value these devices and the resolved `dtype` cannot run."""
    if name not in ATTENTIONS:
        raise ValueError(f"attention={name!r} is not one of {', '.join(ATTENTIONS)}")
    if name != "cudnn":
        return
    devices = jax.devices() if devices is None else devices
    platforms = sorted({str(getattr(d, "platform", "")).lower() for d in devices})
    if any(p not in _GPU_PLATFORMS for p in platforms):
        raise ValueError(f"attention='cudnn' needs NVIDIA GPUs; these devices are {', '.join(platforms)} "
                         f"(use 'auto' or 'xla')")
    if dtype not in _CUDNN_DTYPES:
        raise ValueError(f"attention='cudnn' computes in bfloat16/float16 only; dtype is {dtype}")


def attention_probe(tokens: int, heads: int, head_dim: int, dtype: str, candidate: str = "cudnn") -> Callable[[], None]:
    """A check that `candidate` attention runs this shape here: jitted forward and backward of a (2, tokens, heads,
    head_dim) attention on fixed inputs through the candidate and XLA; raises if the candidate fails or differs by
    more than _PROBE_TOLERANCE (relative to the outputs' and gradients' largest magnitude)."""

    def probe() -> None:
        shape = (2, tokens, heads, head_dim)
        q, k, v = (jax.random.normal(jax.random.key(i), shape, DTYPES[dtype]) for i in range(3))

        def results(impl: str) -> list[np.ndarray]:
            loss = lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(q, k, v, implementation=impl)
                                           .astype(jnp.float32) ** 2)
            out = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=impl))(q, k, v)
            grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
            return [np.asarray(x, np.float32) for x in (out, *grads)]

        for name, got, want in zip(("output", "dq", "dk", "dv"), results(candidate), results("xla"), strict=True):
            scale = max(float(np.max(np.abs(want))), 1e-6)
            error = float(np.max(np.abs(got - want))) / scale
            if not error <= _PROBE_TOLERANCE:
                raise ValueError(f"{candidate}'s {name} differs from XLA's by {error:.3g} of its largest magnitude")

    return probe


def auto_attention(dtype: str, devices: Sequence[Any], probe: Callable[[], None]) -> tuple[str, str]:
    """(implementation, why) that attention='auto' picks for `devices` computing in `dtype`; `probe` (see
    attention_probe) runs only where cuDNN is a candidate, and any exception it raises means 'xla'."""
    if dtype not in _CUDNN_DTYPES:
        return "xla", f"dtype {dtype}: cuDNN flash attention takes bfloat16/float16 only"
    platforms = {str(getattr(d, "platform", "")).lower() for d in devices}
    if not devices or platforms - set(_GPU_PLATFORMS):
        return "xla", f"{', '.join(sorted(platforms)) or 'no devices'}: cuDNN attention is for NVIDIA GPUs"
    capabilities = [_capability(d) for d in devices]
    if any(c is None or c < (8, 0) for c in capabilities):
        kind = getattr(devices[0], "device_kind", "GPU")
        return "xla", f"{kind}: cuDNN flash attention needs compute capability ≥ 8.0"
    try:
        probe()
    except Exception as e:  # any failure of the candidate means the portable kernel
        return "xla", f"the cuDNN probe failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return "cudnn", "NVIDIA GPUs of compute capability ≥ 8.0; the probe of this shape compiled and matched XLA's"


def resolve_attention(name: str, dtype: str, shape: tuple[int, int, int], devices: Sequence[Any] | None = None,
                      probe: Callable[[], None] | None = None) -> str:
    """The implementation ('xla' | 'cudnn') that config value `name` means for a model whose attention is `shape`
    (tokens, heads, head_dim) computing in `dtype` (a resolved DTYPES name), on `devices` (default: this process's).
    'auto' is resolved by `auto_attention` with `probe` (default: attention_probe of the shape, its outcome kept
    for the process so that a stage building its model again does not probe again) and logged once per outcome.
    Bad values are a ValueError (validate_attention)."""
    devices = jax.local_devices() if devices is None else devices
    validate_attention(name, dtype, devices)
    if name != AUTO:
        return name
    if probe is None:
        key = (dtype, shape, tuple((d.platform, getattr(d, "compute_capability", None)) for d in devices))
        if key not in _probed:
            _probed[key] = auto_attention(dtype, devices, attention_probe(*shape, dtype))
        picked, why = _probed[key]
    else:
        picked, why = auto_attention(dtype, devices, probe)
    _log_once(f"attention='auto' → {picked}: {why}")
    return picked
