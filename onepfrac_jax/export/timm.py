"""Flax `ViT` ⇄ timm `VisionTransformer` weights, and the export folder timm and the Hugging Face Hub read.

The ViT is built in timm's layout, so conversion is a renaming plus two transposes:
Dense kernels (in, out) ↔ Linear weights (out, in), and the patch conv kernel (p, p, 3, D) ↔ (D, 3, p, p).
A checkpoint of another patch grid (another image size) has its position embeddings resampled on load, as timm's
`resample_abs_pos_embed` does by default: the class token kept, the g × g grid resized bicubically with
antialiasing (up or down); another patch size is an error. `export_vit` writes the Hub layout (`config.json` +
`model.safetensors`), which `timm.create_model("local-dir:DIR", pretrained=True)` loads in one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.flax
import safetensors.numpy
from flax import traverse_util

from onepfrac_jax.config import first_few
from onepfrac_jax.data.augment import resample_matrix
from onepfrac_jax.export.pth import write_pth
from onepfrac_jax.files import write_file
from onepfrac_jax.models.vit import ViT, init_head

log = logging.getLogger(__name__)


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray], metadata: dict[str, str]) -> None:
    """A .safetensors file, whole or not at all, with the mode every other file of a run gets (the umask's):
    safetensors' own save_file creates it 0600, which teammates on a shared filesystem cannot read."""
    write_file(Path(path), safetensors.numpy.save(dict(tensors), metadata=metadata))


# timm architectures with exactly the same block structure as `ViT`, keyed by (patch, dim, depth, heads, mlp).
_TIMM_ARCHS = {
    (16, 192, 12, 3, 768): "vit_tiny_patch16_224",
    (8, 384, 12, 6, 1536): "vit_small_patch8_224",
    (16, 384, 12, 6, 1536): "vit_small_patch16_224",
    (32, 384, 12, 6, 1536): "vit_small_patch32_224",
    (8, 768, 12, 12, 3072): "vit_base_patch8_224",
    (16, 768, 12, 12, 3072): "vit_base_patch16_224",
    (32, 768, 12, 12, 3072): "vit_base_patch32_224",
    (16, 1024, 24, 16, 4096): "vit_large_patch16_224",
    (32, 1024, 24, 16, 4096): "vit_large_patch32_224",
}
_FALLBACK_ARCH = "vit_base_patch16_224"  # every dimension is overridden (timm.json kwargs, config.json model_args)
_TIMM_IMG_SIZE = 224  # the image size of every architecture above
_HEAD_KEYS = ("head.weight", "head.bias")
_PREFIX_TOKENS = 1  # the class token, ahead of the grid's positions


def _describe(model: ViT) -> str:
    """The model in one line (a Flax module's repr spans a line per field)."""
    return (f"ViT(img_size={model.img_size}, patch_size={model.patch_size}, embed_dim={model.embed_dim}, "
            f"depth={model.depth}, num_heads={model.num_heads}, mlp_dim={model.mlp_dim}, "
            f"num_classes={model.num_classes})")


def _first_few(kind: str, items: Sequence[str]) -> str:
    """'kind (7): a, b, c and 4 more', or '' for no items."""
    return f"{kind} ({len(items)}): {first_few(items)}" if items else ""


def _mismatch_error(source: str, model: ViT, problems: Sequence[str]) -> ValueError:
    return ValueError(f"{source} does not fit {_describe(model)}: {'; '.join(p for p in problems if p)}")


def _timm_key(path: tuple[str, ...]) -> str:
    """Flax path ('blocks_3', 'attn', 'qkv', 'kernel') → timm key 'blocks.3.attn.qkv.weight'."""
    parts = [re.sub(r"^blocks_(\d+)$", r"blocks.\1", p) for p in path]
    if parts[-1] in ("kernel", "scale"):
        parts[-1] = "weight"
    return ".".join(parts)


def _timm_axes(path: tuple[str, ...], ndim: int) -> tuple[int, ...]:
    """Axis order taking a Flax param to its timm tensor: conv HWIO → OIHW, dense (in, out) → (out, in)."""
    if path[-1] != "kernel":
        return tuple(range(ndim))
    return (3, 2, 0, 1) if ndim == 4 else (1, 0)


def _param_shapes(model: ViT) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flattened param shapes of `model`, without allocating any weights."""
    x = jax.ShapeDtypeStruct((1, model.img_size, model.img_size, 3), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes).items()}


def flax_to_timm_state_dict(params: Mapping[str, Any], model: ViT) -> dict[str, np.ndarray]:
    """timm state dict (float32 numpy) of the Flax ViT `params` (the tree under 'params')."""
    flat = traverse_util.flatten_dict(dict(params))
    expected = _param_shapes(model)
    got = {k: tuple(np.shape(v)) for k, v in flat.items()}
    if got != expected:
        raise _mismatch_error("params tree", model, [
            _first_few("missing", sorted("/".join(k) for k in set(expected) - set(got))),
            _first_few("unexpected", sorted("/".join(k) for k in set(got) - set(expected))),
            _first_few("wrong shape", sorted(f"{'/'.join(k)} {got[k]} vs model {expected[k]}"
                                             for k in set(got) & set(expected) if got[k] != expected[k])),
        ])
    # timm models are float32; bfloat16 params (if any) also have no plain-numpy dtype.
    host = {k: np.asarray(jax.device_get(v), dtype=np.float32) for k, v in flat.items()}
    return {_timm_key(k): np.ascontiguousarray(v.transpose(_timm_axes(k, v.ndim))) for k, v in host.items()}


def _mlp_ratio(embed_dim: int, mlp_dim: int) -> float:
    """A float r with timm's int(embed_dim * r) == mlp_dim (timm stores the hidden width only as a ratio)."""
    ratio = mlp_dim / embed_dim
    if int(embed_dim * ratio) != mlp_dim:
        # The rounded ratio fell just short (e.g. 369/90); one ulp up always lands in [mlp_dim, mlp_dim + 1),
        # since embed_dim * ulp(ratio) ≈ mlp_dim * 2^-52.
        ratio = float(np.nextafter(ratio, math.inf))
    return ratio


def _channels(mean: Sequence[float], std: Sequence[float]) -> tuple[list[float], list[float]]:
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 channel values, got mean={mean}, std={std}")
    return [float(m) for m in mean], [float(s) for s in std]


def _timm_arch(model: ViT) -> str | None:
    """The timm architecture of `model`'s block structure, or None when no timm name has its dimensions."""
    return _TIMM_ARCHS.get((model.patch_size, model.embed_dim, model.depth, model.num_heads, model.mlp_dim))


def _dims(model: ViT) -> dict[str, Any]:
    """The timm `VisionTransformer` arguments fixing `model`'s shapes."""
    return {"img_size": model.img_size, "patch_size": model.patch_size, "embed_dim": model.embed_dim,
            "depth": model.depth, "num_heads": model.num_heads,
            "mlp_ratio": _mlp_ratio(model.embed_dim, model.mlp_dim)}


def timm_config(model: ViT, mean: Sequence[float], std: Sequence[float]) -> dict[str, Any]:
    """The `timm.json` content: `timm.create_model(cfg['model_name'], **cfg['kwargs'])` rebuilds `model`."""
    mean, std = _channels(mean, std)
    kwargs = {
        "num_classes": model.num_classes,
        **_dims(model),
        "in_chans": 3,
        "qkv_bias": True,
        "class_token": True,
        "global_pool": "token",
        "no_embed_class": False,
        "pre_norm": False,
        "final_norm": True,
        "drop_rate": 0.0,
        "pos_drop_rate": model.drop_rate,
        "proj_drop_rate": model.drop_rate,
        "attn_drop_rate": model.attn_drop_rate,
        "drop_path_rate": model.drop_path_rate,
        # Lets timm.data.resolve_data_config(model=...) find the training normalisation and input size.
        "pretrained_cfg_overlay": {
            "mean": mean,
            "std": std,
            "input_size": [3, model.img_size, model.img_size],
            "num_classes": model.num_classes,
        },
    }
    return {"model_name": _timm_arch(model) or _FALLBACK_ARCH, "kwargs": kwargs, "mean": mean, "std": std}


def hub_config(
    model: ViT,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    interpolation: str | None = None,
    crop_pct: float | None = None,
) -> dict[str, Any]:
    """The `config.json` of the Hub layout: `timm.create_model("local-dir:DIR", pretrained=True)` rebuilds `model`.

    `architecture` is the timm name of the block structure; `model_args` holds what differs from it (the image size,
    or every dimension when no timm name fits). `pretrained_cfg` is what `timm.data.resolve_data_config` reads: the
    input size, mean and std, and the eval resize's interpolation and crop_pct when given (else timm's defaults).
    """
    mean, std = _channels(mean, std)
    arch = _timm_arch(model)
    if arch is None:
        model_args = _dims(model)
    else:
        model_args = {} if model.img_size == _TIMM_IMG_SIZE else {"img_size": model.img_size}
    pretrained_cfg = {
        "input_size": [3, model.img_size, model.img_size],
        "fixed_input_size": True,
        "mean": mean,
        "std": std,
        "num_classes": model.num_classes,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }
    if interpolation is not None:
        pretrained_cfg["interpolation"] = interpolation
    if crop_pct is not None:
        pretrained_cfg["crop_pct"] = float(crop_pct)
    return {"architecture": arch or _FALLBACK_ARCH, "num_classes": model.num_classes,
            "num_features": model.embed_dim, "global_pool": "token",
            **({"model_args": model_args} if model_args else {}), "pretrained_cfg": pretrained_cfg}


def export_vit(
    params: Mapping[str, Any],
    model: ViT,
    out_dir: str | os.PathLike,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    interpolation: str | None = None,
    crop_pct: float | None = None,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write model.safetensors + config.json (the Hub layout), model.pth (a plain state dict) and timm.json;
    return their paths by kind. `interpolation` and `crop_pct` (the eval resize) go to config.json when given.
    Each file is written whole or not at all; a run writes the folder as a whole (files.write_folder)."""
    config = timm_config(model, mean, std)
    hub = hub_config(model, mean, std, interpolation=interpolation, crop_pct=crop_pct)
    state_dict = flax_to_timm_state_dict(params, model)
    out = Path(out_dir)
    paths = {"safetensors": out / "model.safetensors", "config": out / "config.json", "pth": out / "model.pth",
             "json": out / "timm.json"}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"export would overwrite {existing}; pass overwrite=True to replace them")
    out.mkdir(parents=True, exist_ok=True)

    write_safetensors(paths["safetensors"], state_dict, {"format": "pt"})
    write_file(paths["config"], json.dumps(hub, indent=2) + "\n")
    write_pth(paths["pth"], state_dict)
    write_file(paths["json"], json.dumps(config, indent=2) + "\n")
    return paths


def _one_line(error: BaseException) -> str:
    """The telling line of an error message (torch.load's run over several lines of advice)."""
    text = str(error)
    # torch's weights_only errors put the reason after this marker, between paragraphs of advice.
    text = text.partition("WeightsUnpickler error:")[2] or text
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _read_safetensors(path: Path) -> Mapping[str, Any]:
    try:
        try:
            return safetensors.numpy.load_file(path)
        except TypeError:  # bfloat16 tensors, which numpy lacks; JAX arrays hold them
            return safetensors.flax.load_file(path)
    except safetensors.SafetensorError as e:
        raise ValueError(f"not a safetensors file: {path} ({_one_line(e)})") from e


def _read_torch(path: Path) -> Any:
    try:
        import torch
    except ImportError as e:
        raise ValueError(f"reading {path} needs PyTorch: pip install torch (a .safetensors file does not)") from e
    try:
        # The 1p-frac/DeiT checkpoints also pickle the training `args` Namespace beside the weights.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise  # an unreadable file, not a malformed one
    except Exception as e:  # the zip reader and the unpickler raise many types on a bad file
        raise ValueError(f"not a PyTorch checkpoint of tensors: {path} ({_one_line(e)})") from e


def read_state_dict(path: Path) -> Mapping[str, Any]:
    try:
        ckpt = _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from e
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{path} holds a {type(ckpt).__name__}, not a state dict")
    for wrapper in ("model", "state_dict"):
        if isinstance(ckpt.get(wrapper), Mapping):
            return ckpt[wrapper]
    return ckpt


def _is_float(x: Any) -> bool:
    if hasattr(x, "is_floating_point"):  # a torch tensor
        return x.is_floating_point()
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def _to_numpy(x: Any, dtype: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; numpy has no bfloat16, so go through float32
        x = x.detach().cpu().float().numpy()
    return np.array(x, dtype=dtype)  # a copy: safetensors arrays may be views of a memory-mapped file


def _square_grid(tokens: int) -> int | None:
    """g with g² + 1 == tokens (a class token and a g × g grid), else None."""
    side = math.isqrt(max(tokens - _PREFIX_TOKENS, 0))
    return side if side > 0 and side * side + _PREFIX_TOKENS == tokens else None


def resample_pos_embed(pos_embed: np.ndarray, grid: int) -> np.ndarray:
    """Position embeddings (1, 1 + g², D) → (1, 1 + grid², D): the class token's unchanged, the g × g grid resized.

    As timm's `resample_abs_pos_embed` with its defaults (F.interpolate bicubic, align_corners=False,
    antialias=True). torch's antialiased bicubic is Pillow's filter (a = −0.5, its support widened by the scale when
    shrinking, each output's weights normalised to sum 1), so `resample_matrix` gives its weights, one axis at a time.
    """
    pos_embed = np.asarray(pos_embed)
    old = _square_grid(pos_embed.shape[1]) if pos_embed.ndim == 3 and pos_embed.shape[0] == 1 else None
    if old is None:
        raise ValueError(f"pos_embed of shape {pos_embed.shape} is not a class token and a square grid "
                         f"(1, 1 + g², D)")
    if grid < 1:
        raise ValueError(f"grid={grid} must be ≥ 1")
    weights = np.asarray(resample_matrix(0, old, old, grid, "bicubic"), np.float64)
    positions = pos_embed[0, _PREFIX_TOKENS:].reshape(old, old, -1).astype(np.float64)
    resized = np.einsum("ph,qw,hwd->pqd", weights, weights, positions).reshape(grid * grid, -1)
    return np.concatenate([pos_embed[0, :_PREFIX_TOKENS], resized.astype(pos_embed.dtype)])[None]


def _fit_pos_embed(state_dict: dict[str, Any], wanted: Mapping[str, tuple[int, ...]], source: str) -> None:
    """Resample state_dict's pos_embed in place when it holds another square patch grid of the same width."""
    value = state_dict.get("pos_embed")
    if value is None or not _is_float(value):
        return  # _check_keys names it
    shape, target = tuple(np.shape(value)), wanted["pos_embed"]
    old, new = (_square_grid(shape[1]), _square_grid(target[1])) if len(shape) == 3 else (None, None)
    if shape == target or old is None or (shape[0], shape[2]) != (target[0], target[2]):
        return  # nothing to do, or nothing resampling fixes: _check_keys names it
    state_dict["pos_embed"] = resample_pos_embed(_to_numpy(value, np.float32), new)
    log.info("%s: position embeddings resampled from a %d×%d to a %d×%d patch grid (bicubic, as timm)",
             source, old, old, new, new)


def _check_keys(state_dict: Mapping[str, Any], wanted: Mapping[str, tuple[int, ...]], source: str,
                model: ViT) -> None:
    """Raise one single-line error summarising the missing, unexpected, mis-shaped and non-float keys."""
    shape = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
    problems = [
        _first_few("missing", sorted(set(wanted) - set(shape))),
        _first_few("unexpected", sorted(set(shape) - set(wanted))),
        _first_few("wrong shape", [f"{k} checkpoint {shape[k]} vs model {wanted[k]}"
                                   for k in sorted(set(wanted) & set(shape)) if shape[k] != wanted[k]]),
        # Casting integer or boolean values to float would load something that was never a weight.
        _first_few("not floating point", [f"{k} {getattr(state_dict[k], 'dtype', type(state_dict[k]).__name__)}"
                                          for k in sorted(set(wanted) & set(shape))
                                          if not _is_float(state_dict[k])]),
    ]
    if not any(problems):
        return
    kernel, want = shape.get("patch_embed.proj.weight"), wanted["patch_embed.proj.weight"]
    if kernel is not None and len(kernel) == 4 and kernel[2:] != want[2:]:
        problems.append(f"the checkpoint's patches are {kernel[2]}×{kernel[3]}: build the ViT with "
                        f"patch_size={kernel[2]} (positions are resampled to any image size, patch kernels are not)")
    raise _mismatch_error(source, model, problems)


def load_timm_weights(
    path_or_state_dict: str | os.PathLike | Mapping[str, Any],
    model: ViT,
    *,
    rng: jax.Array | None = None,
) -> dict[str, Any]:
    """Flax params for `model` from a timm state dict, .safetensors, or .pth (a state dict or {'model': sd})."""
    # A head of another class count (or none) is re-initialised from `rng` (default key 0); position embeddings of
    # another patch grid are resampled to the model's (`resample_pos_embed`, logged); any other missing,
    # unexpected, mis-shaped or non-float key is an error. Every bad file or unfitting state dict raises a
    # ValueError of one line, which the stages print as one.
    if isinstance(path_or_state_dict, Mapping):
        source = "state dict"
        state_dict = dict(path_or_state_dict)
    else:
        source = str(path_or_state_dict)
        state_dict = dict(read_state_dict(Path(path_or_state_dict)))
    if state_dict and all(k.startswith("module.") for k in state_dict):  # saved from a DDP-wrapped model
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}

    shapes = _param_shapes(model)
    paths = {_timm_key(k): k for k in shapes}
    wanted = {key: tuple(shapes[p][a] for a in _timm_axes(p, len(shapes[p]))) for key, p in paths.items()}
    head = state_dict.get("head.weight")
    fresh_head = model.num_classes == 0 or head is None or tuple(np.shape(head)) != wanted["head.weight"]
    if fresh_head:
        got = "no head" if head is None else f"a head of shape {tuple(np.shape(head))}"
        log.info("%s has %s, model has %d classes: the head is not loaded", source, got, model.num_classes)
        for key in _HEAD_KEYS:
            state_dict.pop(key, None)
            wanted.pop(key, None)
    _fit_pos_embed(state_dict, wanted, source)
    _check_keys(state_dict, wanted, source, model)

    flat = {}
    for key, shape in wanted.items():
        inverse = np.argsort(_timm_axes(paths[key], len(shape)))
        value = _to_numpy(state_dict[key], model.param_dtype)
        flat[paths[key]] = np.ascontiguousarray(value.transpose(inverse))
    if fresh_head and model.num_classes > 0:
        head = init_head(model, jax.random.key(0) if rng is None else rng)
        flat.update({("head", k): np.asarray(v) for k, v in head.items()})
    return traverse_util.unflatten_dict(flat)
