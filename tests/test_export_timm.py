"""Flax ViT ⇄ timm: numerics against real timm, exact round trips, the export directory (one-line `local-dir:`
loading in real timm), import errors."""

import argparse
import collections
import json
import os
import re
import sys
import zipfile

import jax
import numpy as np
import pytest
import safetensors.torch
import timm
import torch

from onepfrac_jax.export.pth import write_pth
from onepfrac_jax.export.timm import (
    export_vit,
    flax_to_timm_state_dict,
    hub_config,
    load_timm_weights,
    timm_config,
)
from onepfrac_jax.models import ViT, create_vit
from onepfrac_jax.models.vit import init_head

TINY = create_vit("vit_tiny_patch16_224")
TINY_32 = create_vit("vit_tiny_patch16_224", img_size=32, num_classes=7)
# A hidden width whose plain ratio 369/90 does not survive timm's int(dim * mlp_ratio).
FREE = create_vit(img_size=64, patch_size=8, embed_dim=90, depth=3, num_heads=3, mlp_dim=369, num_classes=10)
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _timm_model(model: ViT, seed: int = 0) -> torch.nn.Module:
    """timm's twin of `model` with every tensor perturbed, so LayerNorm affines and biases matter too."""
    cfg = timm_config(model, MEAN, STD)
    torch.manual_seed(seed)
    net = timm.create_model(cfg["model_name"], pretrained=False, **cfg["kwargs"]).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def _numpy_sd(net: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in net.state_dict().items()}


def _images(model: ViT, n: int = 2) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, model.img_size, model.img_size, 3)).astype(np.float32)


def _flax_logits(model: ViT, params, x: np.ndarray) -> np.ndarray:
    return np.asarray(jax.jit(model.apply)({"params": params}, x))


