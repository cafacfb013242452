"""The Flax ViT: timm's parameter layout, presets, forward semantics, stochastic layers, mixed precision."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from flax.errors import InvalidRngError
from jax.sharding import NamedSharding, PartitionSpec

from onepfrac_jax.models import VIT_PRESETS, ViT, create_vit
from onepfrac_jax.models.vit import Attention, DropPath, drop_path_rates

SMALL = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_dim=96, num_classes=5)


def _shapes(model: ViT) -> dict:
    x = jax.ShapeDtypeStruct((1, model.img_size, model.img_size, 3), jnp.float32)
    tree = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    return {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(tree).items()}


def _random_params(model: ViT, seed: int = 0) -> dict:
    """Random params of `model`'s shapes, drawn in numpy: compiling `model.init` is slow on a small CPU."""
    rng = np.random.default_rng(seed)
    x = jax.ShapeDtypeStruct((1, model.img_size, model.img_size, 3), jnp.float32)
    tree = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    return jax.tree.map(lambda s: rng.normal(0.0, 0.1, s.shape).astype(np.float32) + (s.ndim == 1), tree)


@pytest.fixture(scope="module")
def small():
    model = create_vit(**SMALL)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    return model, _random_params(model), x


def test_init_follows_timm():
    model = create_vit(**{**SMALL, "depth": 1})
    p = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    assert abs(float(p["pos_embed"].std()) - 0.02) < 0.003
    assert 0 < float(jnp.abs(p["cls_token"]).max()) < 1e-5
    for dense in ("attn/qkv", "attn/proj", "mlp/fc1", "mlp/fc2"):
        layer = traverse_util.flatten_dict(p["blocks_0"], sep="/")
        assert abs(float(layer[f"{dense}/kernel"].std()) - 0.02) < 0.003 and not layer[f"{dense}/bias"].any()
    for norm in (p["blocks_0"]["norm1"], p["blocks_0"]["norm2"], p["norm"]):
        assert (norm["scale"] == 1).all() and not norm["bias"].any()
    fan_in = 8 * 8 * 3  # PyTorch's default conv init: U(±1/sqrt(fan_in))
    kernel = p["patch_embed"]["proj"]["kernel"]
    assert 0.9 / np.sqrt(fan_in) < float(jnp.abs(kernel).max()) <= 1 / np.sqrt(fan_in)


def test_vit_tiny_matches_timm_parameter_count_and_layout():
    shapes = _shapes(create_vit("vit_tiny_patch16_224"))
    assert sum(int(np.prod(s)) for s in shapes.values()) == 5_717_416
    assert shapes["patch_embed/proj/kernel"] == (16, 16, 3, 192)
    assert shapes["cls_token"] == (1, 1, 192)
    assert shapes["pos_embed"] == (1, 197, 192)
    assert shapes["blocks_11/attn/qkv/kernel"] == (192, 576)
    assert shapes["blocks_0/mlp/fc1/kernel"] == (192, 768)
    assert shapes["head/kernel"] == (192, 1000)
    per_block = {k.split("/", 1)[1] for k in shapes if k.startswith("blocks_0/")}
    assert per_block == {f"{m}/{p}" for m in ("norm1", "norm2") for p in ("scale", "bias")} | {
        f"{m}/{p}" for m in ("attn/qkv", "attn/proj", "mlp/fc1", "mlp/fc2") for p in ("kernel", "bias")}
    assert {k.split("/")[0] for k in shapes} == {
        "patch_embed", "cls_token", "pos_embed", "norm", "head", *(f"blocks_{i}" for i in range(12))}


def test_presets_and_overrides():
    expected = {
        "vit_tiny_patch16_224": (192, 12, 3, 768, 0.0),
        "vit_small_patch16_224": (384, 12, 6, 1536, 0.0),
        "vit_base_patch16_224": (768, 12, 12, 3072, 0.0),
        "vit_small_bootstrap": (288, 6, 9, 1152, 0.1),
        "vit_base_bootstrap": (384, 12, 6, 1536, 0.0),
    }
    assert set(VIT_PRESETS) == set(expected)
    for name, dims in expected.items():
        m = create_vit(name)
        assert (m.embed_dim, m.depth, m.num_heads, m.mlp_dim, m.drop_rate) == dims
        assert (m.patch_size, m.img_size) == (16, 224)
    m = create_vit("vit_small_bootstrap", num_classes=100, img_size=32, patch_size=4, drop_path_rate=0.1)
    assert (m.num_classes, m.img_size, m.patch_size, m.embed_dim, m.drop_path_rate) == (100, 32, 4, 288, 0.1)
    assert create_vit() == ViT()


def test_invalid_configurations_raise_clear_errors():
    with pytest.raises(ValueError, match=r"vit_base_bootstrap.*vit_tiny_patch16_224"):
        create_vit("vit_huge")
    with pytest.raises(ValueError, match=r"img_size \(30\) must be divisible by patch_size \(8\)"):
        create_vit(img_size=30, patch_size=8)
    with pytest.raises(ValueError, match=r"embed_dim \(100\) must be divisible by num_heads \(3\)"):
        create_vit(embed_dim=100, num_heads=3)
    with pytest.raises(ValueError, match="drop_path_rate"):
        create_vit(drop_path_rate=1.0)


