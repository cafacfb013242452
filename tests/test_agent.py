"""Agent CNN, many-head conv, shared agent and agent export.

Variables are drawn with numpy into shapes from `jax.eval_shape` (eager Flax init compiles one XLA program
per initialiser and shape, which dominates the run time on a small CPU), and every forward pass is jitted.
"""

import functools
import json
from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from safetensors import safe_open
from safetensors.numpy import load_file

from onepfrac_jax.export.agent import agent_to_torch_state_dict, export_agent
from onepfrac_jax.models.agent import (
    AGENT_PRESETS,
    Agent,
    AgentBlock,
    ManyHeadConv,
    SharedAgent,
    create_agent,
    many_head_conv,
    many_head_kernel_size,
    materialize_shared_agent,
    shared_block_weights,
)
from onepfrac_jax.models.vit import create_vit

SMALL = dict(embed_dim=48, depth=2, num_classes=7, patch_size=16)


def _random_tree(shapes, seed, scale=0.2):
    """Random float32 leaves of the given shapes (BN variances positive), so zero biases hide nothing."""
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        if path[-1].key == "var":
            return jnp.asarray(rng.uniform(0.5, 1.5, s.shape), jnp.float32)
        return jnp.asarray(scale * rng.standard_normal(s.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def _variables(model, *args, seed=0):
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), *args)
    return _random_tree(shapes, seed)


@functools.cache
def _vit_params(depth=2, dim=24, heads=6):
    vit = create_vit(img_size=32, patch_size=8, embed_dim=dim, depth=depth, num_heads=heads, mlp_dim=2 * dim,
                     num_classes=5)
    shapes = jax.eval_shape(vit.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    return _random_tree(shapes, seed=100 + depth + dim)


def _images(n=2, size=64, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((n, size, size, 3)), jnp.float32)


def _apply(model, variables, *args, **kwargs):
    return jax.jit(functools.partial(model.apply, **kwargs))(variables, *args)


# ----------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("name", sorted(AGENT_PRESETS))
def test_presets_give_logits_and_block_grids(name):
    model = create_agent(name, **SMALL)
    x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
    logits, blocks = jax.eval_shape(functools.partial(model.apply, train=False, return_blocks=True), variables, x)
    side = 64 // 8 if name.endswith("res_like") else 64 // 16
    assert (logits.shape, logits.dtype) == ((2, 7), jnp.float32)
    assert [b.shape for b in blocks] == [(2, side, side, 48)] * 2
    conv = variables["params"]["blocks_0"]["conv"]["kernel"].shape
    assert conv == ((6, 48, 48) if AGENT_PRESETS[name]["conv_type"] == "many_head" else (3, 3, 48, 48))


def test_preset_fields_match_the_paper():
    small, base = create_agent("agent_small"), create_agent("agent_base_res_like")
    assert (small.embed_dim, small.depth, small.conv_type, small.input_proj, small.norm_position) == (
        288, 6, "conv_sl", "vit_like", "pre")
    assert (base.embed_dim, base.depth, base.conv_type, base.num_heads, base.input_proj) == (
        384, 12, "many_head", 6, "resnet_like")
    assert base.norm_position == "post"


@pytest.mark.parametrize(("input_proj", "side"), [("vit_like", 14), ("resnet_like", 28)])
def test_input_projection_grid_at_224(input_proj, side):
    model = create_agent(input_proj=input_proj, embed_dim=32, depth=1)
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
    _, blocks = jax.eval_shape(functools.partial(model.apply, train=False, return_blocks=True), variables, x)
    assert blocks[0].shape == (1, side, side, 32)


def test_down_sample_halves_the_grid_after_the_chosen_block():
    model = create_agent("agent_small", **SMALL, down_sample_layers=[0])
    x = _images(size=128)
    variables = _variables(model, x)
    logits, blocks = _apply(model, variables, x, train=False, return_blocks=True)
    assert [b.shape[1:3] for b in blocks] == [(8, 8), (4, 4)]
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_bad_configs_fail_with_clear_errors():
    with pytest.raises(ValueError, match="agent_small"):
        create_agent("agent_tiny")
    with pytest.raises(ValueError, match="widht"):
        create_agent("agent_small", widht=3)
    with pytest.raises(ValueError, match="conv_type"):
        create_agent("agent_small", shared=True, conv_type="conv_sl")
    with pytest.raises(ValueError, match="input_proj"):
        create_agent(input_proj="patchify")
    with pytest.raises(ValueError, match="down_sample_layers"):
        create_agent(depth=2, down_sample_layers=(2,))


def test_stem_init_normal_is_the_authors_and_torch_is_pytorchs_default():
    fan_in = 16 * 16 * 3
    x = _images(size=64)
    kernels = {}
    for stem_init in ("normal", "torch"):
        model = create_agent("agent_small", **SMALL, stem_init=stem_init)
        params = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)["params"]
        kernels[stem_init] = np.asarray(params["stem"]["proj"]["kernel"])
    assert abs(kernels["normal"].std() - 1.0) < 0.05
    assert 0.95 / np.sqrt(fan_in) < np.abs(kernels["torch"]).max() <= 1 / np.sqrt(fan_in)
    with pytest.raises(ValueError, match=r"stem_init must be one of \('normal', 'torch'\), got 'xavier'"):
        create_agent(stem_init="xavier")


