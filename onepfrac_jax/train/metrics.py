"""What a run reports: metrics.csv, TensorBoard events, one console line per interval, curves.png at the end."""

from __future__ import annotations

import contextlib
import csv
import functools
import math
import sys
import time
from pathlib import Path

from absl import logging

from onepfrac_jax.files import write_file


def _format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _summary_writer() -> type:
    """tensorboardX's SummaryWriter, imported without the PyTorch it would load when installed (about 1.5 s of a
    process's start): it imports torch only to accept torch tensors, and this writer gives it floats."""
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter
    else:
        sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX expects without torch
        try:
            from tensorboardX import SummaryWriter
        finally:
            del sys.modules["torch"]
    return SummaryWriter


class MetricWriter:
    """Writes only on the main process; every other process gets a writer that does nothing."""

    def __init__(self, workdir: Path, columns: list[str], total_steps: int, enabled: bool, resume: bool):
        self.columns = ["step", *columns]
        self.total_steps = total_steps
        self.enabled = enabled
        self.start_time = time.perf_counter()
        self.start_step: int | None = None
        if not enabled:
            return
        self.csv_path = workdir / "metrics.csv"
        self.plot_path = workdir / "curves.png"
        append = resume and self.csv_path.exists()
        self.csv_file = self.csv_path.open("a" if append else "w", newline="")
        self.csv = csv.DictWriter(self.csv_file, fieldnames=self.columns, extrasaction="ignore")
        if not append:
            self.csv.writeheader()
        self.tensorboard = _summary_writer()(str(workdir / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drops rows past `step` (written after the checkpoint a resumed run starts from)."""
        if not self.enabled:
            return
        self.csv_file.close()
        with self.csv_path.open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
        self.csv_file = self.csv_path.open("w", newline="")
        self.csv = csv.DictWriter(self.csv_file, fieldnames=self.columns, extrasaction="ignore")
        self.csv.writeheader()
        self.csv.writerows(rows)

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.csv is not None:
            try:
                self.csv.writerow({"step": step, **{k: _fmt(v) for k, v in values.items()}})
                self.csv_file.flush()
            except OSError as e:  # a full disk costs the rows, not the run (whose next checkpoint fails, exit 4)
                logging.warning("%s has no rows from step %d on: %s", self.csv_path, step, e.strerror)
                self._close_csv()
        for name, value in values.items():
            if value is not None and math.isfinite(value):
                self.tensorboard.add_scalar(name, value, step)

    def progress(self, step: int, values: dict[str, float]) -> None:
        """The console line: step/total, the losses, lr, images/s and ETA."""
        if self.start_step is None:
            self.start_step, self.start_time = step, time.perf_counter()
            eta = "?"
        else:
            per_step = (time.perf_counter() - self.start_time) / max(step - self.start_step, 1)
            eta = _format_duration(per_step * (self.total_steps - step))
        shown = " ".join(f"{k} {_fmt(v)}" for k, v in values.items())
        logging.info("step %d/%d %s ETA %s", step, self.total_steps, shown, eta)

    def _close_csv(self) -> None:
        with contextlib.suppress(OSError):  # what its buffer still holds is lost on a full disk; the file is closed
            self.csv_file.close()
        self.csv = None

    def close(self) -> None:
        if not self.enabled:
            return
        self._close_csv()
        self.tensorboard.close()
        try:
            plot_curves(self.csv_path, self.plot_path)
        except (OSError, ValueError, KeyError) as e:  # a missing or damaged metrics.csv, or a full disk: no picture
            written = getattr(e, "filename", None) == str(self.plot_path)
            logging.warning("no %s: %s", self.plot_path.name, e.strerror if written else
                            f"{self.csv_path} could not be read ({e})")


def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.6g}"


def plot_curves(csv_path: Path, out: Path) -> None:
    """One panel per metric column (losses, accuracies, lr) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    names = [c for c in rows[0] if c != "step" and c != "images_per_s"]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        points = [(int(r["step"]), float(r[name])) for r in rows if r[name] not in ("", None)]
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="." if len(points) < 30 else None)
        ax.set_title(name)
        ax.set_xlabel("step")
        if name == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    write_file(out, functools.partial(fig.savefig, format="png", dpi=100))
    plt.close(fig)
