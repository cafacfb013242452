"""The suite's persistent compilation cache (conftest.py) changes no result: a program read back from it computes,
bit for bit, what the same program compiled afresh computes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onepfrac_jax.models import create_vit

pytestmark = pytest.mark.slow  # the fast tier leaves this file out (pyproject.toml, markers)

HITS = "/jax/compilation_cache/cache_hits"


def test_a_train_step_read_from_the_cache_is_bitwise_a_fresh_compile():
    model = create_vit("vit_tiny_patch16_224", num_classes=5, img_size=16, patch_size=8, embed_dim=32, depth=1,
                       num_heads=2, mlp_dim=64, drop_path_rate=0.1, drop_rate=0.1)
    x = jax.random.uniform(jax.random.key(0), (4, 16, 16, 3))
    params = model.init(jax.random.key(1), x)["params"]

    def loss(params, key):
        logits = model.apply({"params": params}, x, train=True, rngs={"dropout": key, "drop_path": key})
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[:, 0])

    def step():
        """The same program in a function of its own, which JAX's in-memory caches have not seen (clearing them
        instead would cost the worker's later tests their compiled programs)."""
        return jax.jit(jax.value_and_grad(lambda params, key: loss(params, key)))

    key = jax.random.key(2)  # made before listening: an eager op may itself be read from the cache
    hits = []
    listener = lambda event, **_: hits.append(event) if event == HITS else None
    jax.monitoring.register_event_listener(listener)
    try:
        fresh = step()(params, key)  # this test's own program: compiled here, then written to the cache
        assert hits == [], "the first compile came from the cache: it was not compiled afresh"
        cached = step()(params, key)  # not in memory: read back from disk
    finally:
        jax.monitoring.unregister_event_listener(listener)
    assert hits, "the second compile did not come from the persistent cache"
    for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(cached), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
