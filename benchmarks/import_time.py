"""What importing costs a fresh process: `python -m benchmarks.import_time`.

    python -m benchmarks.import_time                     # this interpreter: ml_dtypes, numpy, jax, matplotlib, main
    python -m benchmarks.import_time --python /tmp/a/bin/python,/tmp/b/bin/python --modules ml_dtypes

Each import runs in a fresh `python -c "import MODULE"`, --repeats times. The table gives the median and the range
of the child's CPU time (user + system, from its rusage) and of its wall time, each less an empty interpreter's
(`python -c pass`, measured the same way), with the ml_dtypes and jax versions of that interpreter.

Why it matters: every CLI command, and every process a test starts, imports JAX, and JAX imports ml_dtypes. The
extension of ml_dtypes 0.7.0 takes about 0.5 s of CPU to load where 0.6.0's takes about 0.05 s, so pyproject.toml
keeps ml_dtypes below 0.7 (docs/testing.md, "What makes it fast").
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from benchmarks.load import load_average

MODULES = ("ml_dtypes", "numpy", "jax", "matplotlib.pyplot", "onepfrac_jax.main")


def child_seconds(python: str, code: str) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one `python -c code`, which must exit 0."""
    start = time.perf_counter()
    proc = subprocess.Popen([python, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        last = (proc.stderr.read().decode().strip().splitlines() or [""])[-1]  # e.g. ModuleNotFoundError: ...
        raise SystemExit(f"error: {python} -c {code!r} exited with {proc.returncode}: {last}")
    return usage.ru_utime + usage.ru_stime, wall


def versions(python: str) -> str:
    code = ("import importlib.metadata as m\nfor name in ('ml_dtypes', 'jax'):\n"
            "    try: print(name, m.version(name))\n    except m.PackageNotFoundError: print(name, '-')")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout
    return ", ".join(out.split("\n")[:2])


def measure(python: str, module: str, repeats: int, empty: tuple[float, float]) -> dict:
    """Median and range of CPU and wall seconds of importing `module`, less `empty` (an empty interpreter's)."""
    runs = [child_seconds(python, f"import {module}") for _ in range(repeats)]
    cpu = [c - empty[0] for c, _ in runs]
    wall = [w - empty[1] for _, w in runs]
    return {"cpu": statistics.median(cpu), "cpu_range": (min(cpu), max(cpu)), "wall": statistics.median(wall),
            "wall_range": (min(wall), max(wall))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--python", default=sys.executable, help="interpreters, comma-separated")
    parser.add_argument("--modules", default=",".join(MODULES), help="modules, comma-separated")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        raise SystemExit(f"error: --repeats={args.repeats} must be >= 1")
    print(f"load average {load_average()}; {args.repeats} fresh processes per row, median (min-max), less an empty "
          "interpreter's")
    print("| interpreter | versions | import | CPU s | wall s |")
    print("|---|---|---|---:|---:|")
    for python in args.python.split(","):
        empty_runs = [child_seconds(python, "pass") for _ in range(args.repeats)]
        empty = (statistics.median(c for c, _ in empty_runs), statistics.median(w for _, w in empty_runs))
        found = versions(python)
        for module in args.modules.split(","):
            m = measure(python, module, args.repeats, empty)
            print(f"| {python} | {found} | {module} | {m['cpu']:.2f} ({m['cpu_range'][0]:.2f}-{m['cpu_range'][1]:.2f})"
                  f" | {m['wall']:.2f} ({m['wall_range'][0]:.2f}-{m['wall_range'][1]:.2f}) |", flush=True)


if __name__ == "__main__":
    main()