def test_residual_dropout_drops_each_branch_output_and_rescales_the_rest():
    """With the MLP branch silenced, block output − input is the conv branch: each element dropped, or kept and
    scaled by 1/(1 − r); in eval mode the rate changes nothing."""
    rate = 0.5
    x = _images(n=4, size=8)
    block = AgentBlock(6, "conv_sl", residual_dropout=rate)
    variables = _variables(block, x)
    mlp = variables["params"]["mlp"]
    variables["params"]["mlp"] = {**mlp, "fc2": jax.tree.map(jnp.zeros_like, mlp["fc2"])}
    kw = dict(train=True, mutable=["batch_stats"])
    branch = np.asarray(_apply(block.clone(residual_dropout=0.0), variables, x, **kw)[0] - x)
    dropped = np.asarray(_apply(block, variables, x, rngs={"dropout": jax.random.key(3)}, **kw)[0] - x)
    kept = dropped != 0
    assert 0.4 < kept.mean() < 0.6
    np.testing.assert_allclose(dropped[kept], branch[kept] / (1 - rate), rtol=1e-4, atol=1e-5)
    eval_kw = dict(train=False)
    np.testing.assert_array_equal(_apply(block, variables, x, **eval_kw),
                                  _apply(block.clone(residual_dropout=0.0), variables, x, **eval_kw))


# --------------------------------------------------------------------------------------- many-head conv


