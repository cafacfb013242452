"""onepfrac-jax: 1p-frac and Bootstrapping ViTs in JAX/Flax, with fractals rendered on the accelerator."""
