"""Experiment grids: the papers' comparisons as reproducible runs at CPU scale, with a table and a chart.

  python -m onepfrac_jax.experiments bootstrap_digits --seeds 3     # ViT alone vs joint vs shared (digits)
  python -m onepfrac_jax.experiments fdsl_digits --seeds 3          # scratch vs 1p-frac Δ=0.1 vs Δ=0.001
  python -m onepfrac_jax.experiments fdsl_families --seeds 2        # scratch vs 1p-frac vs OFDB vs FractalDB
  python -m onepfrac_jax.experiments fdsl_delta --seeds 2           # Δ 0.001–1.0: fine-tunes and linear probes
  python -m onepfrac_jax.experiments fdsl_cifar100 --seeds 1 --set data.data_dir=~/tensorflow_datasets   # one GPU
  python -m onepfrac_jax.experiments bootstrap_digits --out results --arms joint,shared --set num_epochs=48

Every run is one `python -m onepfrac_jax.main` process, one at a time, in OUT/GRID/ARM/seedS (a pre-train that an
arm shares across seeds in OUT/GRID/ARM/pretrain, or in the folder named by its `pretrain_dir` when several arms
share it). A run whose result.json exists is not run again; a run that
was interrupted resumes from its last checkpoint (the same command re-run finds its config.json); a run that
fails stops the grid with the path of its log. When every run is done the grid writes OUT/GRID/results.md (mean ±
std over seeds of the final and the max top-1 of every model, each seed's final, what each arm ran — data, sizes,
steps, read from its runs' config.json and result.json — and the command),
OUT/GRID/results.png (a bar per arm and model, one dot per seed) and OUT/GRID/curves.png (every model's held-out
top-1 over training, one line per arm). A grid whose arms are cells of a table (`fdsl_delta`: a row per pre-train,
a column per read-out) also gets that table in results.md, each cell's final and early top-1 (at `early` of its
run's steps), the paper's figure beside each row, and OUT/GRID/summary.png (a line per column over the rows).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from onepfrac_jax.files import write_file
from onepfrac_jax.rundir import read_run_config


@dataclasses.dataclass(frozen=True)
class Arm:
    """One bar of a grid: a config run per seed (`--config.seed=S`), optionally after one shared pre-train."""

    name: str
    config: str  # configs/X.py:variant
    metrics: tuple[tuple[str, str], ...]  # (model label, result.json metric without _final/_max)
    overrides: tuple[str, ...] = ()
    pretrain: tuple[str, ...] | None = None  # (configs/X.py:variant, overrides...): run once, its dir is init_from
    pretrain_dir: str | None = None  # the pre-train's folder in the grid, for arms that share it (default ARM/pretrain)
    cell: tuple[str, str] | None = None  # (row, column) of the grid's summary table


@dataclasses.dataclass(frozen=True)
class Grid:
    description: str
    arms: tuple[Arm, ...]
    early: float | None = None  # the summary's early point: top-1 at this fraction of each run's steps
    paper: tuple[str, dict[str, float]] | None = None  # (what the paper measured, {row: its top-1}) beside the summary


_BOOT = (("ViT", "val_top1_vit"), ("agent", "val_top1_agent"))
# 24 epochs, not the demos' 16: at 16 the agents' lift of the ViT (+2.5) is within the lone ViT's seed spread (2.6);
# at 24 it is 3× the spread (docs/reproducing.md).
_BOOT_EPOCHS = "--config.num_epochs=24"
_FT = (("ViT", "val_top1"),)
_PRETRAIN = "configs/pretrain.py:demo"
# The demo pre-train sees whole images, so it learns its 64 one-image classes whatever Δ; the paper's random crops
# and mixup/cutmix are what make near-identical classes (Δ = 0.001) indistinguishable. Under them the demo model
# needs a longer pre-train to learn at all (at 300 steps it stays at chance), and a 64² bank (crops of 32² at 32²
# would be mostly upsampled blur).
_PAPER_LIKE = ("--config.augment.crop=rrc", "--config.augment.scale=(0.35,1.0)", "--config.augment.mixup_alpha=0.8",
               "--config.augment.cutmix_alpha=1.0", "--config.render_size=64", "--config.pad=2",
               "--config.num_points=20000", "--config.total_steps=2400", "--config.eval_every_steps=200",
               "--config.checkpoint_every_steps=800")
_FINETUNE = "configs/finetune.py:digits_demo"


def delta_grid(deltas: tuple[float, ...], pretrain: tuple[str, ...], readouts: tuple[tuple[str, str, tuple[str, ...]],
               ...]) -> tuple[Arm, ...]:
    """The Δ sweep's arms: a row per Δ (one pre-train each, `pretrain` + `--config.delta`) and scratch, a column per
    read-out (name, config, overrides); a read-out whose config is a linear probe has no scratch row."""
    arms = [Arm(f"scratch · {column}", config, _FT, overrides, cell=("scratch", column))
            for column, config, overrides in readouts if "linear_probe" not in config]
    for delta in deltas:
        row = f"Δ={delta}"
        arms += [Arm(f"{row} · {column}", config, _FT, overrides, pretrain=(*pretrain, f"--config.delta={delta}"),
                     pretrain_dir=f"pretrain {row}", cell=(row, column)) for column, config, overrides in readouts]
    return tuple(arms)


# Fine-tunes long enough that scratch has levelled off (docs/reproducing.md: digits scratch 92.8 at 24 epochs and at
# 48), with the early point at a quarter of them; linear probes of 100 epochs (the config's).
_DELTA_READOUTS = (("digits fine-tune", _FINETUNE, ("--config.num_epochs=48",)),
                   ("digits probe", "configs/linear_probe.py:digits_demo", ()),
                   ("photos fine-tune", "configs/finetune.py:photos_demo", ("--config.num_epochs=48",)),
                   ("photos probe", "configs/linear_probe.py:photos_demo", ()))
# The paper's Table (ViT-Ti fine-tuned on CIFAR-100 after 1p-frac pre-trains of each Δ; scratch 64.2).
PAPER_DELTA = {"scratch": 64.2, "Δ=0.001": 1.2, "Δ=0.01": 19.9, "Δ=0.05": 83.0, "Δ=0.1": 84.2, "Δ=0.2": 83.4,
               "Δ=1.0": 82.6}

GRIDS = {
    "bootstrap_digits": Grid(
        description="Bootstrapping ViTs on scikit-learn's digits: the ViT alone (the joint config with no KD and "
                    "no hint: the agent trains beside it, untouched), with a separate agent (joint), with an agent "
                    "built from its own attention weights (shared). The demo variants divide the paper's hint weight "
                    "by 10 (joint 1, shared 0.5); the 'paper hint' arms restore it (joint 10, shared 5).",
        arms=(Arm("ViT alone", "configs/bootstrap.py:digits_demo_alone", _BOOT, (_BOOT_EPOCHS,)),
              Arm("joint", "configs/bootstrap.py:digits_demo_joint", _BOOT, (_BOOT_EPOCHS,)),
              Arm("shared", "configs/bootstrap.py:digits_demo_shared", _BOOT, (_BOOT_EPOCHS,)),
              Arm("joint, paper hint", "configs/bootstrap.py:digits_demo_joint", _BOOT,
                  (_BOOT_EPOCHS, "--config.loss.hint=-1")),
              Arm("shared, paper hint", "configs/bootstrap.py:digits_demo_shared", _BOOT,
                  (_BOOT_EPOCHS, "--config.loss.hint=-1"))),
    ),
    "fdsl_digits": Grid(
        description="1p-frac on scikit-learn's digits: the demo ViT fine-tuned from scratch, and after a "
                    "pre-train on 64 classes of one fractal perturbed by Δ = 0.1 (the paper's) or Δ = 0.001 "
                    "(the paper's collapse: 1.2% on CIFAR-100), with the demo's augmentation (whole image, flips, "
                    "jitter; 300 steps) or with the paper's random crops and mixup/cutmix (a 64² bank, 2,400 steps). "
                    "One pre-train per arm, one fine-tune per seed.",
        arms=(Arm("scratch", _FINETUNE, _FT),
              *(Arm(f"1p-frac Δ={delta}", _FINETUNE, _FT, pretrain=(_PRETRAIN, f"--config.delta={delta}"))
                for delta in (0.1, 0.001)),
              *(Arm(f"1p-frac Δ={delta}, crops+mixup", _FINETUNE, _FT,
                    pretrain=(_PRETRAIN, f"--config.delta={delta}", *_PAPER_LIKE)) for delta in (0.1, 0.001))),
    ),
    "fdsl_families": Grid(
        description="The FDSL families on scikit-learn's digits, all rendered on the device by the same engine and "
                    "pre-trained with the same demo recipe: 1p-frac (64 Δ = 0.1 perturbations of one fractal), "
                    "OFDB (64 independent fractals, one image each) and FractalDB (64 searched systems, their "
                    "instances by the per-instance weighting, flips), against scratch. An observation at CPU scale, "
                    "not the paper's claim (ViT-Ti on CIFAR-100: 1p-frac 84.2, OFDB 84.0, FractalDB-1M 81.6).",
        arms=(Arm("scratch", _FINETUNE, _FT),
              *(Arm(label, _FINETUNE, _FT, pretrain=(_PRETRAIN, f"--config.dataset={dataset}"))
                for label, dataset in (("1p-frac", "1p-frac"), ("OFDB", "ofdb"), ("FractalDB", "fractaldb")))),
    ),
    "fdsl_delta": Grid(
        description="1p-frac's Δ sweep at CPU scale: the demo ViT pre-trained by configs/pretrain.py:cpu_paper_aug "
                    "(64 classes rendered at 64², RandomResizedCrop 0.35–1 to 32², mixup/cutmix, 12,000 steps) on "
                    "each Δ, then fine-tuned (48 epochs) and, separately, linear-probed (100 epochs, frozen ViT) on "
                    "scikit-learn's digits and on crops of its two photos (40 regions); scratch fine-tunes beside "
                    "them. One pre-train per Δ, shared by its four read-outs; a fine-tune or probe per seed.",
        arms=delta_grid((0.001, 0.01, 0.05, 0.1, 0.2, 1.0), ("configs/pretrain.py:cpu_paper_aug",), _DELTA_READOUTS),
        early=0.25,
        paper=("paper: ViT-Ti fine-tuned on CIFAR-100", PAPER_DELTA),
    ),
}


# fdsl_cifar100: a tenth of the paper's budget (SPEC §A4: 312,500 pre-train steps of 256) and of the fine-tune
# config's 1,000 epochs (docs/reproducing.md: 1–3 h on one A100, 0.3–1 h on one H100, from gpu_step's FLOPs).
C100_PRETRAIN_STEPS = 31_250
C100_FINETUNE_EPOCHS = 100
_C100 = "CIFAR-100 fine-tune"
GRIDS["fdsl_cifar100"] = Grid(
    description="The paper's table on one GPU, at a tenth of its budget: ViT-Ti (configs/finetune.py:cifar100, "
                f"{C100_FINETUNE_EPOCHS} epochs of CIFAR-100 from TFDS at 224²) from scratch and after pre-trains of "
                f"{C100_PRETRAIN_STEPS:,} steps of 256 by configs/pretrain.py:paper_vit_tiny on 1p-frac Δ = 0.1, "
                "1p-frac Δ = 0.001 (the paper's collapse) and OFDB-1k (paper_vit_tiny_ofdb). Needs CIFAR-100 "
                "prepared in array_record format (`tfds build cifar100 --file_format=array_record`): pass its folder "
                "with --set data.data_dir=DIR.",
    arms=(Arm("scratch", "configs/finetune.py:cifar100", _FT, (f"--config.num_epochs={C100_FINETUNE_EPOCHS}",),
              cell=("scratch", _C100)),
          *(Arm(label, "configs/finetune.py:cifar100", _FT, (f"--config.num_epochs={C100_FINETUNE_EPOCHS}",),
                pretrain=(f"configs/pretrain.py:{variant}", f"--config.total_steps={C100_PRETRAIN_STEPS}",
                          *overrides), cell=(label, _C100))
            for label, variant, overrides in (("1p-frac Δ=0.1", "paper_vit_tiny", ()),
                                              ("1p-frac Δ=0.001", "paper_vit_tiny", ("--config.delta=0.001",)),
                                              ("OFDB", "paper_vit_tiny_ofdb", ())))),
    early=0.25,
    paper=("paper (full budget)", {"scratch": 64.2, "1p-frac Δ=0.1": 84.2, "1p-frac Δ=0.001": 1.2, "OFDB": 84.0}),
)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in name)


def _run(config: str, workdir: Path, overrides: list[str]) -> dict:
    """The run's result.json, running it first unless it finished before (an interrupted one resumes)."""
    result = workdir / "result.json"
    if result.exists():
        print(f"  done before: {workdir}", flush=True)
        return json.loads(result.read_text())
    workdir.parent.mkdir(parents=True, exist_ok=True)
    log = workdir.parent / f"{workdir.name}.log"
    command = [sys.executable, "-m", "onepfrac_jax.main", "--config", config, "--workdir", str(workdir), *overrides]
    print(f"  running: {shlex.join(command[1:])}", flush=True)
    start = time.perf_counter()
    with log.open("a") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0 or not result.exists():
        raise SystemExit(f"error: the run in {workdir} failed (exit {code}); its log: {log}")
    print(f"  finished in {time.perf_counter() - start:.0f} s", flush=True)
    return json.loads(result.read_text())


