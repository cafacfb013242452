"""Training-step benchmark: steps/s, images/s and the fraction of step time spent waiting for input.

  python -m benchmarks.train_throughput                 # the CPU demo settings of both stages
  python -m benchmarks.train_throughput --steps 80 --batch 64

Runs the pre-train stage (fractal bank on device, no host input) and the fine-tune stage (digits through the grain
host pipeline) through the real training loop, and reads metrics.csv; the first logging interval (compilation)
is left out.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
from pathlib import Path

from benchmarks.load import load_average


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--interval", type=int, default=10, help="steps per measured interval")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()

    import jax
    from onepfrac_jax.configs import finetune as finetune_configs
    from onepfrac_jax.configs import pretrain as pretrain_configs

    from onepfrac_jax.stages import finetune, pretrain

    cases = [("pre-train (bank on device)", pretrain, pretrain_configs.get_config("demo")),
             ("fine-tune (digits via grain)", finetune, finetune_configs.get_config("digits_demo"))]
    print(f"backend {jax.default_backend()}, {jax.device_count()} device(s); "
          f"demo model (4 blocks, dim 96, 32² input); load average {load_average()}\n")
    print("| stage | batch | steps/s | images/s | input wait |\n|---|---:|---:|---:|---:|")
    for name, stage, config in cases:
        config.update(dict(total_steps=args.steps, batch_size=args.batch, log_every_steps=args.interval,
                           checkpoint_every_steps=10 * args.steps, eval_every_steps=10 * args.steps))
        with tempfile.TemporaryDirectory() as tmp:
            stage.run(config, str(Path(tmp) / "run"))
            with (Path(tmp) / "run" / "metrics.csv").open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if r["images_per_s"]][1:]
        images = statistics.mean(float(r["images_per_s"]) for r in rows)
        wait = statistics.mean(float(r["input_wait"]) for r in rows)
        print(f"| {name} | {args.batch} | {images / args.batch:.2f} | {images:.0f} | {100 * wait:.1f}% |")


if __name__ == "__main__":
    main()
