"""What the pre-train step costs to build, and what its program holds: `python -m benchmarks.compile_cost`.

    python -m benchmarks.compile_cost                    # 64, 1,000 and 21,000 classes at 512²
    python -m benchmarks.compile_cost --classes 64,1000 --render-size 256 --closed-up-to 0

One row per case, each in a fresh process so that its peak RSS is its own: the seconds to lower and to compile
(the fastest of --repeats, wall clock, and the CPU seconds of lower + compile, less sensitive to other load)
the loop's own jitted train step (loop.jit_train_step over bank_task.make_task), the resident set size before
lowering and its peak during lower + compile (psutil, sampled every 5 ms), the process's peak (ru_maxrss, which
includes making the bank), the largest non-splat constant of the lowered program, and its `while` loops (how
many, and in brackets how many have a data-dependent trip count). The model is a 1-block ViT at 32²
crops and the augmentation the demo's (RandomResizedCrop, flips, jitter, mixup/cutmix): what is measured is the
part that depends on the bank, not the model.

Banks: `abstract`, a jax.ShapeDtypeStruct (nothing allocated: an argument's pixels cannot change the program);
`zeros`, a real zeros bank on the device (RSS then includes it); `random`, random bits (a bank is packed to 1 bit a
pixel, as pretrain.run keeps it) (closed over, a zeros bank would be one cheap splat constant). Passed as an
`argument` of the step (how pretrain runs now), or as a `constant`: make_batch closes over it and jit embeds it in
the program (how pretrain ran before), measured up to --closed-up-to classes: a constant over 2 GB would not fit the
protobuf XLA serialises the program to.

The helpers `large_constants` and `while_trip_counts` read a lowered program's StableHLO text; the tests use
them (tests/test_step_program.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from benchmarks.load import load_average

BANKS = ("abstract", "zeros", "random")
_BITS = {"i1": 8, "pred": 8}

# ------------------------------------------------------------------------------------ reading StableHLO text ----


def _tensor_bytes(spec: str) -> int:
    """Bytes of a `tensor<...>` type body such as '21000x512x512xui8' (sub-byte types count one byte)."""
    *dims, element = spec.split(",")[0].split("x")
    bits = _BITS.get(element) or int(re.search(r"\d+", element).group())
    return math.prod(int(d) for d in dims) * max(1, bits // 8)


def large_constants(text: str, limit: int = 1 << 20) -> list[tuple[str, int]]:
    """(tensor type, bytes) of every non-splat `stablehlo.constant` of more than `limit` bytes in `text`.

    A splat (one value repeated, `dense<0> : tensor<1000x512x512xui8>`) is stored as one element and is left out.
    """
    found = []
    for match in re.finditer(r"stablehlo\.constant dense<", text):
        start = match.end()
        if text.startswith('"', start):  # hex-encoded bytes: dense<"0x...">
            end = text.index('"', start + 1) + 1
        elif text.startswith("[", start):  # nested lists: dense<[[1, 2], [3, 4]]>
            end = text.index("]>", start) + 1
        else:
            continue  # a splat
        kind = re.match(r"> : tensor<([^>]*)>", text[end : end + 200])
        size = _tensor_bytes(kind.group(1))
        if size > limit:
            found.append((kind.group(1), size))
    return found


def _constant_value(lines: list[str], name: str) -> int | None:
    """The integer value of constant `name` defined in `lines` (the last definition), or None."""
    pattern = re.compile(rf"^\s*{re.escape(name)} = stablehlo\.constant dense<(-?\d+)> : tensor<i\d+>")
    for line in reversed(lines):
        found = pattern.match(line)
        if found:
            return int(found.group(1))
    return None


def _enclosing(lines: list[str], at: int) -> list[str]:
    """The lines before `at` in its function that a value used at line `at` can be defined on: those of the same
    or an enclosing region (indentation ≤ that of line `at`), back to the function's header."""
    indent = len(lines[at]) - len(lines[at].lstrip())
    seen = []
    for line in reversed(lines[:at]):
        if line.lstrip().startswith("func.func"):
            break
        if len(line) - len(line.lstrip()) <= indent:
            seen.append(line)
    return seen[::-1]


