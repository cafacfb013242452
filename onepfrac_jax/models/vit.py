"""Vision Transformer in timm's layout, so that export to timm/PyTorch is a pure renaming.

Param tree (Linen names; timm names are the same with `/` → `.` and `blocks_i` → `blocks.i`):
  patch_embed/proj/{kernel (p,p,3,D), bias}   cls_token (1,1,D)   pos_embed (1,1+N,D)
  blocks_i/{norm1, attn/qkv, attn/proj, norm2, mlp/fc1, mlp/fc2}   norm   head
The qkv kernel's output columns are [q | k | v], each head-major: column = part*D + head*dh + j.

Mixed precision follows PyTorch AMP: matmuls/convs run in `dtype`, while the residual stream, LayerNorm,
softmax and the returned logits stay float32 (AMP adds fp16 branch outputs onto a float32 residual).

Attention is `jax.nn.dot_product_attention` (float32 logits and softmax whatever `dtype`); `attention_impl`
chooses its backend: None (JAX's choice: XLA in JAX ≤ 0.10), 'xla' or 'cudnn' (cuDNN's fused flash attention on
NVIDIA GPUs, float16/bfloat16 only). `remat=True` recomputes each block's activations in the backward pass
(`nn.remat`) instead of keeping them: the same params, loss and gradients, less memory, one more forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# timm's trunc_normal_(std=.02) truncates at ±2 in absolute value, i.e. ±100σ: effectively a plain normal.
_dense_init = nn.initializers.normal(stddev=0.02)
# PyTorch's default Conv2d / Linear weight init (timm leaves the patch embedding on it): U(±1/sqrt(fan_in)).
torch_default_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
_zeros = nn.initializers.zeros_init()
_xavier = nn.initializers.xavier_uniform()


def _torch_bias(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's default Linear / Conv2d bias init: U(±1/sqrt(fan_in))."""
    bound = fan_in**-0.5
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _bootstrap_mlp_bias(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
    # The Bootstrapping-ViTs code calls nn.init.normal_(bias, 1e-6): mean 1e-6, standard deviation 1.
    return 1e-6 + jax.random.normal(key, shape, dtype)


# Initialisers per `ViT.init_scheme`, by role. 'timm': timm's ViT. 'xavier': xavier-uniform attention and MLP
# matrices (over the fused qkv matrix, as torch's xavier_uniform_ on the (3D, D) weight), the rest timm's.
# 'bootstrap': the Bootstrapping-ViTs authors' ViT exactly: xavier matrices, MLP biases N(1e-6, 1), patch
# projection N(0, 1), cls token N(0, .02), head PyTorch's default Linear init.
VIT_INITS = ("timm", "xavier", "bootstrap")
_INITS = {
    "timm": dict(matrix=_dense_init, mlp_bias=_zeros, patch=torch_default_init, cls=nn.initializers.normal(1e-6),
                 head=_dense_init, head_bias=lambda fan_in: _zeros),
    "xavier": dict(matrix=_xavier, mlp_bias=_zeros, patch=torch_default_init, cls=nn.initializers.normal(1e-6),
                   head=_dense_init, head_bias=lambda fan_in: _zeros),
    "bootstrap": dict(matrix=_xavier, mlp_bias=_bootstrap_mlp_bias, patch=nn.initializers.normal(1.0),
                      cls=nn.initializers.normal(0.02), head=torch_default_init, head_bias=_torch_bias),
}


def _dense(features: int, dtype: Dtype, param_dtype: Dtype, name: str, init: str = "timm",
           bias_init: nn.initializers.Initializer = _zeros) -> nn.Dense:
    """An attention or MLP projection with the `init` scheme's matrix initialiser."""
    return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, kernel_init=_INITS[init]["matrix"],
                    bias_init=bias_init, name=name)