def _timm_logits(net: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()


@pytest.fixture(scope="module")
def free_timm() -> torch.nn.Module:
    return _timm_model(FREE)


@pytest.mark.parametrize("model", [TINY, FREE], ids=["vit_tiny_patch16_224", "free_dims_64px"])
def test_timm_weights_give_timm_logits_and_round_trip_exactly(model):
    net = _timm_model(model)
    sd = _numpy_sd(net)
    params = load_timm_weights(sd, model)
    x = _images(model)
    reference = _timm_logits(net, x)
    assert np.abs(reference).max() > 0.5  # the comparison is not between near-zero outputs
    np.testing.assert_allclose(_flax_logits(model, params, x), reference, rtol=0, atol=1e-4)
    back = flax_to_timm_state_dict(params, model)
    assert back.keys() == sd.keys()
    for k in sd:
        assert back[k].dtype == sd[k].dtype and np.array_equal(back[k], sd[k]), k


def test_config_names_and_mlp_ratio():
    assert int(90 * (369 / 90)) != 369
    assert timm_config(TINY, MEAN, STD)["model_name"] == "vit_tiny_patch16_224"
    assert timm_config(create_vit("vit_base_patch16_224", patch_size=32), MEAN, STD)["model_name"] == (
        "vit_base_patch32_224")
    free = timm_config(FREE, MEAN, STD)
    assert free["model_name"] == "vit_base_patch16_224"
    assert int(90 * free["kwargs"]["mlp_ratio"]) == 369
    with pytest.raises(ValueError, match="3 channel values"):
        timm_config(FREE, (0.5,), STD)
    # config.json: a timm name's own dimensions are not repeated; its image size is, when not 224
    assert "model_args" not in hub_config(TINY, MEAN, STD) and hub_config(TINY, MEAN, STD)["num_classes"] == 1000
    assert hub_config(TINY_32, MEAN, STD)["model_args"] == {"img_size": 32}
    free = hub_config(FREE, MEAN, STD, interpolation="bilinear", crop_pct=0.9)
    assert free["architecture"] == "vit_base_patch16_224" and int(90 * free["model_args"]["mlp_ratio"]) == 369
    assert free["model_args"] == {"img_size": 64, "patch_size": 8, "embed_dim": 90, "depth": 3, "num_heads": 3,
                                  "mlp_ratio": free["model_args"]["mlp_ratio"]}
    assert free["pretrained_cfg"]["interpolation"] == "bilinear" and free["pretrained_cfg"]["crop_pct"] == 0.9
    assert "interpolation" not in hub_config(FREE, MEAN, STD)["pretrained_cfg"]  # not given: timm's default
    with pytest.raises(ValueError, match="3 channel values"):
        hub_config(FREE, MEAN, (0.5, 0.5))


def test_export_dir_loads_strictly_in_timm(tmp_path, free_timm):
    params = load_timm_weights(_numpy_sd(free_timm), FREE)
    paths = export_vit(params, FREE, tmp_path / "export", MEAN, STD)
    assert sorted(p.name for p in paths.values()) == ["config.json", "model.pth", "model.safetensors", "timm.json"]
    assert len(list((tmp_path / "export").iterdir())) == 4
    cfg = json.loads(paths["json"].read_text())
    assert cfg["mean"] == list(MEAN) and cfg["std"] == list(STD)
    x = _images(FREE)
    expected = _flax_logits(FREE, params, x)
    pth, st = torch.load(paths["pth"], weights_only=True), safetensors.torch.load_file(paths["safetensors"])
    for weights in (pth, st):
        net = timm.create_model(cfg["model_name"], pretrained=False, **cfg["kwargs"]).eval()
        net.load_state_dict(weights, strict=True)
        np.testing.assert_allclose(_timm_logits(net, x), expected, rtol=0, atol=1e-4)
    assert net.blocks[0].mlp.fc1.out_features == 369
    data_cfg = timm.data.resolve_data_config({}, model=net)
    assert tuple(data_cfg["mean"]) == MEAN and tuple(data_cfg["std"]) == STD
    assert tuple(data_cfg["input_size"]) == (3, 64, 64)
    # The exported files import back to the same Flax params, bit for bit.
    for path in (paths["pth"], paths["safetensors"]):
        jax.tree.map(np.testing.assert_array_equal, load_timm_weights(path, FREE), params)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_vit(params, FREE, tmp_path / "export", MEAN, STD)
    export_vit(params, FREE, tmp_path / "export", MEAN, STD, overwrite=True)


def _random_params(model: ViT, seed: int = 1) -> dict:
    """Params of `model` far from its init (LayerNorm affines and biases too), so every tensor moves the logits."""
    params = model.init(jax.random.key(seed), np.zeros((1, model.img_size, model.img_size, 3), np.float32))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: np.asarray(p) + 0.1 * rng.normal(size=p.shape).astype(np.float32), params)


@pytest.mark.slow
@pytest.mark.parametrize("model", [TINY, TINY_32, FREE], ids=["vit_tiny_patch16_224", "vit_tiny_32px", "free_dims"])
def test_export_dir_loads_in_one_line_with_timm_local_dir(tmp_path, model):
    params = _random_params(model)
    export_vit(params, model, tmp_path, MEAN, STD, interpolation="bilinear", crop_pct=1.0)
    net = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()  # strict keys: every tensor loaded
    x = _images(model)
    expected = _flax_logits(model, params, x)
    assert np.abs(expected).max() > 0.5
    np.testing.assert_allclose(_timm_logits(net, x), expected, rtol=0, atol=1e-4)
    assert type(net).__name__ == "VisionTransformer" and net.num_classes == model.num_classes
    assert net.blocks[0].mlp.fc1.out_features == model.mlp_dim and len(net.blocks) == model.depth
    # timm's data pipeline finds the run's normalisation, input size and eval resize
    data_cfg = timm.data.resolve_data_config({}, model=net)
    assert tuple(data_cfg["mean"]) == MEAN and tuple(data_cfg["std"]) == STD
    assert tuple(data_cfg["input_size"]) == (3, model.img_size, model.img_size)
    assert data_cfg["interpolation"] == "bilinear" and data_cfg["crop_pct"] == 1.0
    # another class count: timm drops the head on load and keeps the rest
    three = timm.create_model(f"local-dir:{tmp_path}", pretrained=True, num_classes=3).eval()
    assert three.head.out_features == 3
    sd, sd3 = net.state_dict(), three.state_dict()
    assert all(torch.equal(sd[k], sd3[k]) for k in sd if not k.startswith("head."))