def run_grid(name: str, seeds: int, out: Path, arms: list[str] | None = None, extra: tuple[str, ...] = (),
             pretrain_extra: tuple[str, ...] = ()) -> dict:
    """Runs (or finds) every run of the grid; writes and returns its table data {arm: {...}}."""
    grid = GRIDS[name]
    chosen = [a for a in grid.arms if arms is None or a.name in arms]
    unknown = set(arms or ()) - {a.name for a in grid.arms}
    if unknown:
        raise SystemExit(f"error: no arm {sorted(unknown)} in {name}; its arms: {[a.name for a in grid.arms]}")
    root = out / name
    table = {}
    for arm in chosen:
        print(f"{name} / {arm.name}", flush=True)
        base = root / _slug(arm.name)
        overrides = [*arm.overrides, *extra]
        pre = None
        if arm.pretrain is not None:
            pre_dir = root / _slug(arm.pretrain_dir) if arm.pretrain_dir else base / "pretrain"
            pre = _run(arm.pretrain[0], pre_dir, [*arm.pretrain[1:], *pretrain_extra])
            overrides.append(f"--config.init_from={pre_dir}")
        results = [_run(arm.config, base / f"seed{s}", [f"--config.seed={s}", *overrides]) for s in range(seeds)]
        table[arm.name] = {
            "runs": [str(base / f"seed{s}") for s in range(seeds)],
            "keys": dict(arm.metrics),
            "pretrain": {k: v for k, v in (pre or {}).items() if "top1" in k},
            "models": {label: {"final": [r[f"{key}_final"] for r in results],
                               "max": [r[f"{key}_max"] for r in results]} for label, key in arm.metrics},
            "steps": results[0]["total_steps"],
            "ran": " — then ".join([*([f"pre-train {describe_run(pre_dir)}"] if pre is not None else []),
                                   describe_run(base / "seed0")]),
            "early": ([early_top1(base / f"seed{s}", arm.metrics[0][1], grid.early * r["total_steps"])
                       for s, r in enumerate(results)]
                      if grid.early is not None and len(arm.metrics) == 1 else None),
            "cell": arm.cell,
            "pretrain_dir": str(pre_dir) if pre is not None else None,
        }
    write_results(name, grid, table, root, seeds, arms, extra, pretrain_extra)
    return table