@pytest.mark.parametrize("heads", [6, 9])
def test_many_head_conv_is_a_3x3_conv_with_only_the_first_h_taps(heads):
    d = 8
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 6, d)), jnp.float32)
    conv = ManyHeadConv(features=d, num_heads=heads)
    shapes = jax.eval_shape(conv.init, jax.random.key(0), x)
    assert shapes["params"]["kernel"].shape == (heads, d, d)  # the unused taps are not parameters
    params = _random_tree(shapes, seed=2)
    taps = params["params"]["kernel"]
    reference_kernel = jnp.zeros((3 * 3, d, d)).at[:heads].set(taps).reshape(3, 3, d, d)
    if heads == 6:
        assert bool(jnp.all(reference_kernel[2] == 0))
    expected = lax.conv_general_dilated(x, reference_kernel, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    expected = expected + params["params"]["bias"]
    np.testing.assert_allclose(_apply(conv, params, x), expected, atol=1e-5)


@pytest.mark.parametrize(("heads", "k"), [(2, 2), (3, 2), (4, 2), (10, 4), (16, 4)])
def test_even_kernel_sizes_are_rejected(heads, k):
    with pytest.raises(ValueError, match=rf"H={heads} .*k=ceil\(sqrt\({heads}\)\)={k}"):
        many_head_kernel_size(heads)
    with pytest.raises(ValueError, match=f"H={heads}"):
        Agent(conv_type="many_head", num_heads=heads)
    with pytest.raises(ValueError, match=f"H={heads}"):
        SharedAgent(num_heads=heads, embed_dim=heads * 4)


def test_odd_kernel_sizes():
    assert [many_head_kernel_size(h) for h in (1, 5, 6, 9, 17, 25)] == [1, 3, 3, 3, 5, 5]


# ----------------------------------------------------------------------------------------- shared agent


@pytest.mark.parametrize(("dim", "heads"), [(24, 6), (27, 9)])
def test_shared_conv_is_attention_with_one_hot_heads(dim, heads):
    block = _vit_params(depth=1, dim=dim, heads=heads)["blocks_0"]
    b, h, w = 2, 4, 5
    x = np.random.default_rng(3).standard_normal((b, h, w, dim))
    qkv = np.asarray(block["attn"]["qkv"]["kernel"], np.float64)
    w_o = np.asarray(block["attn"]["proj"]["kernel"], np.float64)
    b_o = np.asarray(block["attn"]["proj"]["bias"], np.float64)
    dh = dim // heads

    # Attention over the h·w tokens (raster order): head h puts weight 1 on the token at offset h of the
    # row-major 3×3 neighbourhood, and attends nowhere (contributes zero) when that token is off the grid.
    tokens = x.reshape(b, h * w, dim)
    head_outputs = []
    for head in range(heads):
        dy, dx = head // 3 - 1, head % 3 - 1
        attn = np.zeros((h * w, h * w))
        for r in range(h):
            for c in range(w):
                if 0 <= r + dy < h and 0 <= c + dx < w:
                    attn[r * w + c, (r + dy) * w + (c + dx)] = 1.0
        values = tokens @ qkv[:, 2 * dim + head * dh:2 * dim + (head + 1) * dh]
        head_outputs.append(attn @ values)
    expected = (np.concatenate(head_outputs, axis=-1) @ w_o + b_o).reshape(b, h, w, dim)

    weights = shared_block_weights(block, heads)
    got = many_head_conv(jnp.asarray(x, jnp.float32), weights.conv_taps, weights.conv_bias)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def _shared_setup(norm_position="pre", input_proj="vit_like"):
    vit_params = _vit_params()
    agent = create_agent("agent_small", shared=True, embed_dim=24, depth=2, num_heads=6, num_classes=5,
                         patch_size=8, dropout=0.0, norm_position=norm_position, input_proj=input_proj)
    x = _images(size=32)
    return agent, _variables(agent, x, vit_params), vit_params, x


def test_shared_agent_owns_only_stem_norms_and_head():
    _, variables, _, _ = _shared_setup()
    assert set(variables["params"]) == {"stem", "blocks_0", "blocks_1", "norm", "head"}
    assert set(variables["params"]["blocks_0"]) == {"norm1", "norm2"}


@pytest.mark.parametrize(("norm_position", "input_proj"), [("pre", "vit_like"), ("post", "resnet_like")])
def test_shared_agent_equals_its_materialized_agent(norm_position, input_proj):
    agent, variables, vit_params, x = _shared_setup(norm_position, input_proj)
    plain, plain_variables = materialize_shared_agent(agent, variables, vit_params)
    assert plain.conv_type == "many_head" and plain.mlp_dim == 48
    for train in (False, True):
        got, got_state = _apply(agent, variables, x, vit_params, train=train, mutable=["batch_stats"])
        want, want_state = _apply(plain, plain_variables, x, train=train, mutable=["batch_stats"])
        np.testing.assert_allclose(got, want, atol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got_state, want_state)


def test_agent_loss_sends_gradients_into_the_vit_value_and_output_weights():
    agent, variables, vit_params, x = _shared_setup()
    labels = jnp.array([1, 3])

    def loss(agent_params, vit_params):
        logits, _ = agent.apply({**variables, "params": agent_params}, x, vit_params, train=True,
                                mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    agent_grads, vit_grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], vit_params)
    dim = 24
    for i in range(2):
        g = vit_grads[f"blocks_{i}"]
        qkv = g["attn"]["qkv"]["kernel"]
        assert bool(jnp.all(jnp.abs(qkv[:, 2 * dim:]).sum(axis=0) > 0))  # every value column learns
        assert bool(jnp.all(qkv[:, :2 * dim] == 0))  # queries and keys are unused by the agent
        assert bool(jnp.all(g["attn"]["qkv"]["bias"] == 0))  # so is the value bias
        for leaf in (g["attn"]["proj"]["kernel"], g["attn"]["proj"]["bias"], g["mlp"]["fc1"]["kernel"],
                     g["mlp"]["fc2"]["bias"]):
            assert float(jnp.abs(leaf).sum()) > 0
        assert all(bool(jnp.all(leaf == 0)) for leaf in jax.tree.leaves((g["norm1"], g["norm2"])))
    assert all(bool(jnp.all(vit_grads[k] == 0)) for k in ("cls_token", "pos_embed"))
    assert float(jnp.abs(agent_grads["head"]["kernel"]).sum()) > 0