def _region(lines: list[str], start: int, indent: int) -> tuple[list[str], int]:
    """The lines after `start` up to the next line at `indent` that closes a region, and that line's index."""
    end = start + 1
    while not (len(lines[end]) - len(lines[end].lstrip()) == indent and lines[end].lstrip().startswith("}")):
        end += 1
    return lines[start + 1 : end], end


def while_trip_counts(text: str) -> list[int | None]:
    """For each `stablehlo.while` in `text`, its trip count where it is static, else None.

    Static: the condition is one `compare LT` of a loop variable with a constant, that variable starts at a
    constant and the body adds a positive constant to it — the form of lax.scan and lax.fori_loop over static
    bounds. Any other loop (betainc's continued fraction, which runs until it converges) has a data-dependent
    trip count.
    """
    lines = text.splitlines()
    counts: list[int | None] = []
    for i, line in enumerate(lines):
        if '"stablehlo.while"' in line:  # the generic form, which this reader does not parse: unknown
            counts.append(None)
        elif "stablehlo.while(" in line:
            counts.append(_trip_count(lines, i))
    return counts


def _trip_count(lines: list[str], at: int) -> int | None:
    header = lines[at]
    operands = re.findall(r"(%iterArg\w*) = (%[\w#]+)", header.split("stablehlo.while(", 1)[1].split(") :")[0])
    names = [name for name, _ in operands]
    cond_at = at + 1
    indent = len(lines[cond_at]) - len(lines[cond_at].lstrip())
    cond, do_at = _region(lines, cond_at, indent)
    body, _ = _region(lines, do_at, indent)
    # The condition: constants, one compare, its return.
    ops = [line for line in cond if "stablehlo.constant" not in line]
    if len(ops) != 2:
        return None
    compare = re.match(r"\s*(%\w+) = stablehlo\.compare\s+LT, (%iterArg\w*), (%\w+)", ops[0])
    if compare is None or ops[1].strip().split(" :")[0] != f"stablehlo.return {compare.group(1)}":
        return None
    counter, bound_name = compare.group(2), compare.group(3)
    bound = _constant_value(cond, bound_name)
    if bound is None:
        bound = _constant_value(_enclosing(lines, at), bound_name)
    init = _constant_value(_enclosing(lines, at), dict(operands)[counter])
    # The body: the counter's next value is counter + a positive constant.
    body_indent = indent + 2
    top = [line for line in body if len(line) - len(line.lstrip()) == body_indent]
    returned = top[-1].strip().removeprefix("stablehlo.return ").split(" :")[0].split(", ")
    step = None
    for line in top:
        add = re.match(rf"\s*{re.escape(returned[names.index(counter)])} = stablehlo\.add "
                       rf"(%\w+), (%\w+)", line)
        if add and counter in add.groups():
            other = add.group(2) if add.group(1) == counter else add.group(1)
            step = _constant_value(top, other)
            if step is None:
                step = _constant_value(_enclosing(lines, at), other)
    if None in (bound, init, step) or step <= 0:
        return None
    return max(0, -(-(bound - init) // step))


# ------------------------------------------------------------------------------------ the pre-train step ----


def bench_config(num_classes: int, render_size: int) -> ml_collections.ConfigDict:
    """The demo pre-train config with a 1-block ViT, `num_classes` classes rendered at `render_size`²."""
    from onepfrac_jax.configs import pretrain as pretrain_configs

    from onepfrac_jax.config import apply_overrides

    return apply_overrides(pretrain_configs.get_config("demo"), {
        "num_classes": num_classes, "render_size": render_size, "pad": 4, "image_size": 32, "batch_size": 16,
        "total_steps": 10, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64})


def pretrain_task(config: ml_collections.ConfigDict, bank: str, mesh: jax.sharding.Mesh):
    """bank_task.make_task over a `bank` of BANKS (see the module docstring) replicated on `mesh`, and the
    configured model: the Task pretrain.run trains, without rendering a bank."""
    from onepfrac_jax.data.augment import augment_config
    from onepfrac_jax.parallel.mesh import replicated
    from onepfrac_jax.stages import pretrain
    from onepfrac_jax.train import bank_task, classify

    spec = pretrain.validate(config)
    spread = replicated(mesh)
    shape = (spec.num_classes, spec.image_size, math.ceil(spec.image_size / 8))  # packed to bits, as pretrain.run
    params_shape = (spec.num_classes, spec.num_maps, 6)
    images = jax.ShapeDtypeStruct(shape, jnp.uint8, sharding=spread)
    class_params = jax.ShapeDtypeStruct(params_shape, jnp.float32, sharding=spread)
    rng = np.random.default_rng(0)
    if bank != "abstract" and config.data_mode == "bank":  # each mode reads one of the two
        pixels = (np.zeros(shape, np.uint8) if bank == "zeros"
                  else rng.integers(0, 256, shape, dtype=np.uint8))
        images = jax.device_put(pixels, spread)
        del pixels
    elif bank != "abstract":
        values = np.zeros(params_shape) if bank == "zeros" else rng.normal(size=params_shape)
        class_params = jax.device_put(values.astype(np.float32), spread)
    probs = jnp.full((spec.num_maps,), 1.0 / spec.num_maps)
    model = classify.build_vit(config, spec.num_classes)
    return bank_task.make_task(config, spec, model, augment_config(config.augment), mesh, images, class_params, probs)


def pretrain_step(config: ml_collections.ConfigDict, bank: str = "abstract", closed: bool = False,
                  mesh: jax.sharding.Mesh | None = None, abstract_state: bool = True) -> tuple[Callable, tuple]:
    """The pre-train stage's jitted train step and its arguments (state, host inputs, resident): a `bank` of BANKS
    (see the module docstring), closed over by make_batch if `closed` (the code before) else the step's argument;
    the state abstract (to lower) unless not `abstract_state` (to run). Built by bank_task.make_task and
    loop.jit_train_step: what `pretrain.run` compiles."""
    from onepfrac_jax.parallel.mesh import make_data_mesh
    from onepfrac_jax.train import loop

    if bank not in BANKS or (closed and bank == "abstract"):
        raise ValueError(f"bank={bank!r} (closed={closed}) is not one of {BANKS} (a closed-over bank is concrete)")
    mesh = make_data_mesh(jax.devices()[:1]) if mesh is None else mesh
    task = pretrain_task(config, bank, mesh)
    if closed:  # the code before: make_batch closed over the bank
        batch_of, resident = task.make_batch, task.resident
        task = dataclasses.replace(task, make_batch=lambda key, inputs, step: batch_of(key, inputs, step, resident),
                                   resident=None)
    step_fn, tx = loop.jit_train_step(task, config, mesh, loop.total_steps(config, task.steps_per_epoch))
    if not abstract_state:
        return step_fn, (loop.init_state(task, tx, config.seed, mesh), None, task.resident)
    return step_fn, (loop.abstract_state(task, tx, mesh), None, task.resident)


def lower_pretrain_step(config: ml_collections.ConfigDict, bank: str = "abstract", closed: bool = False,
                        mesh: jax.sharding.Mesh | None = None) -> jax.stages.Lowered:
    """pretrain_step's step, lowered."""
    step_fn, args = pretrain_step(config, bank, closed, mesh)
    return step_fn.lower(*args)


# ------------------------------------------------------------------------------------ the benchmark ----


class _PeakRSS:
    """The process's largest resident set size while in the `with` block, sampled every 5 ms."""

    def __init__(self):
        import psutil

        self._process = psutil.Process()
        self.peak = self._process.memory_info().rss
        self._done = threading.Event()

    def _sample(self):
        while not self._done.wait(0.005):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self) -> _PeakRSS:
        self.start = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def measure(num_classes: int, render_size: int, bank: str, closed: bool, repeats: int) -> dict:
    """One case, in this process: seconds to lower and compile (the fastest of `repeats`, caches cleared in
    between; wall and CPU), RSS over them all, the program's constants and loops."""
    step_fn, args = pretrain_step(bench_config(num_classes, render_size), bank, closed)
    times = []
    with _PeakRSS() as rss:
        for _ in range(repeats):
            jax.clear_caches()
            start, cpu = time.perf_counter(), time.process_time()
            lowered = step_fn.lower(*args)
            lowered_at = time.perf_counter()
            lowered.compile()
            times.append((lowered_at - start, time.perf_counter() - lowered_at, time.process_time() - cpu))
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before printing the program below
    text = lowered.as_text()
    constants = large_constants(text, limit=0)
    trips = while_trip_counts(text)
    lower_s, compile_s, cpu_s = (min(column) for column in zip(*times, strict=True))
    return {"classes": num_classes, "render": render_size, "bank": bank, "closed": closed,
            "bank_mb": num_classes * render_size * math.ceil(render_size / 8) / 1e6, "lower_s": lower_s,
            "compile_s": compile_s,
            "cpu_s": cpu_s, "rss_start_gb": rss.start / 1e9, "rss_peak_gb": rss.peak / 1e9,
            "max_rss_gb": max_rss / 1e9,
            "largest_constant_mb": max((size for _, size in constants), default=0) / 1e6,
            "whiles": len(trips), "dynamic_whiles": sum(t is None for t in trips)}


def _run_case(num_classes: int, render_size: int, bank: str, closed: bool, repeats: int) -> dict:
    """measure() in a fresh process, so that peak RSS is the case's own."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.compile_cost", "--case",
                          f"{num_classes},{render_size},{bank},{int(closed)},{repeats}"],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"classes": num_classes, "render": render_size, "bank": bank, "closed": closed,
                "error": (out.stderr.strip().splitlines() or ["?"])[-1][:120]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", default="64,1000,21000", help="bank sizes, comma-separated")
    parser.add_argument("--render-size", type=int, default=512)
    parser.add_argument("--closed-up-to", type=int, default=1000,
                        help="also measure the old closed-over bank (`constant`) up to this many classes")
    parser.add_argument("--zeros-up-to", type=int, default=1000,
                        help="also measure a real zeros bank as the argument up to this many classes")
    parser.add_argument("--repeats", type=int, default=3, help="lower + compile this often per case; the fastest")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one case, printed as JSON
    args = parser.parse_args()
    if args.case:
        classes, size, bank, closed, repeats = args.case.split(",")
        print(json.dumps(measure(int(classes), int(size), bank, closed == "1", int(repeats))))
        return

    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs; "
          f"load average {load_average()}")
    print("pre-train step of a 1-block ViT (dim 32) at 32² crops, batch 16, demo augmentation; one process per row\n")
    print("| classes | render | bank | passed as | bank MB | lower s | compile s | CPU s | RSS before GB | "
          "RSS peak GB | ru_maxrss GB | largest constant MB | while loops (dynamic) |\n"
          "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    cases = []
    for classes in (int(c) for c in args.classes.split(",")):
        cases.append((classes, "abstract", False))
        if classes <= args.zeros_up_to:
            cases.append((classes, "zeros", False))
        if classes <= args.closed_up_to:
            cases.append((classes, "random", True))
    rows = []
    for classes, bank, closed in cases:
        row = _run_case(classes, args.render_size, bank, closed, args.repeats)
        rows.append(row)
        passed = "constant" if closed else "argument"
        if "error" in row:
            print(f"| {classes:,} | {args.render_size} | {bank} | {passed} | failed: {row['error']} |", flush=True)
            continue
        print(f"| {classes:,} | {row['render']} | {bank} | {passed} | {row['bank_mb']:,.0f} | {row['lower_s']:.1f} | "
              f"{row['compile_s']:.1f} | {row['cpu_s']:.1f} | {row['rss_start_gb']:.2f} | {row['rss_peak_gb']:.2f} | "
              f"{row['max_rss_gb']:.2f} | {row['largest_constant_mb']:,.1f} | "
              f"{row['whiles']} ({row['dynamic_whiles']}) |", flush=True)
    built = [r for r in rows if r["bank"] == "abstract" and "error" not in r]
    if len(built) > 1:
        total = [r["lower_s"] + r["compile_s"] for r in built]
        cpu = [r["cpu_s"] for r in built]
        print(f"\nbank as an argument, {built[0]['classes']:,}–{built[-1]['classes']:,} classes: lower + compile "
              f"{min(total):.1f}–{max(total):.1f} s (largest / smallest {max(total) / min(total):.2f}), CPU "
              f"{min(cpu):.1f}–{max(cpu):.1f} s ({max(cpu) / min(cpu):.2f})")
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
