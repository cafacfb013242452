"""The Flax ViT: timm's parameter layout, presets, forward semantics, attention, stochastic layers, mixed precision,
rematerialisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from flax.errors import InvalidRngError
from jax.sharding import NamedSharding, PartitionSpec

from onepfrac_jax.models import VIT_PRESETS, ViT, create_vit
from onepfrac_jax.models.vit import Attention, DropPath, drop_path_rates, softmax_attention

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


def test_xavier_and_bootstrap_inits_follow_the_authors_code():
    """'xavier': torch's xavier_uniform_ bounds on every attention/MLP matrix (the fused qkv as one (3D, D)
    matrix); 'bootstrap' adds the authors' MLP biases N(1e-6, 1), N(0, 1) patch projection, N(0, .02) cls token
    and PyTorch's default Linear head."""
    dim, hidden = 48, 96
    bounds = {"attn/qkv": np.sqrt(6 / (dim + 3 * dim)), "attn/proj": np.sqrt(6 / (2 * dim)),
              "mlp/fc1": np.sqrt(6 / (dim + hidden)), "mlp/fc2": np.sqrt(6 / (hidden + dim))}
    params = {init: jax.jit(create_vit(**{**SMALL, "depth": 1}, init_scheme=init).init)(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"] for init in ("xavier", "bootstrap")}
    for init, p in params.items():
        layer = traverse_util.flatten_dict(p["blocks_0"], sep="/")
        for dense, bound in bounds.items():
            kernel = np.asarray(layer[f"{dense}/kernel"])
            assert 0.95 * bound < np.abs(kernel).max() <= bound  # uniform on ±bound: its std is bound/√3
            assert abs(kernel.std() - bound / np.sqrt(3)) < 0.1 * bound / np.sqrt(3)
        mlp_bias_std = float(np.concatenate([layer["mlp/fc1/bias"], layer["mlp/fc2/bias"]]).std())
        assert (mlp_bias_std == 0) if init == "xavier" else (0.8 < mlp_bias_std < 1.2)
        assert not layer["attn/qkv/bias"].any() and not layer["attn/proj/bias"].any()
    boot = params["bootstrap"]
    assert 0.9 < float(boot["patch_embed"]["proj"]["kernel"].std()) < 1.1
    assert 0.015 < float(boot["cls_token"].std()) < 0.025
    bound = 1 / np.sqrt(dim)
    for leaf in boot["head"].values():
        assert 0.8 * bound < float(jnp.abs(leaf).max()) <= bound
    assert params["xavier"]["patch_embed"]["proj"]["kernel"].std() < 0.1  # timm's patch init is kept


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
    with pytest.raises(ValueError, match=r"ViT\.remat must be a bool"):
        create_vit(remat="yes")
    with pytest.raises(ValueError, match=r"ViT\.attention_impl"):
        create_vit(attention_impl="flash")
    with pytest.raises(ValueError, match=r"ViT\.init_scheme must be one of timm, xavier, bootstrap, got 'lecun'"):
        create_vit(init_scheme="lecun")


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


@pytest.mark.parametrize("dtype, short", [(jnp.bfloat16, "bf16"), (jnp.float16, "f16")])
def test_mixed_precision_keeps_float32_params_and_logits(small, dtype, short):
    """float16 too: off GPUs its attention takes the explicit path (CPU has no F16_F16_F32 dot algorithm)."""
    model, params, x = small
    low = create_vit(**SMALL, dtype=dtype)
    init = jax.eval_shape(low.init, jax.random.key(0), x)["params"]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(init))
    logits = jax.jit(low.apply)({"params": params}, x)
    assert logits.dtype == jnp.float32
    reference = jax.jit(model.apply)({"params": params}, x)
    np.testing.assert_allclose(logits, reference, atol=0.05 * float(jnp.abs(reference).max()))
    jaxpr = str(jax.make_jaxpr(lambda p: low.apply({"params": p}, x))(params))
    assert f"{short}[4,17,144]" in jaxpr  # the qkv projection runs in `dtype`
    grads = jax.eval_shape(jax.grad(lambda p: low.apply({"params": p}, x).sum()), params)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


def _numpy_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """softmax(q kᵀ / √d) v of (B, N, H, d) arrays, in float64."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    w = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", w / w.sum(-1, keepdims=True), v)


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls of jax.nn.dot_product_attention (delegating to it), which tracing inlines."""
    calls = []
    fused = jax.nn.dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("implementation"))
        return fused(*args, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    return calls


def test_attention_is_dot_product_attention_and_matches_plain_softmax_in_float32(fused_calls):
    """The module's attention (jax.nn.dot_product_attention, JAX's default implementation), the explicit path it
    keeps for attention dropout, and softmax(QKᵀ/√d)V in float64 agree in float32; so does the whole module."""
    b, n, h, dh = 2, 17, 3, 16
    q, k, v = (jax.random.normal(key, (b, n, h, dh)) for key in jax.random.split(jax.random.key(0), 3))
    expected = _numpy_attention(q, k, v)
    np.testing.assert_allclose(jax.jit(jax.nn.dot_product_attention)(q, k, v), expected, atol=2e-6)
    np.testing.assert_allclose(jax.jit(softmax_attention)(q, k, v), expected, atol=2e-6)

    attn = Attention(h * dh, h)
    x = jax.random.normal(jax.random.key(1), (b, n, h * dh))
    p = attn.init(jax.random.key(2), x, train=False)["params"]
    fused_calls.clear()
    module = jax.jit(lambda x: attn.apply({"params": p}, x, train=True))(x)  # no attention dropout: fused
    assert fused_calls == [None]
    qkv = np.asarray(x @ p["qkv"]["kernel"] + p["qkv"]["bias"]).reshape(b, n, 3, h, dh)
    heads = _numpy_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]).reshape(b, n, h * dh)
    np.testing.assert_allclose(module, heads @ p["proj"]["kernel"] + p["proj"]["bias"], atol=1e-5)