def test_shared_agent_rejects_a_mismatched_vit():
    agent, variables, vit_params, x = _shared_setup()
    with pytest.raises(ValueError, match="depth 2 != ViT depth 3"):
        jax.eval_shape(functools.partial(agent.apply, train=False), variables, x, _vit_params(depth=3))
    wide = create_agent(shared=True, embed_dim=30, depth=2, num_heads=6, patch_size=8)
    with pytest.raises(ValueError, match="embed_dim 30 != ViT width 24"):
        jax.eval_shape(functools.partial(wide.init, train=False), jax.random.key(0), x, vit_params)


def test_shared_agent_in_bfloat16_tracks_float32():
    agent, variables, vit_params, x = _shared_setup("post", "resnet_like")
    want = _apply(agent, variables, x, vit_params, train=False)
    got = _apply(agent.clone(dtype=jnp.bfloat16), variables, x, vit_params, train=False)
    assert got.dtype == jnp.float32  # logits stay float32 as under PyTorch AMP
    np.testing.assert_allclose(got, want, atol=0.05 * float(jnp.abs(want).max()))


# ------------------------------------------------------------------------------------------- batch norm


def test_batch_norm_uses_batch_stats_in_training_and_updates_them():
    model = create_agent("agent_base", **SMALL, dropout=0.0)
    x = _images()
    variables = _variables(model, x)
    eval_logits, eval_state = _apply(model, variables, x, train=False, mutable=["batch_stats"])
    (train_logits, blocks), state = _apply(model, variables, x, train=True, return_blocks=True,
                                           mutable=["batch_stats"])
    assert float(jnp.abs(train_logits - eval_logits).max()) > 1e-3
    jax.tree.map(np.testing.assert_array_equal, eval_state, {"batch_stats": variables["batch_stats"]})
    # PyTorch momentum 0.1: running = 0.9 · running + 0.1 · batch statistic of the final norm's input.
    old, new = variables["batch_stats"]["norm"], state["batch_stats"]["norm"]
    np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * blocks[-1].mean(axis=(0, 1, 2)),
                               atol=1e-5)
    np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * blocks[-1].var(axis=(0, 1, 2)),
                               rtol=1e-4, atol=1e-5)


