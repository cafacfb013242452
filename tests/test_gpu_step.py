"""gpu_step: the accelerator benchmark runs here (CPU, small sizes) and its FLOPs and peaks are the right ones."""

import re

import jax
import jax.numpy as jnp
import pytest

from benchmarks import gpu_step

pytestmark = pytest.mark.slow  # the fast tier leaves this file out (pyproject.toml, markers)


@pytest.mark.parametrize(("kind", "peak"), [("Tesla V100-SXM2-16GB", 125.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                            ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0),
                                            ("cpu", None), ("TPU v4", None)])
def test_peaks_are_looked_up_by_device_kind(kind, peak):
    assert gpu_step.peak_tflops(kind) == peak


def test_flops_come_from_the_compiled_programs_cost_analysis():
    a, b = jnp.ones((64, 128)), jnp.ones((128, 32))
    compiled = jax.jit(jnp.matmul).lower(a, b).compile()
    assert gpu_step.flops_of(compiled) == pytest.approx(2 * 64 * 128 * 32, rel=0.01)


def test_the_benchmark_prints_a_row_of_measurements_per_model(capsys, monkeypatch):
    # ViT-Ti/16 with 1 of its 12 blocks: every cell is measured the same way, at a fraction of the compile time
    from onepfrac_jax.configs import pretrain as pretrain_configs

    from onepfrac_jax.train import classify

    variant = pretrain_configs.get_config

    def one_block(name):
        config = variant(name)
        config.depth = 1
        return config

    monkeypatch.setattr(pretrain_configs, "get_config", one_block)
    gpu_step.main(["--models", "paper_vit_tiny", "--image-size", "32", "--batch-per-device", "8", "--steps", "2"])
    out = capsys.readouterr().out
    assert "peak unknown" in out.splitlines()[0]  # a CPU has no entry in the table
    row = next(line for line in out.splitlines() if line.startswith("| ViT-Ti/16, 1k |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    batch = 8 * jax.device_count()  # 8 a device, on every device of the data mesh
    assert cells[1] == "float32" and cells[2] == "xla" and cells[3] == str(batch)  # 'auto' on a CPU
    images_s, ms_step = float(cells[4]), float(cells[5])
    assert images_s == pytest.approx(batch / ms_step * 1e3, rel=0.01)
    share = int(re.fullmatch(r"(\d+)%", cells[6]).group(1))
    assert 0 < share < 100  # the batch alone takes part of the step, not all of it
    # one device's 8 images at 32², 5 tokens: forward + backward ≈ 6 · images · (params · tokens), the head's params
    # seeing one token (~0.26 GFLOP); the cell has 4 decimals of TFLOP
    config = one_block("paper_vit_tiny")
    config.image_size = 32
    shapes = jax.eval_shape(classify.build_vit(config, config.num_classes).init, jax.random.key(0),
                            jnp.zeros((1, 32, 32, 3)))["params"]
    head = sum(x.size for x in jax.tree.leaves(shapes["head"]))
    body = sum(x.size for x in jax.tree.leaves(shapes)) - head
    assert float(cells[7]) == pytest.approx(6 * 8 * (body * 5 + head) / 1e12, rel=0.4)
    assert cells[8] == "peak unknown"
