"""Models: the ViT (timm layout), the CNN agent and the shared agent; the computation dtypes a config may name."""

from onepfrac_jax.models.precision import DTYPES, auto_dtype, resolve_dtype
from onepfrac_jax.models.vit import VIT_PRESETS, ViT, create_vit

__all__ = ["DTYPES", "VIT_PRESETS", "ViT", "auto_dtype", "create_vit", "resolve_dtype"]
