"""Agent CNN (plain or shared) → PyTorch state dict, saved as safetensors and as a .pth.

Key scheme (Linen path with `/` → `.` and `blocks_i` → `blocks.i`; every tensor float32):

    stem.proj.weight (D, 3, p, p), stem.proj.bias (D)            vit_like input projection
    stem.conv1.weight (64, 3, 7, 7)                              resnet_like: conv 7×7/2, padding 3, no bias
    stem.norm1.{weight, bias, running_mean, running_var} (64)    resnet_like: BatchNorm2d
    stem.proj.weight (D, 64, 3, 3), stem.proj.bias (D)           resnet_like: conv 3×3/2, padding 1
    blocks.{i}.norm1.{weight, bias, running_mean, running_var}   BatchNorm2d(D)
    blocks.{i}.conv.weight (D, D, k, k), blocks.{i}.conv.bias    conv k×k, padding k // 2
    blocks.{i}.norm2.{weight, bias, running_mean, running_var}   BatchNorm2d(D)
    blocks.{i}.mlp.fc1.weight (M, D, 1, 1), blocks.{i}.mlp.fc1.bias
    blocks.{i}.mlp.fc2.weight (D, M, 1, 1), blocks.{i}.mlp.fc2.bias
    norm.{weight, bias, running_mean, running_var}               final BatchNorm2d(D)
    head.weight (classes, D), head.bias (classes)

Conv weights are PyTorch's (out, in, kh, kw); both frameworks cross-correlate, so no kernel flip. A many-head
conv is written as its dense k×k kernel with the unused taps zero, and a shared agent as the standalone CNN
its ViT's weights define, so every export loads into one plain PyTorch CNN. `num_batches_tracked` is not
stored (Flax keeps no counter); PyTorch's BatchNorm fills it in when loading a plain dict.
"""

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from onepfrac_jax.export.pth import write_pth
from onepfrac_jax.export.timm import write_safetensors
from onepfrac_jax.models.agent import Agent, SharedAgent, many_head_dense_kernel, materialize_shared_agent

_STAT_NAMES = {"mean": "running_mean", "var": "running_var"}


def _torch_key(path: tuple[str, ...]) -> str:
    """Linen path ('blocks_0', 'norm1', 'scale') → 'blocks.0.norm1.weight'."""
    parts = [re.sub(r"^blocks_(\d+)$", r"blocks.\1", p) for p in path]
    parts[-1] = {"kernel": "weight", "scale": "weight", **_STAT_NAMES}.get(parts[-1], parts[-1])
    return ".".join(parts)


def _torch_tensor(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    """A Flax param in PyTorch layout: conv HWIO and many-head taps → OIHW, dense (in, out) → (out, in)."""
    if path[-1] != "kernel":
        return value
    if value.ndim == 3:
        value = np.asarray(many_head_dense_kernel(value))
    return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T


def _standalone(
    variables: Mapping[str, Any], model: Agent | SharedAgent, vit_params: Mapping[str, Any] | None
) -> tuple[Agent, Mapping[str, Any]]:
    """The plain `Agent` and variables to export: a shared agent materialised from its ViT's params."""
    if not isinstance(model, SharedAgent):
        return model, variables
    if vit_params is None:
        raise ValueError("exporting a SharedAgent needs vit_params: its convs and MLPs are the ViT's")
    return materialize_shared_agent(model, variables, vit_params)


def agent_to_torch_state_dict(
    variables: Mapping[str, Any], model: Agent | SharedAgent, vit_params: Mapping[str, Any] | None = None
) -> dict[str, np.ndarray]:
    """PyTorch state dict (float32 numpy, keys in the module docstring) of an agent's `variables`.

    A `SharedAgent` needs `vit_params`, the ViT's params collection its blocks are computed from.
    """
    _, variables = _standalone(variables, model, vit_params)
    flat = traverse_util.flatten_dict(dict(variables["params"]))
    flat.update(traverse_util.flatten_dict(dict(variables["batch_stats"])))
    host = {k: np.asarray(jax.device_get(v), dtype=np.float32) for k, v in flat.items()}
    return {_torch_key(k): np.ascontiguousarray(_torch_tensor(k, v)) for k, v in sorted(host.items())}


def export_agent(
    variables: Mapping[str, Any],
    model: Agent | SharedAgent,
    out_dir: str | Path,
    *,
    vit_params: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `agent.safetensors` and `agent.pth` to out_dir; return its path.

    The safetensors metadata holds, as JSON under "agent_config", the fields of the exported plain `Agent`
    (for a shared agent: the standalone many-head CNN it was materialised into).
    """
    path = Path(out_dir) / "agent.safetensors"
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    agent, agent_variables = _standalone(variables, model, vit_params)
    state = agent_to_torch_state_dict(agent_variables, agent)
    fields = [f.name for f in dataclasses.fields(agent) if f.name not in ("parent", "name")]
    config = {name: getattr(agent, name) for name in fields}
    config["dtype"] = np.dtype(config["dtype"]).name
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(path, state, {"format": "pt", "agent_config": json.dumps(config)})
    write_pth(path.with_suffix(".pth"), state)
    return path
