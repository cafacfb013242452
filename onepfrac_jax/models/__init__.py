"""Models: the ViT (timm layout), the CNN agent and the shared agent."""

from onepfrac_jax.models.vit import VIT_PRESETS, ViT, create_vit

__all__ = ["VIT_PRESETS", "ViT", "create_vit"]
