"""main.py's start-up contract: bad input ends it with exactly one `error:` line and exit code 2, writing nothing."""

from __future__ import annotations

import time

import pytest
from conftest import assert_one_error, free_port, run_cli

pytestmark = pytest.mark.slow  # the fast tier leaves this file out (pyproject.toml, markers)

PACKAGED = ("configs/bootstrap.py, configs/demo.py, configs/evaluate.py, configs/export.py, configs/finetune.py, "
            "configs/generate.py, configs/linear_probe.py, configs/pretrain.py")


@pytest.mark.parametrize(("config", "args", "message"), [
    ("configs/pretrain.py:demo", ("--config.batch_size=abc",),
     "error: --config.batch_size=abc: invalid literal for int() with base 10: 'abc'"),
    ("configs/pretrain.py:nope", (), "error: --config=configs/pretrain.py:nope: unknown variant 'nope' of "
     "configs/pretrain.py; known: paper_vit_tiny, paper_vit_tiny_ofdb, paper_vit_tiny_fractaldb, "
     "paper_vit_base_21k, demo, cpu_paper_aug"),
    ("configs/nope.py", (), f"error: --config=configs/nope.py: no such config file (the packaged ones: {PACKAGED})"),
    ("configs/pretrain.py:demo", ("--no_such_flag=1",), "error: Unknown command line flag 'no_such_flag'"),
    ("configs/pretrain.py:demo", ("stray",), "error: unexpected argument 'stray': settings are flags"),
])
def test_a_bad_config_flag_or_override_is_one_error_line(tmp_path, config, args, message):
    error = assert_one_error(run_cli(config, tmp_path / "run", None, *args))
    assert error.startswith(message), error
    assert not (tmp_path / "run").exists()


def test_a_config_file_with_a_syntax_error_is_one_error_line(tmp_path):
    config = tmp_path / "broken.py"
    config.write_text("def get_config():\n    return {\n")
    assert_one_error(run_cli(str(config), tmp_path / "run"), 2, f"--config={config}: '{{' was never closed")
    assert not (tmp_path / "run").exists()


def test_process_0_whose_peers_never_join_names_what_it_waited_for(tmp_path):
    """JAX would abort it (SIGABRT, a C++ trace) at its own deadline; distributed.initialize's timer comes first."""
    address = f"localhost:{free_port()}"
    start = time.monotonic()
    result = run_cli("configs/generate.py:demo", tmp_path / "run", None, f"--coordinator_address={address}",
                     "--num_processes=2", "--process_id=0", "--distributed_timeout=3")
    seconds = time.monotonic() - start
    assert_one_error(result, 2, f"process 0 of 2: not all 2 processes joined {address} within 3 s")
    assert "Check failure" not in result.stderr and "Fatal Python error" not in result.stderr
    assert 3 <= seconds < 3 + 30  # the rest is Python and JAX start-up
    assert not (tmp_path / "run").exists()