def _head(model: ViT) -> nn.Dense:
    """The classifier head with the model's `init_scheme`."""
    scheme = _INITS[model.init_scheme]
    return nn.Dense(model.num_classes, dtype=model.dtype, param_dtype=model.param_dtype, kernel_init=scheme["head"],
                    bias_init=scheme["head_bias"](model.embed_dim), name="head")


def _layer_norm(name: str, param_dtype: Dtype) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-6, dtype=jnp.float32, param_dtype=param_dtype, name=name)


# flax's nn.Dropout draws a replicated mask and `select`s, which an Explicit-sharding mesh (jax.make_mesh's
# default) rejects for a batch-sharded input; a mask drawn with the input's sharding also spares each device
# the other shards' random bits, and equals the unsharded mask.
class Dropout(nn.Module):
    """Inverted dropout (rng stream 'dropout') whose mask is drawn with the input's sharding."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        rng = self.make_rng("dropout")
        mask = jax.random.bernoulli(rng, keep, x.shape, out_sharding=jax.typeof(x).sharding)
        return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


class DropPath(nn.Module):
    """Stochastic depth: zero a whole residual branch per sample with probability `rate`, rescale the rest."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("drop_path"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return x * (mask.astype(x.dtype) / jnp.asarray(keep, x.dtype))


ATTENTION_IMPLS = (None, "xla", "cudnn")


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                      dropout: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
    """softmax(q kᵀ / √d) v over (B, N, H, d) inputs, logits and softmax in float32, probabilities back in the
    inputs' dtype; `dropout` (if any) applies to the probabilities. jax.nn.dot_product_attention's math, spelt out
    for what it cannot do (dropout on the probabilities; float16 off GPUs, whose dot algorithm CPU and TPU lack)."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    if dropout is not None:
        probs = dropout(probs)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (timm `Attention`)."""

    dim: int
    num_heads: int
    attn_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None  # jax.nn.dot_product_attention's `implementation`
    init_scheme: str = "timm"  # a VIT_INITS key

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        b, n, _ = x.shape
        dh = self.dim // self.num_heads
        attn_drop = Dropout(self.attn_drop_rate)  # made first either way: the dropout rng names stay as they were
        qkv = _dense(3 * self.dim, self.dtype, self.param_dtype, "qkv", self.init_scheme)(x)
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, dh).transpose(2, 0, 1, 3, 4)  # each (B, N, H, dh)
        if train and self.attn_drop_rate > 0:  # dot_product_attention has no dropout
            out = softmax_attention(q, k, v, lambda p: attn_drop(p, deterministic=False))
        elif q.dtype == jnp.float16 and jax.default_backend() != "gpu" and self.attention_impl != "cudnn":
            out = softmax_attention(q, k, v)
        else:
            out = jax.nn.dot_product_attention(q, k, v, implementation=self.attention_impl)
        out = _dense(self.dim, self.dtype, self.param_dtype, "proj", self.init_scheme)(out.reshape(b, n, self.dim))
        return Dropout(self.proj_drop_rate)(out, deterministic=not train)


class Mlp(nn.Module):
    """fc1 → exact GELU → dropout → fc2 → dropout (timm `Mlp`)."""

    dim: int
    hidden_dim: int
    drop_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    init_scheme: str = "timm"  # a VIT_INITS key

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        bias = _INITS[self.init_scheme]["mlp_bias"]
        x = _dense(self.hidden_dim, self.dtype, self.param_dtype, "fc1", self.init_scheme, bias)(x)
        x = nn.gelu(x, approximate=False)
        x = Dropout(self.drop_rate)(x, deterministic=not train)
        x = _dense(self.dim, self.dtype, self.param_dtype, "fc2", self.init_scheme, bias)(x)
        return Dropout(self.drop_rate)(x, deterministic=not train)


