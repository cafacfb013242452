"""benchmarks/import_time.py prints a row per interpreter and module; the quick ml_dtypes it measured is installed."""

import sys
from importlib.metadata import version

import pytest
from packaging.version import Version

from benchmarks import import_time


def test_the_benchmark_prints_a_row_per_module(capsys):
    import_time.main(["--modules", "ml_dtypes,numpy", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "load average" in out
    rows = [line.split("|") for line in out.splitlines() if line.startswith(f"| {sys.executable} |")]
    assert [row[3].strip() for row in rows] == ["ml_dtypes", "numpy"]
    assert all(f"ml_dtypes {version('ml_dtypes')}, jax {version('jax')}" in row[2] for row in rows)
    assert float(rows[0][4].split()[0]) > 0  # ml_dtypes imports numpy and more: it costs more than nothing


def test_bad_arguments_are_one_error_line():
    with pytest.raises(SystemExit, match=r"--repeats=0 must be >= 1"):
        import_time.main(["--repeats", "0"])
    with pytest.raises(SystemExit, match=r"import no_such_module.*exited with 1.*ModuleNotFoundError"):
        import_time.main(["--modules", "no_such_module", "--repeats", "1"])


def test_the_installed_ml_dtypes_is_below_0_7():
    """pyproject.toml pins it: 0.7.0's extension takes ~0.5 s more to import, in every process that imports JAX."""
    assert Version(version("ml_dtypes")) < Version("0.7")
