"""Models: the ViT (timm layout), the CNN agent and the shared agent; the computation dtypes and attention kernels a
config may name."""

from onepfrac_jax.models.precision import ATTENTIONS, DTYPES, auto_dtype, resolve_attention, resolve_dtype
from onepfrac_jax.models.vit import VIT_PRESETS, ViT, create_vit

__all__ = ["ATTENTIONS", "DTYPES", "VIT_PRESETS", "ViT", "auto_dtype", "create_vit", "resolve_attention",
           "resolve_dtype"]
