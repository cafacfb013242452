"""bank_layout: every way of keeping the bank gathers the same batch, and the table says what each costs."""

import re

import jax
import numpy as np
import pytest

from benchmarks import bank_layout
from onepfrac_jax.fractals import render
from onepfrac_jax.parallel.mesh import make_data_mesh


@pytest.mark.parametrize("layout", bank_layout.LAYOUTS)
def test_each_layout_gathers_the_keyed_rows_bit_for_bit(layout):
    mesh = make_data_mesh()
    images = bank_layout.random_bank(24, 16)
    assert set(np.unique(images)) == {0, render.VALUE}
    key = jax.random.key(3)
    out = bank_layout.gather_program(layout, mesh, 8)(bank_layout.place_bank(layout, images, mesh), key)
    rows = np.asarray(jax.random.randint(key, (8,), 0, 24))
    np.testing.assert_array_equal(np.asarray(out), images[rows])
    assert out.sharding.spec == jax.sharding.PartitionSpec("data")


def test_the_table_has_each_layouts_bytes_and_collectives(capsys):
    bank_layout.main(["--devices", str(jax.device_count()), "--classes", "32", "--size", "16",
                     "--batch-per-device", "2", "--steps", "2"])
    out = capsys.readouterr().out
    assert "bank 32 × 16²" in out and "load average" in out
    rows = {cells[0]: cells[1:] for line in out.splitlines() if line.startswith("| ") and "---" not in line
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}
    mb = {layout: float(rows[layout][0]) for layout in bank_layout.LAYOUTS}
    full = 32 * 16 * 16 / 2**20
    devices = jax.device_count()
    assert mb["replicated bytes"] == pytest.approx(full, abs=0.05)
    # bits are 1/8 of the bytes; a shard is 1/D of the bank (printed to 0.1 MB: compare the exact sizes instead)
    assert [round(mb[k] * 10) for k in bank_layout.LAYOUTS] == [round(full * f * 10) for f in
                                                               (1, 1 / 8, 1 / devices, 1 / (8 * devices))]
    assert all(float(row[1]) > 0 for row in rows.values() if row[0] != "MB a device")
    assert rows["replicated bytes"][2] == rows["replicated bits"][2] == "none"
    assert re.search(r"all-(gather|reduce) [\d.e-]+ MB", rows["sharded bytes"][2])


def test_collectives_reads_the_kinds_and_sizes_of_a_compiled_program():
    mesh = make_data_mesh()
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    x = jax.device_put(np.zeros((4 * jax.device_count(), 256), np.float32), sharding)
    total = jax.jit(lambda a: a.sum(axis=0), out_shardings=jax.sharding.NamedSharding(mesh,
                                                                                       jax.sharding.PartitionSpec()))
    text = bank_layout.collectives(total.lower(x).compile())
    assert text == "all-reduce 0.000977 MB"  # one f32[256] result: 1 KiB