def test_export_without_torch_writes_a_model_pth_that_torch_loads(tmp_path, monkeypatch, free_timm):
    params = load_timm_weights(_numpy_sd(free_timm), FREE)
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
        paths = export_vit(params, FREE, tmp_path, MEAN, STD)
    assert sorted(p.name for p in paths.values()) == ["config.json", "model.pth", "model.safetensors", "timm.json"]
    sd = torch.load(paths["pth"], weights_only=True)
    free_timm.load_state_dict(sd, strict=True)  # the same keys
    assert all(torch.equal(sd[k], v) for k, v in free_timm.state_dict().items())


# every dtype a .pth may hold here, 0-d and empty tensors, and arrays that are not contiguous or not little-endian
_PTH_CASES = {
    "matrix": np.arange(6, dtype=np.float32).reshape(2, 3), "scalar": np.array(3.5, np.float32),
    "empty": np.zeros((3, 0, 2), np.float32), "count": np.array(7, np.int64), "mask": np.array([True, False]),
    "half": np.linspace(-1, 1, 5, dtype=np.float16), "double": np.array([1e300]), "int": np.arange(3, dtype=np.int32),
    "short": np.arange(3, dtype=np.int16), "char": np.arange(-2, 2, dtype=np.int8),
    "byte": np.arange(4, dtype=np.uint8), "fortran": np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)),
    "big_endian": np.arange(4, dtype=">f4"),
    "large": np.random.default_rng(0).normal(size=(70, 1000)).astype(np.float32),
}


@pytest.mark.parametrize("mmap", [False, True])
def test_a_pth_written_without_torch_is_what_torch_save_writes(tmp_path, mmap):
    """Same tensors (dtype, shape, torch's contiguous strides, values) and storage bytes as torch.save, each storage
    64-byte aligned in the file as torch aligns them, loaded whole or memory-mapped."""
    write_pth(tmp_path / "ours.pth", _PTH_CASES)
    native = {k: torch.tensor(v.astype(v.dtype.newbyteorder("="))).contiguous() for k, v in _PTH_CASES.items()}
    torch.save(native, tmp_path / "torch.pth")
    ours = torch.load(tmp_path / "ours.pth", weights_only=True, mmap=mmap)
    assert type(ours) is collections.OrderedDict and list(ours) == list(_PTH_CASES)
    for k, v in native.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape and torch.equal(ours[k], v), k
        assert ours[k].stride() == torch.empty(v.shape).stride(), k
    with zipfile.ZipFile(tmp_path / "ours.pth") as a, zipfile.ZipFile(tmp_path / "torch.pth") as b:
        assert all(a.read(f"ours/data/{i}") == b.read(f"torch/data/{i}") for i in range(len(native)))
        assert {i.compress_type for i in a.infolist()} == {zipfile.ZIP_STORED}
        raw = (tmp_path / "ours.pth").read_bytes()
        for info in a.infolist():  # the data follow the local header (30 bytes, name, extra field)
            extra = int.from_bytes(raw[info.header_offset + 28:][:2], "little")
            start = info.header_offset + 30 + len(info.filename) + extra
            assert "/data/" not in info.filename or start % 64 == 0, info.filename


def test_a_pth_of_an_unsupported_dtype_is_refused_naming_the_tensor(tmp_path):
    with pytest.raises(ValueError, match=r"^blocks.0.w: a .pth of complex64 tensors is not supported"):
        write_pth(tmp_path / "x.pth", {"ok": np.zeros(2, np.float32), "blocks.0.w": np.zeros(2, np.complex64)})
    assert not (tmp_path / "x.pth").exists()


