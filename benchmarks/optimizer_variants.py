"""CPU: the loss after a fixed number of steps for each ZO optimizer variant, with its extra host memory.

    python benchmarks/optimizer_variants.py                 # 300 steps of the default synthetic task each
    python benchmarks/optimizer_variants.py --steps 50 --no-save

Each variant runs the default ``python -m zo2_lightning.train`` setting (tiny OPT, synthetic task, CPU) with
the same seed and data through ``train(cfg)``; the table gives the training loss at the start and the end
(means of the first and last 5 logged values), the final validation loss, the wall time, and the host memory
each variant keeps beyond MeZO-SGD (none of the variants built so far keeps optimizer state). Appends the table
to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from results import report  # benchmarks/results.py (scripts run from this folder)
from zo2_lightning.config import compose
from zo2_lightning.train import train

VARIANTS = {
    "MeZO-SGD (gaussian)": ["optimizer=zo_sgd"],
    "ZO-SGD, Rademacher z": ["optimizer=zo_sgd", "optimizer.direction=rademacher"],
    "ZO-SGD-Sign": ["optimizer=zo_sgd_sign"],
    "q-SPSA, q=2": ["optimizer=zo_sgd", "optimizer.q=2"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    rows = []
    for name, overrides in VARIANTS.items():
        with tempfile.TemporaryDirectory() as out:
            cfg = compose("train", [*overrides, f"trainer.max_steps={args.steps}", "callbacks=none"], out)
            t0 = time.perf_counter()
            metrics, _ = train(cfg)
            rows.append((name, metrics, time.perf_counter() - t0))
    lines = [
        f"### optimizer_variants ({time.strftime('%Y-%m-%d %H:%M')}, CPU)",
        "",
        f"default train setting (tiny OPT, synthetic task), {args.steps} steps per variant, same seed and data",
        "",
        "| variant | train loss start | train loss end | val loss | wall time (s) | extra host memory |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, m, seconds in rows:
        lines.append(f"| {name} | {m.get('train/loss_start', float('nan')):.3f} |"
                     f" {m.get('train/loss_end', float('nan')):.3f} | {m.get('val/loss', float('nan')):.3f} |"
                     f" {seconds:.1f} | 0 |")
    lines.append("")
    report(lines, save=not args.no_save)


if __name__ == "__main__":
    main()