def test_attention_dropout_takes_the_explicit_path_and_is_unbiased(fused_calls):
    """dot_product_attention has no dropout, so attn_drop_rate > 0 in training takes the explicit softmax path:
    its output varies with the dropout key, and its mean over keys is the deterministic (fused) output: inverted
    dropout of the probabilities, then the linear proj."""
    d, h = 12, 3
    attn = Attention(d, h, attn_drop_rate=0.5)
    x = jax.random.normal(jax.random.key(0), (1, 6, d))
    p = attn.init(jax.random.key(1), x, train=False)["params"]
    fused_calls.clear()
    train = jax.jit(jax.vmap(lambda key: attn.apply({"params": p}, x, train=True, rngs={"dropout": key})))
    samples = np.asarray(train(jax.random.split(jax.random.key(2), 4000)))
    assert fused_calls == []
    deterministic = np.asarray(attn.apply({"params": p}, x, train=False))
    assert fused_calls == [None]
    assert np.abs(samples[0] - samples[1]).max() > 0.1 * np.abs(deterministic).max()
    np.testing.assert_allclose(samples.mean(0), deterministic, atol=0.03 * np.abs(deterministic).max())


def _ce_value_and_grad(model: ViT, x: jax.Array) -> jax.Array:
    labels = jax.nn.one_hot(jnp.arange(x.shape[0]) % model.num_classes, model.num_classes)
    rngs = {"dropout": jax.random.key(3), "drop_path": jax.random.key(4)}

    def loss(params):
        logits = model.apply({"params": params}, x, train=True, rngs=rngs)
        return -(labels * jax.nn.log_softmax(logits)).sum(-1).mean()

    return jax.jit(jax.value_and_grad(loss))


@pytest.mark.slow
def test_remat_keeps_params_loss_and_gradients(small):
    """remat=True: the same param tree and init, and in training (every dropout and drop path on) the same loss
    and gradients within 1e-6; each block is one checkpointed (rematerialised) call."""
    _, params, x = small
    stochastic = dict(**SMALL, drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.3)
    plain, remat = create_vit(**stochastic), create_vit(**stochastic, remat=True)
    init = [jax.eval_shape(m.init, jax.random.key(0), x)["params"] for m in (plain, remat)]
    assert jax.tree.structure(init[0]) == jax.tree.structure(init[1])
    (loss, grads), (loss_r, grads_r) = (_ce_value_and_grad(m, x)(params) for m in (plain, remat))
    assert float(loss) > 0 and abs(float(loss) - float(loss_r)) <= 1e-6
    for g, g_r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r), strict=True):
        np.testing.assert_allclose(g_r, g, rtol=0, atol=1e-6)
    jaxpr = jax.make_jaxpr(lambda p: remat.apply({"params": p}, x, train=True, rngs={
        "dropout": jax.random.key(0), "drop_path": jax.random.key(0)}))(params)
    assert sum(e.primitive.name in ("checkpoint", "remat2") for e in jaxpr.eqns) == SMALL["depth"]


def test_remat_keeps_only_the_block_inputs_for_the_backward_pass():
    """What remat is for: the residuals the forward pass leaves for the backward (jax.vjp's closure, before any
    backend) shrink to the block inputs and the params; the blocks' activations are recomputed instead."""
    model = create_vit(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_dim=256, num_classes=10)
    x = jax.ShapeDtypeStruct((32, 32, 32, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))

    def residual_bytes(m: ViT) -> int:
        vjp = jax.eval_shape(lambda p, x: jax.vjp(lambda p: m.apply(p, x, train=True), p)[1], params, x)
        return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(vjp))

    plain, remat = residual_bytes(model), residual_bytes(model.clone(remat=True))
    tokens = 32 * 65 * 64 * 4  # one block's input (B, 1 + N, D) in float32
    assert plain > 10 * model.depth * tokens and remat < 0.1 * plain, (plain, remat)