def describe_run(run_dir: Path) -> str:
    """What a finished run trained, from its own config.json and result.json (so a `--set` shows): 'digits at 32²;
    270 steps of 64 (12 epochs)', '1p-frac Δ=0.1, 64 classes rendered at 64², rrc crops of 0.35–1 of the area to
    32², mixup 0.8 / cutmix 1; 12,000 steps of 64'."""
    c = read_run_config(run_dir)
    steps = json.loads((run_dir / "result.json").read_text())["total_steps"]
    if c.stage == "linear_probe":
        # the frozen ViT sees the data at its own size (its run's eval transform); the data is decoded at this one
        return (f"linear probe on {c.data.name} decoded at {c.data.image_size}²; {c.probe.epochs} epochs of "
                f"{c.probe.batch_size}-feature minibatches ({steps:,} steps)")
    budget = f"{steps:,} steps of {c.batch_size}" + (f" ({c.num_epochs:g} epochs)" if c.total_steps == -1 else "")
    if c.stage != "pretrain":
        fraction = c.data.get("fraction", 1.0)
        part = f" ({fraction:g} of its training split)" if fraction < 1 else ""
        return f"{c.data.name}{part} at {c.image_size}²; {budget}"
    delta = f" Δ={c.delta:g}" if c.dataset == "1p-frac" else ""
    mix = (f", mixup {c.augment.mixup_alpha:g} / cutmix {c.augment.cutmix_alpha:g}"
           if c.augment.mixup_alpha or c.augment.cutmix_alpha else "")
    seen = "resized" if c.augment.crop == "resize" else f"{c.augment.crop} crops"
    if c.augment.crop == "rrc":
        seen += f" of {c.augment.scale[0]:g}–{c.augment.scale[1]:g} of the area"
    extra = "".join([f", {c.augment.auto_augment}" if c.augment.auto_augment else "",
                     f", erasing {c.augment.re_prob:g}" if c.augment.re_prob else ""])
    return (f"{c.dataset}{delta}, {c.num_classes} classes rendered at {c.render_size}², {seen} to {c.image_size}²"
            f"{mix}{extra}; {budget}")


