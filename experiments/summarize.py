"""python experiments/summarize.py RUN_ROOT [--out DIR]

Hardware: any (reads files). Smoke form: ``python experiments/summarize.py --smoke`` runs a two-point tiny
sweep on CPU first and summarizes it.

Turns the run folders of a sweep into a table and plots, written next to the results (``--out`` defaults to
``RUN_ROOT``): RUN_ROOT may be a Hydra multirun folder (``logs/train/multiruns/<time>``) or the ``--out`` of
an experiments/ script. ``summary.csv``/``.md`` has one row per run (its overrides, then its final metrics);
the plots, made when the runs logged what they need (needs matplotlib: ``pip install zo2_lightning[plots]``):

* ``memory_vs_size.png``: peak working-device memory against model size, one line per offload method;
* ``throughput_vs_size.png``: tokens/s against model size, one line per offload method;
* ``score_per_task.png``: test score (accuracy or F1, %) per task, one bar per run.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from zo2_lightning.reproduce import collect_runs, run_config, write_table

_METRICS = ("params", "perf/run_peak_mem_gb", "perf/run_tokens_per_s", "val/score", "test/score",
            "train/loss_start", "train/loss_end", "status")


def _method(row: dict) -> str:
    return row.get("offload") or "default"


def plot(rows: list[dict], out: Path) -> list[Path]:
    """Write the plots that ``rows`` have data for; returns their paths."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    sized = [r for r in rows if r.get("params") and r.get("perf/run_peak_mem_gb") is not None]
    for key, label, name in (("perf/run_peak_mem_gb", "peak memory (GB)", "memory_vs_size.png"),
                             ("perf/run_tokens_per_s", "tokens / s", "throughput_vs_size.png")):
        lines = defaultdict(list)
        for r in sized:
            if r.get(key) is not None:
                lines[_method(r)].append((float(r["params"]) / 1e9, float(r[key])))
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for method, points in sorted(lines.items()):
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=method)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap on narrow ranges
        ax.set_xlabel("parameters (billions)")
        ax.set_ylabel(label)
        ax.legend(title="offload")
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        written.append(out / name)
    scored = [r for r in rows if r.get("task") and r.get("test/score") is not None]
    if scored:
        fig, ax = plt.subplots(figsize=(max(4, len(scored) * 0.6), 3.5))
        ax.bar(range(len(scored)), [float(r["test/score"]) for r in scored])
        ax.set_xticks(range(len(scored)), [f"{r['task']}\n{Path(r['run']).name}" for r in scored], fontsize=7)
        ax.set_ylabel("test score (%)")
        fig.tight_layout()
        fig.savefig(out / "score_per_task.png", dpi=120)
        plt.close(fig)
        written.append(out / "score_per_task.png")
    return written


def summarize(root: str | Path, out: str | Path | None = None) -> tuple[list[dict], list[Path]]:
    """Collect the runs below ``root``, write ``summary.csv``/``.md`` and plots into ``out``."""
    out = Path(out or root)
    rows = collect_runs(root)
    if not rows:
        raise SystemExit(f"No run folders (with overrides.yaml) below {root}.")
    keys = sorted({k for r in rows for k in r if k not in _METRICS and k != "run" and "/" not in k})
    columns = ["run", *keys, *[m for m in _METRICS if any(m in r for r in rows)]]
    print(write_table(rows, columns, out / "summary.csv"))
    try:
        plots = plot(rows, out)
    except ImportError:
        print("matplotlib is not installed: tables only (pip install zo2_lightning[plots]).")
        plots = []
    for path in plots:
        print(f"wrote {path}")
    return rows, plots


def main(argv: Sequence[str] | None = None) -> tuple[list[dict], list[Path]]:
    """Summarize RUN_ROOT (or, with --smoke, a tiny two-run sweep made on the spot)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", help="folder holding the run folders")
    parser.add_argument("--out", default=None, help="where to write (default: RUN_ROOT)")
    parser.add_argument("--smoke", action="store_true", help="make a two-run tiny sweep on CPU, then summarize it")
    args = parser.parse_args(argv)
    if args.smoke:
        root = Path(args.root or "results/summarize_smoke")
        for offload in ("cpu", "none"):
            run_config([f"offload={offload}", "trainer=debug", "test=true"], root / f"tiny_{offload}")
        return summarize(root, args.out)
    if not args.root:
        parser.error("RUN_ROOT is required (or --smoke)")
    return summarize(args.root, args.out)


if __name__ == "__main__":
    main()
