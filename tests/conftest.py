"""Every test session sees 4 CPU devices, so sharding logic is exercised on a laptop and in CI."""

import jax

jax.config.update("jax_num_cpu_devices", 4)