def _mean_std(values: list[float]) -> str:
    v = np.asarray(values)
    std = v.std(ddof=1) if len(v) > 1 else 0.0
    return f"{v.mean():.1f} ± {std:.1f}"


def write_results(name: str, grid: Grid, table: dict, root: Path, seeds: int, arms: list[str] | None,
                  extra: tuple[str, ...], pretrain_extra: tuple[str, ...]) -> None:
    command = ["python", "-m", "onepfrac_jax.experiments", name, "--seeds", str(seeds)]
    if arms is not None:
        command += ["--arms", ",".join(arms)]
    command += [f"--set={o.removeprefix('--config.')}" for o in extra]
    command += [f"--pretrain_set={o.removeprefix('--config.')}" for o in pretrain_extra]
    lines = [f"# {name}", "", grid.description, "", f"Seeds: {seeds}. What ran (each arm's runs' own config.json; "
             f"its seeds differ only in the seed):", "", *(f"- {arm}: {row['ran']}" for arm, row in table.items()), "",
             f"Command: `{shlex.join(command)}`", "",
             "| arm | model | steps | final top-1 (mean ± std) | max top-1 (mean ± std) | final per seed | "
             "pre-train |", "|---|---|---:|---:|---:|---|---|"]
    for arm, row in table.items():
        pre = ", ".join(f"{k} {v:.1f}" for k, v in row["pretrain"].items()) or "—"
        for label, m in row["models"].items():
            per_seed = " ".join(f"{v:.1f}" for v in m["final"])
            lines.append(f"| {arm} | {label} | {row['steps']} | {_mean_std(m['final'])} | {_mean_std(m['max'])} | "
                         f"{per_seed} | {pre} |")
    lines += ["", "Top-1 in %, on each run's held-out split; std over seeds (n − 1)."]
    cells = {row["cell"]: row for row in table.values() if row["cell"] is not None}
    if cells:
        lines += ["", *summary_table(grid, cells)]
    write_file(root / "results.md", "\n".join(lines) + "\n")
    _chart(name, table, root / "results.png")
    _curves(name, table, root / "curves.png")
    written = [root / "results.md", root / "results.png", root / "curves.png"]
    if cells:
        _summary_chart(name, grid, cells, root / "summary.png")
        written.append(root / "summary.png")
    print(f"wrote {', '.join(str(p) for p in written)}")