def test_the_weights_file_follows_the_umask_as_every_other_exported_file(tmp_path, free_timm):
    """safetensors' own writer makes 0600 files: teammates on a shared filesystem could not read the weights."""
    params = load_timm_weights(_numpy_sd(free_timm), FREE)
    previous = os.umask(0o022)
    try:
        export_vit(params, FREE, tmp_path, MEAN, STD)
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert set(modes.values()) == {0o644}, modes


def test_wrapped_checkpoint_with_training_args_imports(tmp_path, free_timm):
    """The 1p-frac authors publish {'model': state_dict, 'args': Namespace, ...}; DDP adds 'module.'."""
    sd = free_timm.state_dict()
    args = argparse.Namespace(lr=1e-3, model="vit_tiny_patch16_224")
    torch.save({"model": sd, "args": args, "epoch": 3}, tmp_path / "a.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "b.pth")
    expected = load_timm_weights(_numpy_sd(free_timm), FREE)
    for name in ("a.pth", "b.pth"):
        jax.tree.map(np.testing.assert_array_equal, load_timm_weights(tmp_path / name, FREE), expected)


def test_bfloat16_checkpoints_import_as_float32(tmp_path, free_timm):
    bf16 = {k: v.to(torch.bfloat16) for k, v in free_timm.state_dict().items()}
    safetensors.torch.save_file(bf16, tmp_path / "bf16.safetensors")
    torch.save(bf16, tmp_path / "bf16.pth")
    expected = load_timm_weights({k: v.float().numpy() for k, v in bf16.items()}, FREE)
    for name in ("bf16.safetensors", "bf16.pth"):
        params = load_timm_weights(tmp_path / name, FREE)
        assert params["pos_embed"].dtype == np.float32
        jax.tree.map(np.testing.assert_array_equal, params, expected)


def test_head_is_reinitialised_when_class_count_differs(free_timm):
    sd = _numpy_sd(free_timm)
    loaded = load_timm_weights(sd, FREE)
    seven = FREE.clone(num_classes=7)
    params = load_timm_weights(sd, seven, rng=jax.random.key(5))
    assert params["head"]["kernel"].shape == (90, 7) and not params["head"]["bias"].any()
    assert 0.015 < params["head"]["kernel"].std() < 0.025  # ViT's head init: normal(0.02), zero bias
    jax.tree.map(np.testing.assert_array_equal, params["head"], init_head(seven, jax.random.key(5)))
    for k in loaded:
        if k != "head":
            jax.tree.map(np.testing.assert_array_equal, params[k], loaded[k])
    headless = FREE.clone(num_classes=0)
    features = load_timm_weights(sd, headless)
    assert "head" not in features
    # A headless checkpoint into a model with a head: the head is new, the rest loads.
    no_head_sd = flax_to_timm_state_dict(features, headless)
    assert load_timm_weights(no_head_sd, FREE)["head"]["kernel"].shape == (90, 10)


def _one_line_error(source, model) -> str:
    """load_timm_weights' ValueError message, checked to be one line (main.py prints it as one)."""
    with pytest.raises(ValueError) as err:
        load_timm_weights(source, model)
    message = str(err.value)
    assert "\n" not in message and len(message) < 700, message
    return message


def test_mismatched_keys_are_summarised_in_one_line(free_timm):
    sd = _numpy_sd(free_timm)
    del sd["blocks.0.norm1.weight"]
    sd["dist_token"] = np.zeros((1, 1, 90), np.float32)
    sd["blocks.1.mlp.fc1.weight"] = np.zeros((368, 90), np.float32)
    message = _one_line_error(sd, FREE)
    assert message == (
        "state dict does not fit ViT(img_size=64, patch_size=8, embed_dim=90, depth=3, num_heads=3, mlp_dim=369, "
        "num_classes=10): missing (1): blocks.0.norm1.weight; unexpected (1): dist_token; "
        "wrong shape (1): blocks.1.mlp.fc1.weight checkpoint (368, 90) vs model (369, 90)")
    # A deeper model misses 12 keys per block: the first few are named, the rest counted.
    message = _one_line_error(_numpy_sd(free_timm), FREE.clone(depth=5))
    assert "missing (24): blocks.3.attn.proj.bias, blocks.3.attn.proj.weight, blocks.3.attn.qkv.bias and 21 more" in (
        message)


def test_other_patch_size_is_a_clear_error(free_timm):
    message = _one_line_error(_numpy_sd(free_timm), FREE.clone(patch_size=16))
    assert "wrong shape (1): patch_embed.proj.weight checkpoint (90, 3, 8, 8) vs model (90, 3, 16, 16); the " \
           "checkpoint's patches are 8×8: build the ViT with patch_size=8 (positions are resampled" in message
    # the 8×8 grid of 8-px patches was resampled to the 4×4 of 16-px ones: only the patch kernel is named
    assert "pos_embed" not in message


def test_integer_weights_are_refused_not_cast(tmp_path, free_timm):
    sd = _numpy_sd(free_timm)
    sd["blocks.0.norm1.weight"] = sd["blocks.0.norm1.weight"].astype(np.int32)
    sd["cls_token"] = sd["cls_token"] > 0
    message = _one_line_error(sd, FREE)
    assert message.endswith("not floating point (2): blocks.0.norm1.weight int32, cls_token bool")
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, tmp_path / "ints.pth")
    message = _one_line_error(tmp_path / "ints.pth", FREE)
    assert message.endswith("not floating point (2): blocks.0.norm1.weight torch.int32, cls_token torch.bool")