class Block(nn.Module):
    """Pre-norm transformer block: x += DropPath(Attn(LN(x))); x += DropPath(MLP(LN(x)))."""

    dim: int
    num_heads: int
    mlp_dim: int
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    init_scheme: str = "timm"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:  # train positional: nn.remat's static argument
        drop_path = DropPath(self.drop_path_rate)
        y = _layer_norm("norm1", self.param_dtype)(x).astype(self.dtype)
        y = Attention(self.dim, self.num_heads, self.attn_drop_rate, self.drop_rate, self.dtype,
                      self.param_dtype, self.attention_impl, self.init_scheme, name="attn")(y, train=train)
        x = x + drop_path(y, deterministic=not train)
        y = _layer_norm("norm2", self.param_dtype)(x).astype(self.dtype)
        y = Mlp(self.dim, self.mlp_dim, self.drop_rate, self.dtype, self.param_dtype, self.init_scheme, name="mlp")(
            y, train=train
        )
        return x + drop_path(y, deterministic=not train)


class ViT(nn.Module):
    """ViT with cls-token pooling; defaults are timm's `vit_tiny_patch16_224` with 1,000 classes."""

    num_classes: int = 1000  # 0: no head, __call__ returns the pooled (final-normed cls) features
    img_size: int = 224  # square input side; fixes the number of learned positions
    patch_size: int = 16
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_dim: int = 768
    drop_rate: float = 0.0  # timm's pos_drop_rate and proj_drop_rate (after pos-embed, attn proj, MLP)
    attn_drop_rate: float = 0.0  # on the attention probabilities
    drop_path_rate: float = 0.0  # of the last block; block i uses rate * i / (depth - 1) as timm
    dtype: Dtype = jnp.float32  # computation dtype of matmuls/convs (bfloat16/float16 for mixed precision)
    param_dtype: Dtype = jnp.float32
    remat: bool = False  # recompute each block in the backward pass (nn.remat) instead of storing its activations
    attention_impl: str | None = None  # jax.nn.dot_product_attention's implementation: None, 'xla' or 'cudnn'
    init_scheme: str = "timm"  # parameter initialisation, a VIT_INITS key: 'timm', 'xavier', 'bootstrap' (the authors')

    def __post_init__(self) -> None:
        _validate(self)
        super().__post_init__()

    @property
    def grid_size(self) -> int:
        """Patches per image side."""
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patch tokens per image (excluding the cls token)."""
        return self.grid_size**2

    @nn.compact
    def __call__(
        self, x: jax.Array, *, train: bool = False, return_blocks: bool = False
    ) -> jax.Array | tuple[jax.Array, list[jax.Array]]:
        """Logits (B, num_classes) of images x (B, H, W, 3); `return_blocks` adds each block's tokens."""
        if x.shape[1:] != (self.img_size, self.img_size, 3):
            raise ValueError(
                f"ViT expects images of shape (B, {self.img_size}, {self.img_size}, 3) (NHWC), got {x.shape}"
            )
        x = PatchEmbed(self.patch_size, self.embed_dim, self.dtype, self.param_dtype, _INITS[self.init_scheme]["patch"],
                       name="patch_embed")(x)
        cls = self.param("cls_token", _INITS[self.init_scheme]["cls"], (1, 1, self.embed_dim), self.param_dtype)
        pos = self.param("pos_embed", nn.initializers.normal(stddev=0.02), (1, 1 + self.num_patches,
                         self.embed_dim), self.param_dtype)
        # zeros_like keeps x's batch sharding, which broadcast_to would drop under an Explicit mesh.
        x = jnp.concatenate([jnp.zeros_like(x[:, :1]) + cls, x], axis=1) + pos
        x = Dropout(self.drop_rate)(x, deterministic=not train)

        # nn.remat keeps the module's name, hence the param tree; argument 2 (after self and x) is `train`.
        block = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
        blocks = []
        for i, rate in enumerate(drop_path_rates(self.drop_path_rate, self.depth)):
            x = block(self.embed_dim, self.num_heads, self.mlp_dim, self.drop_rate, self.attn_drop_rate, rate,
                      self.dtype, self.param_dtype, self.attention_impl, self.init_scheme, name=f"blocks_{i}")(x, train)
            blocks.append(x)

        out = _layer_norm("norm", self.param_dtype)(x)[:, 0]
        if self.num_classes > 0:
            out = _head(self)(out.astype(self.dtype))
            out = out.astype(jnp.float32)
        return (out, blocks) if return_blocks else out


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches → D-dim tokens in raster order (timm `PatchEmbed`); output float32."""

    patch_size: int
    embed_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = torch_default_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.patch_size
        x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    param_dtype=self.param_dtype, kernel_init=self.kernel_init, name="proj")(x)
        return x.reshape(x.shape[0], -1, self.embed_dim).astype(jnp.float32)


def drop_path_rates(max_rate: float, depth: int) -> list[float]:
    """Per-block stochastic-depth rates, linear from 0 to `max_rate` over the blocks (timm's rule)."""
    return [float(r) for r in np.linspace(0.0, max_rate, depth, dtype=np.float32)]


VIT_PRESETS: dict[str, dict[str, Any]] = {
    "vit_tiny_patch16_224": dict(embed_dim=192, depth=12, num_heads=3, mlp_dim=768),
    "vit_small_patch16_224": dict(embed_dim=384, depth=12, num_heads=6, mlp_dim=1536),
    "vit_base_patch16_224": dict(embed_dim=768, depth=12, num_heads=12, mlp_dim=3072),
    # Bootstrapping ViTs (arXiv 2112.03552): "vit-small" and "vit-base".
    "vit_small_bootstrap": dict(embed_dim=288, depth=6, num_heads=9, mlp_dim=1152, drop_rate=0.1),
    "vit_base_bootstrap": dict(embed_dim=384, depth=12, num_heads=6, mlp_dim=1536),
}


def create_vit(name: str | None = None, **overrides: Any) -> ViT:
    """A `ViT` from a preset name in `VIT_PRESETS` (or the defaults when None), with fields overridden."""
    if name is None:
        preset = {}
    elif name in VIT_PRESETS:
        preset = VIT_PRESETS[name]
    else:
        raise ValueError(f"unknown ViT preset {name!r}; known: {', '.join(sorted(VIT_PRESETS))}")
    return ViT(**{**preset, **overrides})


def init_head(model: ViT, rng: jax.Array) -> dict[str, jax.Array]:
    """Fresh classifier-head params for `model`, from the same initialisers as `ViT.init` (cheap: no body)."""
    return _head(model).init(rng, jnp.zeros((1, model.embed_dim), model.dtype))["params"]


def _validate(m: ViT) -> None:
    for field in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_dim"):
        value = getattr(m, field)
        if not isinstance(value, int | np.integer) or value <= 0:
            raise ValueError(f"ViT.{field} must be a positive integer, got {value!r}")
    if m.num_classes < 0:
        raise ValueError(f"ViT.num_classes must be >= 0, got {m.num_classes}")
    if m.init_scheme not in VIT_INITS:
        raise ValueError(f"ViT.init_scheme must be one of {', '.join(VIT_INITS)}, got {m.init_scheme!r}")
    if m.img_size % m.patch_size:
        raise ValueError(f"ViT.img_size ({m.img_size}) must be divisible by patch_size ({m.patch_size})")
    if m.embed_dim % m.num_heads:
        raise ValueError(f"ViT.embed_dim ({m.embed_dim}) must be divisible by num_heads ({m.num_heads})")
    for field in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
        if not 0.0 <= getattr(m, field) < 1.0:
            raise ValueError(f"ViT.{field} must lie in [0, 1), got {getattr(m, field)!r}")
    if not isinstance(m.remat, bool | np.bool_):
        raise ValueError(f"ViT.remat must be a bool, got {m.remat!r}")
    if m.attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"ViT.attention_impl must be one of {ATTENTION_IMPLS}, got {m.attention_impl!r}")