def early_top1(run_dir: Path, key: str, step: float) -> float:
    """The run's held-out top-1 at its first evaluation at or past `step`."""
    steps, values = eval_curve(run_dir, key)
    return float(values[np.flatnonzero(steps >= step)[0]])


def _finals(row: dict) -> list[float]:
    """The final top-1 of each seed of a summary cell (an arm of one model)."""
    return next(iter(row["models"].values()))["final"]


def _cell_order(cells: dict) -> tuple[list[str], list[str]]:
    rows = list(dict.fromkeys(r for r, _ in cells))
    return rows, list(dict.fromkeys(c for _, c in cells))


def summary_table(grid: Grid, cells: dict) -> list[str]:
    """results.md's summary: a row per pre-train, a column per read-out, 'final (early)' mean ± std in each cell,
    and the paper's figure for the row."""
    rows, columns = _cell_order(cells)
    paper_title, paper = grid.paper or ("", {})
    head = ["", *columns, *([paper_title] if paper else [])]
    lines = ["## Summary", "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        out = []
        for c in columns:
            row = cells.get((r, c))
            if row is None:
                out.append("—")
                continue
            final = _mean_std(_finals(row))
            out.append(final + (f" ({_mean_std(row['early'])})" if row["early"] is not None else ""))
        lines.append("| " + " | ".join([r, *out, *([f"{paper[r]:.1f}" if r in paper else "—"] if paper else [])])
                     + " |")
    early = (f"; in brackets the top-1 at {grid.early:g} of the run's steps (the early point of the same schedule)"
             if grid.early is not None else "")
    return [*lines, "", f"Each cell: final top-1 %, mean ± std over seeds{early}."]


def _summary_chart(name: str, grid: Grid, cells: dict, path: Path) -> None:
    """Left: a line per read-out over the pre-trains (scratch as a dashed line), the paper's figures beside them.
    Right, when the rows have pre-trains: each pre-train's own held-out top-1 (e.g. bank top-1) over its steps."""
    plt = _pyplot()
    rows, columns = _cell_order(cells)
    swept = [r for r in rows if r != "scratch"]
    pretrains = {r: row for (r, _), row in cells.items() if row["pretrain_dir"] is not None}
    fig, axes = plt.subplots(1, 2 if pretrains else 1, figsize=(max(5.0, 1.0 * len(swept) + 2.5) * (1.9 if pretrains
                             else 1.0), 3.8), squeeze=False)
    ax = axes[0][0]
    x = np.arange(len(swept))
    for i, c in enumerate(columns):
        color = f"C{i}"
        points = [(j, np.mean(_finals(cells[(r, c)])))
                  for j, r in enumerate(swept) if (r, c) in cells]
        ax.plot([j for j, _ in points], [v for _, v in points], marker="o", color=color, label=c)
        if ("scratch", c) in cells:
            ax.axhline(np.mean(_finals(cells[("scratch", c)])), color=color,
                       linestyle="--", linewidth=1)
    if grid.paper is not None:
        title, paper = grid.paper
        ax.plot(x, [paper.get(r, np.nan) for r in swept], marker="s", color="black", label=title)
        if "scratch" in paper:
            ax.axhline(paper["scratch"], color="black", linestyle="--", linewidth=1)
    ax.set_xticks(x, swept)
    _top1_axes(ax, "final top-1 (%)")
    ax.set_title(f"{name}: final top-1 by pre-train (dashed: the same read-out from scratch)", fontsize=9)
    if pretrains:
        ax = axes[0][1]
        keys = {r: next(k.removesuffix("_max") for k in row["pretrain"] if k.endswith("_max"))
                for r, row in pretrains.items()}
        for r, row in pretrains.items():
            ax.plot(*eval_curve(Path(row["pretrain_dir"]), keys[r]), marker=".", markersize=3, label=r)
        ax.set_xlabel("pre-train step")
        _top1_axes(ax, f"pre-train {' / '.join(sorted(set(keys.values())))} (%)")
        ax.set_title("each pre-train's own held-out top-1", fontsize=9)
    _save(plt, fig, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _top1_axes(ax, label: str) -> None:
    ax.set_ylabel(label)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    write_file(path, functools.partial(fig.savefig, format="png", dpi=120))
    plt.close(fig)


def _chart(name: str, table: dict, path: Path) -> None:
    """A bar per (arm, model) at the mean final top-1, one dot per seed."""
    plt = _pyplot()
    bars = [(f"{arm}\n{label}" if len(row["models"]) > 1 else arm, m["final"])
            for arm, row in table.items() for label, m in row["models"].items()]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(bars)), 3.6))
    for i, (_, finals) in enumerate(bars):
        values = np.asarray(finals)
        ax.bar(i, values.mean(), color="#9ab", width=0.7)
        ax.scatter(np.full(len(values), i) + np.linspace(-0.15, 0.15, len(values)), values, color="#234", zorder=3,
                   s=14)
    ax.set_xticks(range(len(bars)), [label for label, _ in bars], fontsize=8)
    ax.set_ylabel("final top-1 (%)")
    ax.set_title(name)
    ax.set_ylim(0, 100)
    _save(plt, fig, path)