def test_forward_outputs(small):
    model, params, x = small
    apply = jax.jit(model.apply, static_argnames="return_blocks")
    logits, blocks = apply({"params": params}, x, return_blocks=True)
    assert logits.shape == (4, 5) and logits.dtype == jnp.float32
    assert [b.shape for b in blocks] == [(4, 17, 48)] * 2
    np.testing.assert_array_equal(logits, apply({"params": params}, x))
    # num_classes=0: the pooled feature is the final LayerNorm of the last block's cls token.
    features = jax.jit(create_vit(**{**SMALL, "num_classes": 0}).apply)(
        {"params": {k: v for k, v in params.items() if k != "head"}}, x)
    cls = blocks[-1][:, 0]
    mu, var = cls.mean(-1, keepdims=True), cls.var(-1, keepdims=True)
    expected = (cls - mu) / np.sqrt(var + 1e-6) * params["norm"]["scale"] + params["norm"]["bias"]
    np.testing.assert_allclose(features, expected, atol=1e-5)
    head = params["head"]
    np.testing.assert_allclose(logits, features @ head["kernel"] + head["bias"], atol=1e-5)
    with pytest.raises(ValueError, match=r"\(B, 32, 32, 3\)"):
        model.apply({"params": params}, jnp.zeros((1, 3, 32, 32)))


def test_qkv_columns_are_part_major_then_head_major():
    """Column part*D + h*dh + j of the qkv kernel is component j of head h's q (part 0), k (1) or v (2)."""
    d, h, n = 12, 3, 5
    dh = d // h
    attn = Attention(d, h)
    x = jax.random.normal(jax.random.key(0), (2, n, d))
    p = attn.init(jax.random.key(1), x, train=False)["params"]
    qkv = np.asarray(x @ p["qkv"]["kernel"] + p["qkv"]["bias"])
    heads = []
    for i in range(h):
        q, k, v = (qkv[..., part * d + i * dh: part * d + (i + 1) * dh] for part in range(3))
        s = q @ k.transpose(0, 2, 1) / np.sqrt(dh)
        w = np.exp(s - s.max(-1, keepdims=True))
        heads.append(w / w.sum(-1, keepdims=True) @ v)
    expected = np.concatenate(heads, -1) @ p["proj"]["kernel"] + p["proj"]["bias"]
    np.testing.assert_allclose(attn.apply({"params": p}, x, train=False), expected, atol=1e-5)


def test_drop_path_drops_whole_samples_and_rescales():
    x = jnp.ones((2000, 3, 4))
    y = DropPath(0.3).apply({}, x, deterministic=False, rngs={"drop_path": jax.random.key(0)})
    per_sample = np.asarray(y).reshape(2000, -1)
    assert np.all(per_sample == per_sample[:, :1])  # one decision per sample
    assert set(np.unique(per_sample)) == {0.0, np.float32(1 / 0.7)}
    assert abs((per_sample[:, 0] == 0).mean() - 0.3) < 0.04
    np.testing.assert_array_equal(DropPath(0.3).apply({}, x, deterministic=True), x)
    rates = drop_path_rates(0.1, 12)
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1) and np.allclose(np.diff(rates), 0.1 / 11)


@pytest.fixture(scope="module")
def stochastic(small):
    """SMALL with every dropout and drop path on, and one jitted apply shared (compiling RNG is slow)."""
    _, params, x = small
    model = create_vit(**SMALL, drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.5)
    return model, jax.jit(model.apply, static_argnames="train"), params, x


def test_train_mode_uses_named_rng_streams(stochastic):
    model, apply, params, x = stochastic
    eval_logits = apply({"params": params}, x)

    def train(seed_dropout: int, seed_path: int) -> np.ndarray:
        rngs = {"dropout": jax.random.key(seed_dropout), "drop_path": jax.random.key(seed_path)}
        return np.asarray(apply({"params": params}, x, train=True, rngs=rngs))

    assert not np.allclose(train(0, 0), eval_logits)
    np.testing.assert_array_equal(train(0, 0), train(0, 0))
    assert not np.allclose(train(0, 0), train(1, 0))
    assert not np.allclose(train(0, 0), train(0, 1))
    with pytest.raises(InvalidRngError, match="drop_path"):
        jax.eval_shape(lambda: model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(0)}))


def test_batch_sharded_training_forward_matches_single_device(stochastic):
    """On an Explicit-axes mesh, dropout masks follow the batch sharding and match the unsharded ones."""
    _, apply, params, x = stochastic
    rngs = {"dropout": jax.random.key(0), "drop_path": jax.random.key(0)}
    mesh = jax.make_mesh((4,), ("data",))
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
        ps = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
        sharded = apply({"params": ps}, xs, train=True, rngs=rngs)
    assert sharded.sharding.spec == PartitionSpec("data", None)
    np.testing.assert_allclose(sharded, apply({"params": params}, x, train=True, rngs=rngs), atol=1e-5)


def test_mixed_precision_keeps_float32_params_and_logits(small):
    model, params, x = small
    bf16 = create_vit(**SMALL, dtype=jnp.bfloat16)
    init = jax.eval_shape(bf16.init, jax.random.key(0), x)["params"]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(init))
    logits = jax.jit(bf16.apply)({"params": params}, x)
    assert logits.dtype == jnp.float32
    reference = jax.jit(model.apply)({"params": params}, x)
    np.testing.assert_allclose(logits, reference, atol=0.05 * float(jnp.abs(reference).max()))
    jaxpr = str(jax.make_jaxpr(lambda p: bf16.apply({"params": p}, x))(params))
    assert "bf16[4,17,144]" in jaxpr  # the qkv projection runs in bfloat16
    grads = jax.eval_shape(jax.grad(lambda p: bf16.apply({"params": p}, x).sum()), params)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
