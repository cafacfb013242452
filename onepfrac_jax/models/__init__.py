"""Models: the ViT (timm layout), the CNN agent and the shared agent."""

import jax.numpy as jnp

from onepfrac_jax.models.vit import VIT_PRESETS, ViT, create_vit

# Computation dtypes a config may name (`dtype`); parameters always stay float32.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

__all__ = ["DTYPES", "VIT_PRESETS", "ViT", "create_vit"]