def eval_curve(run_dir: Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one eval metric from a run's metrics.csv (rows without an eval skipped)."""
    with (run_dir / "metrics.csv").open() as f:
        rows = [(int(r["step"]), float(r[key])) for r in csv.DictReader(f) if r.get(key)]
    return np.array([s for s, _ in rows]), np.array([v for _, v in rows])


def _curves(name: str, table: dict, path: Path) -> None:
    """Each model's held-out top-1 over training, one line per arm (mean over seeds), one panel per model."""
    plt = _pyplot()
    labels = list(dict.fromkeys(label for row in table.values() for label in row["models"]))
    fig, axes = plt.subplots(1, len(labels), figsize=(5.0 * len(labels), 3.6), squeeze=False)
    for ax, label in zip(axes[0], labels, strict=True):
        for arm, row in table.items():
            if label not in row["keys"]:
                continue
            curves = [eval_curve(Path(run), row["keys"][label]) for run in row["runs"]]
            steps = curves[0][0]
            values = np.mean([v for _, v in curves], axis=0)  # the seeds of an arm evaluate at the same steps
            ax.plot(steps, values, label=arm, marker=".", markersize=3)
        ax.set_xlabel("step")
        _top1_axes(ax, f"{label} top-1 (%)")
    fig.suptitle(f"{name}: held-out top-1 during training (mean over seeds)", fontsize=9)
    _save(plt, fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", choices=sorted(GRIDS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--arms", default=None, help="comma-separated arm names (default: all)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run of the grid (not its pre-trains)")
    parser.add_argument("--pretrain_set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for the grid's pre-trains")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds={args.seeds} must be ≥ 1")
    for value in [*args.set, *args.pretrain_set]:
        if "=" not in value:
            parser.error(f"--set/--pretrain_set {value!r} is not KEY=VALUE")
    arms = args.arms.split(",") if args.arms else None
    run_grid(args.grid, args.seeds, args.out, arms, tuple(f"--config.{v}" for v in args.set),
             tuple(f"--config.{v}" for v in args.pretrain_set))


if __name__ == "__main__":
    main()
