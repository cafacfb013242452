"""Bootstrapping-ViTs agent CNN, and the shared agent whose convs and MLPs are built from a ViT's weights.

Agent (NHWC): input projection → L blocks → BN → GELU → global average pool → linear head.
    pre-norm block:   x = x + conv(BN(x));   x = x + MLP(BN(x))
    post-norm block:  x = x + BN(conv(x));   x = x + BN(MLP(x))
    MLP: 1×1 conv D→M, exact GELU, dropout, 1×1 conv M→D.
    An optional 2×2 average pool follows each block listed in `down_sample_layers`; the block outputs
    returned with `return_blocks=True` are taken before that pool.

Many-head conv with H heads: kernel size k = ⌈√H⌉, which must be odd. The k×k offsets in row-major order
are o_j = (j // k − k // 2, j % k − k // 2); head h owns offset o_h and only the first H offsets are used:

    y(p) = Σ_{h<H} x(p + o_h) · W_h + b,     x = 0 outside the grid,  W_h ∈ R^{D×D} (in, out).

Shared agent: block i reuses ViT layer i (timm layout). With d_h = D / H,
    W_v^h = attn/qkv/kernel[:, 2D + h·d_h : 2D + (h+1)·d_h]   (D × d_h, the value columns of head h)
    W_o^h = attn/proj/kernel[h·d_h : (h+1)·d_h, :]             (d_h × D)
the tap of head h is W_h = W_v^h W_o^h and b = attn/proj/bias: the many-head conv is then exactly multi-head
self-attention whose head h attends one-hot to the token at offset o_h (the value bias is not used). The
MLP is the ViT's mlp/fc1, mlp/fc2 applied as 1×1 convs. The shared agent owns only its input projection,
its BatchNorms and its head; it takes the ViT's params as a call argument so gradients reach them.
"""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from onepfrac_jax.models.vit import torch_default_init

Array = jax.Array

CONV_TYPES = ("conv_sl", "many_head")
INPUT_PROJS = ("vit_like", "resnet_like")
NORM_POSITIONS = ("pre", "post")
# vit_like stem initialisers: 'normal' N(0, 1), the authors'; 'torch' PyTorch's default conv init U(±1/√fan_in).
STEM_INITS = {"normal": nn.initializers.normal(1.0), "torch": torch_default_init}
RESNET_STEM_WIDTH = 64

# PyTorch-initialised weights in the original code: xavier-uniform convs/MLPs, zero biases.
_xavier = nn.initializers.xavier_uniform()
_zeros = nn.initializers.zeros_init()


def many_head_kernel_size(num_heads: int) -> int:
    """Kernel size k = ⌈√H⌉ of a many-head conv; ValueError unless k is odd (a k×k kernel needs a centre)."""
    if num_heads < 1:
        raise ValueError(f"many-head conv needs at least one head, got H={num_heads}")
    k = math.isqrt(num_heads - 1) + 1
    if k % 2 == 0:
        raise ValueError(
            f"many-head conv with H={num_heads} heads needs kernel size k=ceil(sqrt({num_heads}))={k}, "
            "which is even; only odd k has a centre tap, so H must be 1, 5..9, 17..25, 37..49, ..."
        )
    return k


def many_head_dense_kernel(taps: Array) -> Array:
    """The (k, k, D_in, D_out) conv kernel of taps (H, D_in, D_out): taps row-major, then zeros."""
    num_heads, d_in, d_out = taps.shape
    k = many_head_kernel_size(num_heads)
    unused = jnp.zeros((k * k - num_heads, d_in, d_out), taps.dtype)
    return jnp.concatenate([taps, unused]).reshape(k, k, d_in, d_out)