class _Opaque:
    """A class torch.load(weights_only=True) refuses to unpickle."""


@pytest.mark.parametrize(
    ("name", "write", "error"),
    [
        ("random.safetensors", lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)),
         r"not a safetensors file: \S*random\.safetensors \(Error while deserializing header: header too large\)"),
        ("empty.safetensors", lambda p: p.write_bytes(b""), r"not a safetensors file: \S*empty\.safetensors"),
        ("random.pth", lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)),
         r"not a PyTorch checkpoint of tensors: \S*random\.pth \(Unsupported operand \d+\)"),
        ("empty.pt", lambda p: p.write_bytes(b""), r"not a PyTorch checkpoint of tensors: \S*empty\.pt \(EOFError\)"),
        ("object.bin", lambda p: torch.save({"x": _Opaque()}, p),
         r"not a PyTorch checkpoint of tensors: \S*object\.bin \(Unsupported global: GLOBAL \S*_Opaque "),
        ("tensor.pth", lambda p: torch.save(torch.zeros(3), p), r"\S*tensor\.pth holds a Tensor, not a state dict"),
        ("folder.safetensors", lambda p: p.mkdir(), r"cannot read \S*folder\.safetensors: "),
        ("folder.pth", lambda p: p.mkdir(), r"cannot read \S*folder\.pth: Is a directory"),
    ],
)
def test_unreadable_weight_files_are_one_line_value_errors(tmp_path, name, write, error):
    path = tmp_path / name
    write(path)
    assert re.fullmatch(error + ".*", _one_line_error(path, FREE))


def test_torch_checkpoints_without_torch_say_what_to_install(tmp_path, monkeypatch, free_timm):
    torch.save(free_timm.state_dict(), tmp_path / "model.pth")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    message = _one_line_error(tmp_path / "model.pth", FREE)
    assert message == (f"reading {tmp_path / 'model.pth'} needs PyTorch: pip install torch "
                       "(a .safetensors file does not)")


def test_export_rejects_params_of_another_model(free_timm):
    params = load_timm_weights(_numpy_sd(free_timm), FREE)
    with pytest.raises(ValueError) as err:
        flax_to_timm_state_dict(params, FREE.clone(mlp_dim=368))
    message = str(err.value)
    assert message.startswith("params tree does not fit ViT(img_size=64, patch_size=8, embed_dim=90, depth=3, ")
    assert "wrong shape (9): blocks_0/mlp/fc1/bias (369,) vs model (368,), blocks_0/mlp/fc1/kernel " in message
    assert message.endswith(" and 6 more") and "\n" not in message