def test_batch_stats_of_a_sharded_batch_are_global():
    model = create_agent("agent_small", **SMALL, dropout=0.0)
    x = _images(n=8)
    variables = _variables(model, x)
    mesh = jax.make_mesh((4,), ("data",))
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    _, state = _apply(model, variables, x, train=True, mutable=["batch_stats"])
    _, sharded_state = _apply(model, variables, sharded, train=True, mutable=["batch_stats"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), state, sharded_state)


# ------------------------------------------------------------------------------------------------ export


def _np_conv(x, weight, bias):
    """Cross-correlation of NHWC x with a PyTorch (out, in, k, k) weight, zero padding k // 2, in float64."""
    k = weight.shape[-1]
    pad = k // 2
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    h, w = x.shape[1:3]
    out = sum(np.einsum("bhwi,oi->bhwo", xp[:, u:u + h, v:v + w], weight[:, :, u, v])
              for u in range(k) for v in range(k))
    return out + bias


def _expected_keys(depth, input_proj):
    bn = ("weight", "bias", "running_mean", "running_var")
    keys = {"stem.proj.weight", "stem.proj.bias", "head.weight", "head.bias", *(f"norm.{s}" for s in bn)}
    if input_proj == "resnet_like":
        keys |= {"stem.conv1.weight", *(f"stem.norm1.{s}" for s in bn)}
    for i in range(depth):
        keys |= {f"blocks.{i}.{n}.{s}" for n in ("norm1", "norm2") for s in bn}
        keys |= {f"blocks.{i}.{n}" for n in ("conv.weight", "conv.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                                               "mlp.fc2.weight", "mlp.fc2.bias")}
    return keys


@pytest.mark.parametrize("name", ["agent_small", "agent_base_res_like"])
def test_export_keys_shapes_and_conv_weights(name):
    model = create_agent(name, **SMALL)
    x = _images()
    variables = _variables(model, x)
    state = agent_to_torch_state_dict(variables, model)
    assert set(state) == _expected_keys(2, model.input_proj)
    assert all(v.dtype == np.float32 for v in state.values())
    assert state["blocks.1.conv.weight"].shape == (48, 48, 3, 3)
    assert state["blocks.0.mlp.fc1.weight"].shape == (192, 48, 1, 1)
    assert state["head.weight"].shape == (7, 48)
    patch = (48, 3, 16, 16) if model.input_proj == "vit_like" else (48, 64, 3, 3)
    assert state["stem.proj.weight"].shape == patch

    # The exported conv, as PyTorch would run it, reproduces the Flax block's conv in the real forward pass:
    # its input is norm1's output (pre-norm) or the previous block's output (post-norm).
    _, inter = _apply(model, variables, x, train=False,
                      capture_intermediates=lambda m, _: m.name in ("conv", "norm1", "blocks_0"))
    inter = inter["intermediates"]
    conv_input = inter["blocks_1"]["norm1"] if model.norm_position == "pre" else inter["blocks_0"]
    expected = _np_conv(conv_input["__call__"][0], state["blocks.1.conv.weight"], state["blocks.1.conv.bias"])
    np.testing.assert_allclose(inter["blocks_1"]["conv"]["__call__"][0], expected, atol=1e-4, rtol=1e-5)


def test_export_of_shared_agent_holds_the_vit_derived_conv(tmp_path):
    agent, variables, vit_params, _ = _shared_setup()
    with pytest.raises(ValueError, match="vit_params"):
        agent_to_torch_state_dict(variables, agent)
    path = export_agent(variables, agent, tmp_path, vit_params=vit_params)
    state = load_file(path)
    assert set(state) == _expected_keys(2, "vit_like")
    assert state["blocks.0.conv.weight"].shape == (24, 24, 3, 3)
    np.testing.assert_array_equal(state["blocks.0.conv.weight"][:, :, 2], 0)  # H=6: bottom row unused
    np.testing.assert_allclose(state["blocks.1.mlp.fc2.weight"][:, :, 0, 0],
                               np.asarray(vit_params["blocks_1"]["mlp"]["fc2"]["kernel"]).T)

    x = np.random.default_rng(4).standard_normal((2, 4, 5, 24)).astype(np.float32)
    weights = shared_block_weights(vit_params["blocks_0"], 6)
    np.testing.assert_allclose(_np_conv(x, state["blocks.0.conv.weight"], state["blocks.0.conv.bias"]),
                               many_head_conv(x, weights.conv_taps, weights.conv_bias), atol=1e-5)

    with safe_open(path, "np") as f:
        config = json.loads(f.metadata()["agent_config"])
    assert (config["conv_type"], config["num_heads"], config["mlp_dim"], config["dtype"]) == (
        "many_head", 6, 48, "float32")
    with pytest.raises(FileExistsError):
        export_agent(variables, agent, tmp_path, vit_params=vit_params)


def _torch_agent(torch, model, state):
    """A plain PyTorch CNN named by the export's key scheme, loaded strictly from `state`."""
    nn = torch.nn
    d, k = model.embed_dim, state["blocks.0.conv.weight"].shape[-1]
    m = state["blocks.0.mlp.fc1.weight"].shape[0]

    def block():
        mlp = nn.Sequential(OrderedDict(fc1=nn.Conv2d(d, m, 1), act=nn.GELU(), fc2=nn.Conv2d(m, d, 1)))
        return nn.ModuleDict(dict(norm1=nn.BatchNorm2d(d), conv=nn.Conv2d(d, d, k, padding=k // 2),
                                  norm2=nn.BatchNorm2d(d), mlp=mlp))

    if model.input_proj == "vit_like":
        stem = nn.ModuleDict(dict(proj=nn.Conv2d(3, d, model.patch_size, stride=model.patch_size)))
    else:
        stem = nn.ModuleDict(dict(conv1=nn.Conv2d(3, 64, 7, 2, 3, bias=False), norm1=nn.BatchNorm2d(64),
                                  proj=nn.Conv2d(64, d, 3, 2, 1)))
    net = nn.ModuleDict(dict(stem=stem, blocks=nn.ModuleList([block() for _ in range(model.depth)]),
                             norm=nn.BatchNorm2d(d), head=nn.Linear(d, model.num_classes)))
    net.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()}, strict=True)
    net.eval()
    gelu = nn.functional.gelu

    def forward(x):
        if model.input_proj == "vit_like":
            x = net.stem.proj(x)
        else:
            x = gelu(net.stem.norm1(net.stem.conv1(x)))
            x = net.stem.proj(nn.functional.max_pool2d(x, 3, 2, 1))
        for i, b in enumerate(net.blocks):
            if model.norm_position == "pre":
                x = x + b.conv(b.norm1(x))
                x = x + b.mlp(b.norm2(x))
            else:
                x = x + b.norm1(b.conv(x))
                x = x + b.norm2(b.mlp(x))
            if i in model.down_sample_layers:
                x = nn.functional.avg_pool2d(x, 2)
        return net.head(gelu(net.norm(x)).mean(dim=(2, 3)))

    return forward


@pytest.mark.parametrize("shared", [False, True])
def test_exported_agent_runs_in_pytorch_with_the_same_logits(shared):
    torch = pytest.importorskip("torch", reason="PyTorch (requirements-test.txt) runs the exported agent")
    if shared:
        model, variables, vit_params, x = _shared_setup("post", "resnet_like")
        flax_logits = _apply(model, variables, x, vit_params, train=False)
    else:
        model = create_agent("agent_small", **SMALL, down_sample_layers=(0,))
        vit_params, x = None, _images()
        variables = _variables(model, x)
        flax_logits = _apply(model, variables, x, train=False)
    forward = _torch_agent(torch, model, agent_to_torch_state_dict(variables, model, vit_params))
    with torch.no_grad():
        torch_logits = forward(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(torch_logits, flax_logits, atol=1e-4, rtol=1e-4)