def many_head_conv(x: Array, taps: Array, bias: Array) -> Array:
    """y(p) = Σ_h x(p + o_h) · taps[h] + bias with zero padding; x (B, h, w, D_in), taps (H, D_in, D_out)."""
    # The unused offsets are structural zeros, not parameters; one dense k×k conv is still the fastest form.
    kernel = many_head_dense_kernel(taps)
    pad = kernel.shape[0] // 2
    y = lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding=((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return y + bias


class SharedBlockWeights(NamedTuple):
    """One shared block's conv taps (H, D, D) and bias, and its MLP's dense weights (Flax in×out layout)."""

    conv_taps: Array
    conv_bias: Array
    fc1_kernel: Array
    fc1_bias: Array
    fc2_kernel: Array
    fc2_bias: Array


def shared_block_weights(vit_block: Mapping[str, Any], num_heads: int) -> SharedBlockWeights:
    """The agent block weights computed from one ViT block's params: W_h = W_v^h W_o^h, b = proj bias."""
    qkv = vit_block["attn"]["qkv"]["kernel"]
    proj = vit_block["attn"]["proj"]
    dim = qkv.shape[0]
    head_dim = dim // num_heads
    w_v = qkv[:, 2 * dim:].reshape(dim, num_heads, head_dim)
    w_o = proj["kernel"].reshape(num_heads, head_dim, dim)
    # HIGHEST keeps these small products exact in float32 on accelerators that default to TF32.
    taps = jnp.einsum("ihj,hjo->hio", w_v, w_o, precision=lax.Precision.HIGHEST)
    mlp = vit_block["mlp"]
    return SharedBlockWeights(
        taps, proj["bias"], mlp["fc1"]["kernel"], mlp["fc1"]["bias"], mlp["fc2"]["kernel"], mlp["fc2"]["bias"]
    )


class ManyHeadConv(nn.Module):
    """Many-head conv: params `kernel` (H, D_in, D_out), one tap per used offset, and `bias` (D_out)."""

    features: int
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Apply the many-head conv to x (B, h, w, D_in)."""
        taps = self.param("kernel", _xavier, (self.num_heads, x.shape[-1], self.features))
        bias = self.param("bias", _zeros, (self.features,))
        x, taps, bias = nn.dtypes.promote_dtype(x, taps, bias, dtype=self.dtype)
        return many_head_conv(x, taps, bias)


class ConvMlp(nn.Module):
    """1×1 conv D→M, exact GELU, dropout, 1×1 conv M→D."""

    hidden_dim: int
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> Array:
        """Apply the MLP to x (B, h, w, D)."""
        dim = x.shape[-1]
        x = nn.Conv(self.hidden_dim, (1, 1), kernel_init=_xavier, dtype=self.dtype, name="fc1")(x)
        x = nn.Dropout(self.dropout, deterministic=not train)(nn.gelu(x, approximate=False))
        return nn.Conv(dim, (1, 1), kernel_init=_xavier, dtype=self.dtype, name="fc2")(x)


def _batch_norm(train: bool, name: str) -> nn.BatchNorm:
    # PyTorch BatchNorm2d defaults (momentum 0.1 ≙ Flax 0.9, eps 1e-5), in float32 as under AMP; two-pass
    # variance because the vit_like stem's N(0, 1) init gives activations with large means.
    return nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, use_fast_variance=False,
        dtype=jnp.float32, name=name,
    )


class AgentStem(nn.Module):
    """Input projection: `vit_like` p×p stride-p conv, or `resnet_like` conv7/2-BN-GELU-maxpool/2-conv3/2."""

    embed_dim: int
    input_proj: str = "vit_like"
    patch_size: int = 16
    dtype: Any = jnp.float32
    stem_init: str = "normal"  # vit_like only: a STEM_INITS key

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> Array:
        """Project images (B, H, W, C) to the grid (B, H/p, W/p, D); resnet_like gives (B, H/8, W/8, D)."""
        if self.input_proj == "vit_like":
            p = self.patch_size
            # The original initialises the patch projection with N(0, 1): the residual stream then starts at
            # std ≈ √(3p²) · the pixels' std, and the blocks' branches add little to it until they grow.
            return nn.Conv(
                self.embed_dim, (p, p), strides=(p, p), padding="VALID",
                kernel_init=STEM_INITS[self.stem_init], dtype=self.dtype, name="proj",
            )(x).astype(jnp.float32)
        x = nn.Conv(
            RESNET_STEM_WIDTH, (7, 7), strides=(2, 2), padding=3, use_bias=False,
            kernel_init=_xavier, dtype=self.dtype, name="conv1",
        )(x)
        x = nn.gelu(_batch_norm(train, "norm1")(x), approximate=False)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        return nn.Conv(
            self.embed_dim, (3, 3), strides=(2, 2), padding=1,
            kernel_init=_xavier, dtype=self.dtype, name="proj",
        )(x).astype(jnp.float32)


class AgentBlock(nn.Module):
    """One agent block; its conv and MLP are its own parameters, or (shared agent) weights given per call."""

    num_heads: int
    conv_type: str = "many_head"
    mlp_dim: int | None = None
    norm_position: str = "pre"
    dropout: float = 0.0
    dtype: Any = jnp.float32
    residual_dropout: float = 0.0  # on each branch's output before it joins the residual stream

    @nn.compact
    def __call__(self, x: Array, *, train: bool, shared: SharedBlockWeights | None = None) -> Array:
        """Apply the block to x (B, h, w, D); `shared` replaces the conv and MLP parameters."""
        dim = x.shape[-1]
        if shared is None:
            if self.conv_type == "conv_sl":
                conv = nn.Conv(dim, (3, 3), padding=1, kernel_init=_xavier, dtype=self.dtype, name="conv")
            else:
                conv = ManyHeadConv(dim, self.num_heads, dtype=self.dtype, name="conv")
            mlp_module = ConvMlp(self.mlp_dim or 4 * dim, self.dropout, dtype=self.dtype, name="mlp")
            mlp = lambda y: mlp_module(y, train=train)
        else:
            dropout = nn.Dropout(self.dropout, deterministic=not train)

            def conv(y: Array) -> Array:
                y, taps, bias = nn.dtypes.promote_dtype(y, *shared[:2], dtype=self.dtype)
                return many_head_conv(y, taps, bias)

            def mlp(y: Array) -> Array:
                y, k1, b1, k2, b2 = nn.dtypes.promote_dtype(y, *shared[2:], dtype=self.dtype)
                y = dropout(nn.gelu(y @ k1 + b1, approximate=False))
                return y @ k2 + b2

        norm1 = _batch_norm(train, "norm1")
        norm2 = _batch_norm(train, "norm2")
        branch_drop = nn.Dropout(self.residual_dropout, deterministic=not train)
        if self.norm_position == "pre":
            x = x + branch_drop(conv(norm1(x)))
            return x + branch_drop(mlp(norm2(x)))
        x = x + branch_drop(norm1(conv(x)))
        return x + branch_drop(norm2(mlp(x)))


class _AgentBase(nn.Module):
    """Fields and forward pass common to the agent and the shared agent."""

    num_classes: int = 1000
    embed_dim: int = 288  # D, the width of every block
    depth: int = 6  # number of blocks
    num_heads: int = 9  # many-head conv heads; the shared agent's must equal the ViT's
    input_proj: str = "vit_like"  # "vit_like" (p×p patchify) or "resnet_like" (conv/BN/maxpool/conv, /8)
    patch_size: int = 16  # vit_like only
    norm_position: str = "pre"  # "pre" or "post" BatchNorm in the blocks
    dropout: float = 0.1  # MLP dropout
    residual_dropout: float = 0.0  # dropout on every block branch's output (the authors' shared agent: the ViT's)
    down_sample_layers: tuple[int, ...] = ()  # 2×2 average pool after these blocks
    dtype: Any = jnp.float32  # conv/matmul dtype; params, BN, residual stream and logits stay float32
    stem_init: str = "normal"  # vit_like stem init: 'normal' N(0, 1) (the authors'), 'torch' U(±1/√fan_in)

    def __post_init__(self) -> None:
        """Reject invalid configurations at construction, each with the offending value."""
        if self.input_proj not in INPUT_PROJS:
            raise ValueError(f"input_proj must be one of {INPUT_PROJS}, got {self.input_proj!r}")
        if self.stem_init not in STEM_INITS:
            raise ValueError(f"stem_init must be one of {tuple(STEM_INITS)}, got {self.stem_init!r}")
        if self.norm_position not in NORM_POSITIONS:
            raise ValueError(f"norm_position must be one of {NORM_POSITIONS}, got {self.norm_position!r}")
        if self.embed_dim < 1 or self.depth < 1 or self.num_classes < 1:
            raise ValueError(
                f"embed_dim, depth and num_classes must be positive, got {self.embed_dim}, {self.depth}, "
                f"{self.num_classes}"
            )
        for name in ("dropout", "residual_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        bad = [i for i in self.down_sample_layers if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"down_sample_layers {bad} are not block indices of a depth-{self.depth} agent")
        super().__post_init__()

    @nn.compact
    def _forward(
        self, x: Array, train: bool, return_blocks: bool, conv_type: str, mlp_dim: int | None,
        shared: list[SharedBlockWeights] | None,
    ) -> Array | tuple[Array, list[Array]]:
        """Stem, blocks (their own weights, or `shared[i]`), final BN → GELU → pool → head."""
        x = AgentStem(self.embed_dim, self.input_proj, self.patch_size, dtype=self.dtype, stem_init=self.stem_init,
                      name="stem")(x, train=train)
        block_outputs = []
        for i in range(self.depth):
            block = AgentBlock(
                self.num_heads, conv_type, mlp_dim, self.norm_position, self.dropout, dtype=self.dtype,
                residual_dropout=self.residual_dropout, name=f"blocks_{i}",
            )
            x = block(x, train=train, shared=None if shared is None else shared[i])
            block_outputs.append(x)
            if i in self.down_sample_layers:
                x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = nn.gelu(_batch_norm(train, "norm")(x), approximate=False)
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x.mean(axis=(1, 2)))
        logits = logits.astype(jnp.float32)
        return (logits, block_outputs) if return_blocks else logits


class Agent(_AgentBase):
    """The agent CNN with its own conv (`conv_sl` 3×3, or `many_head`) and MLP parameters."""

    conv_type: str = "conv_sl"  # "conv_sl" (plain 3×3) or "many_head" (num_heads offsets)
    mlp_dim: int | None = None  # MLP hidden width; None means 4·embed_dim

    def __post_init__(self) -> None:
        """Reject invalid configurations at construction."""
        if self.conv_type not in CONV_TYPES:
            raise ValueError(f"conv_type must be one of {CONV_TYPES}, got {self.conv_type!r}")
        if self.conv_type == "many_head":
            many_head_kernel_size(self.num_heads)
        super().__post_init__()

    def __call__(
        self, x: Array, *, train: bool, return_blocks: bool = False
    ) -> Array | tuple[Array, list[Array]]:
        """Logits (B, classes) of images x (B, H, W, C); return_blocks adds each block's output."""
        return self._forward(x, train, return_blocks, self.conv_type, self.mlp_dim, None)


def _vit_depth(vit_params: Mapping[str, Any]) -> int:
    return sum(1 for key in vit_params if key.startswith("blocks_") and key[len("blocks_"):].isdigit())


class SharedAgent(_AgentBase):
    """The agent whose block i is computed from ViT layer i's attention and MLP weights at every call."""

    def __post_init__(self) -> None:
        """Reject invalid configurations at construction."""
        many_head_kernel_size(self.num_heads)
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        super().__post_init__()

    def __call__(
        self, x: Array, vit_params: Mapping[str, Any], *, train: bool, return_blocks: bool = False
    ) -> Array | tuple[Array, list[Array]]:
        """Logits of images x, the blocks' convs and MLPs computed from the ViT's `params` (timm layout)."""
        vit_depth = _vit_depth(vit_params)
        if vit_depth != self.depth:
            raise ValueError(
                f"shared agent depth {self.depth} != ViT depth {vit_depth} (pass the ViT's params "
                "collection, the tree holding blocks_0, blocks_1, ...)"
            )
        vit_dim = vit_params["blocks_0"]["attn"]["qkv"]["kernel"].shape[0]
        if vit_dim != self.embed_dim:
            raise ValueError(f"shared agent embed_dim {self.embed_dim} != ViT width {vit_dim}")
        shared = [shared_block_weights(vit_params[f"blocks_{i}"], self.num_heads) for i in range(self.depth)]
        return self._forward(x, train, return_blocks, "many_head", None, shared)


_COMMON_FIELDS = tuple(f.name for f in dataclasses.fields(_AgentBase) if f.name not in ("parent", "name"))


def materialize_shared_agent(
    model: SharedAgent, variables: Mapping[str, Any], vit_params: Mapping[str, Any]
) -> tuple[Agent, dict[str, Any]]:
    """A standalone many-head `Agent` + variables computing what `model` computes with `vit_params`."""
    first_mlp = vit_params["blocks_0"]["mlp"]["fc1"]["kernel"]
    agent = Agent(
        **{f: getattr(model, f) for f in _COMMON_FIELDS}, conv_type="many_head", mlp_dim=first_mlp.shape[1]
    )
    params = dict(variables["params"])
    for i in range(model.depth):
        w = shared_block_weights(vit_params[f"blocks_{i}"], model.num_heads)
        params[f"blocks_{i}"] = {
            **params[f"blocks_{i}"],
            "conv": {"kernel": w.conv_taps, "bias": w.conv_bias},
            "mlp": {
                "fc1": {"kernel": w.fc1_kernel[None, None], "bias": w.fc1_bias},
                "fc2": {"kernel": w.fc2_kernel[None, None], "bias": w.fc2_bias},
            },
        }
    return agent, {**variables, "params": params}


_SMALL = dict(embed_dim=288, depth=6, num_heads=9, conv_type="conv_sl", norm_position="pre")
_BASE = dict(embed_dim=384, depth=12, num_heads=6, conv_type="many_head", norm_position="post")
# num_heads of agent_small matches vit-small (9), so the shared variant pairs with it unchanged.
AGENT_PRESETS: dict[str, dict[str, Any]] = {
    "agent_small": {**_SMALL, "input_proj": "vit_like"},
    "agent_base": {**_BASE, "input_proj": "vit_like"},
    "agent_small_res_like": {**_SMALL, "input_proj": "resnet_like"},
    "agent_base_res_like": {**_BASE, "input_proj": "resnet_like"},
}


def create_agent(name: str | None = None, *, shared: bool = False, **overrides: Any) -> Agent | SharedAgent:
    """An `Agent` (or with shared=True a `SharedAgent`) from a preset in AGENT_PRESETS plus field overrides.

    The shared agent takes its convs and MLPs from the ViT, so it drops the preset's conv_type; its
    num_heads must equal the ViT's (agent_small's 9 matches vit-small, agent_base's 6 vit-base).
    """
    if name is not None and name not in AGENT_PRESETS:
        raise ValueError(f"unknown agent preset {name!r}; known: {sorted(AGENT_PRESETS)}")
    cls = SharedAgent if shared else Agent
    fields = _COMMON_FIELDS if shared else (*_COMMON_FIELDS, "conv_type", "mlp_dim")
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; valid: {list(fields)}")
    preset = AGENT_PRESETS[name] if name is not None else {}
    kwargs = {k: v for k, v in preset.items() if k in fields}
    if "down_sample_layers" in overrides:
        overrides["down_sample_layers"] = tuple(overrides["down_sample_layers"])
    return cls(**{**kwargs, **overrides})
