"""The pre-train bank is kept as bits (1/8 of the bytes) and unpacked exactly where a batch gathers it."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onepfrac_jax.fractals import render
from onepfrac_jax.fractals.bank import BankSpec, build_bank
from onepfrac_jax.parallel.mesh import make_data_mesh
from onepfrac_jax.train import bank_task


@pytest.mark.parametrize("size", [32, 30])  # 30: a row's last byte is partly padding
def test_a_rendered_bank_packs_to_an_eighth_and_unpacks_to_the_same_pixels(size):
    mesh = make_data_mesh(jax.devices()[:2])
    bank = build_bank(BankSpec(num_classes=6, image_size=size, pad=2, num_points=2000), mesh)
    images = np.asarray(bank.images)
    assert set(np.unique(images)) == {0, render.VALUE}
    packed = bank_task.packed_bank(bank.images, mesh)
    assert packed.shape == (6, size, math.ceil(size / 8)) and packed.dtype == jnp.uint8
    assert packed.sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(render.unpack_images(packed)), images)
    # rows gathered from the packed bank unpack to the same rows of the canvases
    rows = jnp.asarray([5, 0, 3, 3])
    np.testing.assert_array_equal(np.asarray(render.unpack_images(packed[rows])), images[np.asarray(rows)])


def test_a_bank_with_other_pixel_values_is_refused():
    images = jnp.zeros((2, 8, 8), jnp.uint8).at[0, 1, 1].set(200)
    with pytest.raises(ValueError, match="other than 0 and 127"):
        bank_task.packed_bank(images, make_data_mesh(jax.devices()[:1]))
