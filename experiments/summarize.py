"""python experiments/summarize.py RUN_ROOT [--out DIR]

Hardware: any (reads files). Smoke form: ``python experiments/summarize.py --smoke`` runs a two-point tiny
sweep on CPU first and summarizes it.

Turns the run folders of a sweep into a table and plots, written next to the results (``--out`` defaults to
``RUN_ROOT``): RUN_ROOT may be a Hydra multirun folder (``logs/train/multiruns/<time>``) or the ``--out`` of
an experiments/ script. ``summary.csv``/``.md`` has one row per run: the overrides that differ between the
runs (the swept ones; those all runs share are printed above the table), then the outcome: final and best
validation score / loss, training loss at the start and the end (means of 5 logged values), test results and
status where present; the best run (highest best ``val/score``, else lowest best ``val/loss``, else lowest
final training loss) is marked ``*``. The plots, made when the runs logged what they need (needs matplotlib:
``pip install zo2_lightning[plots]``):

* ``<metric>_vs_<key>.png``: that ranking metric over a swept numeric override that is not a seed (one line per
  value of the other swept overrides), e.g. ``val_loss_vs_optimizer.lr.png``;
* ``memory_vs_size.png``: peak working-device memory against model size, one line per offload method;
* ``throughput_vs_size.png``: tokens/s against model size, one line per offload method;
* ``score_per_task.png``: test score (accuracy or F1, %) per task, one bar per run.
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from zo2_lightning.reproduce import collect_runs, higher_is_better, run_config, write_table

# (column, where it comes from: the final value or the run's best), in the order shown; absent ones are left out
_OUTCOME = (("val/score", "final"), ("val/score", "best"), ("val/loss", "final"), ("val/loss", "best"),
            ("train/loss_start", "final"), ("train/loss_end", "final"), ("test/score", "final"),
            ("test/loss", "final"), ("params", "final"), ("perf/run_peak_mem_gb", "final"),
            ("perf/run_tokens_per_s", "final"), ("status", "final"))
_RANKING = (("val/score", "best"), ("val/loss", "best"), ("train/loss_end", "final"))


def _method(row: dict) -> str:
    return row.get("offload") or "default"


def _value(row: dict, key: str, where: str) -> object:
    return row.get("best", {}).get(key) if where == "best" else row.get(key)


def _column(key: str, where: str) -> str:
    return f"{key} (best)" if where == "best" else key


def ranking(rows: list[dict]) -> tuple[str, str, bool] | None:
    """``(metric, final|best, higher_is_better)`` the runs are ranked by: the first of :data:`_RANKING` they have."""
    for key, where in _RANKING:
        if any(isinstance(_value(r, key, where), (int, float)) for r in rows):
            return key, where, higher_is_better(key)
    return None


def swept(rows: list[dict]) -> tuple[list[str], dict[str, str]]:
    """The override keys whose values differ between runs, and the overrides every run shares."""
    keys = sorted({k for r in rows for k in r.get("overrides", {})})
    values = {k: {r.get("overrides", {}).get(k) for r in rows} for k in keys}
    varying = [k for k in keys if len(values[k]) > 1]
    shared = {k: next(iter(values[k])) for k in keys if k not in varying}
    return varying, shared


def table_rows(rows: list[dict], root: Path) -> tuple[list[dict], list[str], int | None]:
    """The rows as shown (run folder relative to ``root``, outcome columns, ``best`` marked), their columns,
    and the index of the best run."""
    keys, _ = swept(rows) if len(rows) > 1 else (sorted({k for r in rows for k in r.get("overrides", {})}), {})
    outcome = [(k, w) for k, w in _OUTCOME if any(_value(r, k, w) is not None for r in rows)]
    rank = ranking(rows)
    best_index = None
    if rank is not None:
        scored = [(i, _value(r, rank[0], rank[1])) for i, r in enumerate(rows)]
        scored = [(i, v) for i, v in scored if isinstance(v, (int, float)) and math.isfinite(v)]
        if scored:
            best_index = (max if rank[2] else min)(scored, key=lambda item: item[1])[0]
    shown = []
    for i, r in enumerate(rows):
        name = Path(r["run"]).relative_to(root).as_posix() if Path(r["run"]).is_relative_to(root) else r["run"]
        row = {"best": "*" if i == best_index else "", "run": name or ".", **{k: r.get("overrides", {}).get(k)
                                                                            for k in keys}}
        row.update({_column(k, w): _value(r, k, w) for k, w in outcome})
        shown.append(row)
    return shown, ["best", "run", *keys, *[_column(k, w) for k, w in outcome]], best_index


def _number(text: object) -> float | None:
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def axes(rows: list[dict], keys: list[str]) -> list[str]:
    """The swept keys worth a plot: numeric, not a seed, and not tied one-to-one to another swept key (the
    shape fields that come with each ``model=``); of keys tied to each other only the first, if all are numeric."""
    def values(key: str) -> list:
        return [r["overrides"].get(key) for r in rows]

    def tied(a: str, b: str) -> bool:
        pairs = set(zip(values(a), values(b)))
        return len(pairs) == len(set(values(a))) == len(set(values(b)))

    chosen, seen = [], set()
    for key in keys:
        if key in seen:
            continue
        group = [k for k in keys if k == key or tied(key, k)]
        seen.update(group)
        numeric = all(_number(v) is not None for k in group for v in values(k))
        if numeric and not key.endswith("seed"):
            chosen.append(key)
    return chosen


def plot_sweep(rows: list[dict], out: Path, plt) -> list[Path]:
    """The ranking metric over each swept numeric override (:func:`axes`), one line per value of the others."""
    rank, (keys, _) = ranking(rows), swept(rows)
    if rank is None:
        return []
    metric, where, _ = rank
    written = []
    for key in axes(rows, keys):
        others = [k for k in keys if k != key]
        lines = defaultdict(list)
        for r in rows:
            y = _value(r, metric, where)
            if isinstance(y, (int, float)) and math.isfinite(y):
                label = ", ".join(f"{k}={r['overrides'].get(k)}" for k in others) or metric
                lines[label].append((_number(r["overrides"][key]), float(y)))
        if not lines:
            continue
        fig, ax = _lines(plt, lines)
        xs = [x for points in lines.values() for x, _ in points]
        if min(xs) > 0 and max(xs) >= 10 * min(xs):
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(_column(metric, where))
        if len(lines) > 1:
            ax.legend(fontsize=7)
        fig.tight_layout()
        name = out / f"{metric.replace('/', '_')}_vs_{key}.png"
        fig.savefig(name, dpi=120)
        plt.close(fig)
        written.append(name)
    return written


def _lines(plt, lines: dict[str, list[tuple[float, float]]]):
    """A figure with one marked line per label, its points sorted by x."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, points in sorted(lines.items()):
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=label)
    return fig, ax


def plot(rows: list[dict], out: Path) -> list[Path]:
    """Write the plots that ``rows`` have data for; returns their paths."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = plot_sweep(rows, out, plt)
    sized = [r for r in rows if r.get("params") and r.get("perf/run_peak_mem_gb") is not None]
    for key, label, name in (("perf/run_peak_mem_gb", "peak memory (GB)", "memory_vs_size.png"),
                             ("perf/run_tokens_per_s", "tokens / s", "throughput_vs_size.png")):
        lines = defaultdict(list)
        for r in sized:
            if r.get(key) is not None:
                lines[_method(r)].append((float(r["params"]) / 1e9, float(r[key])))
        if not lines:
            continue
        fig, ax = _lines(plt, lines)
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
    """Collect the runs below ``root``, write ``summary.csv``/``.md`` and plots into ``out``.

    Returns:
        The rows as collected (:func:`~zo2_lightning.reproduce.collect_runs`, plus ``best``: whether the run is
        the best one), and the plots written.
    """
    root, out = Path(root), Path(out or root)
    rows = collect_runs(root)
    if not rows:
        raise SystemExit(f"No run folders (with overrides.yaml) below {root}.")
    shown, columns, best = table_rows(rows, root)
    keys, shared = swept(rows) if len(rows) > 1 else ([], {})
    print(f"{len(rows)} runs below {root}; swept: {', '.join(keys) or 'nothing'}")
    if shared:
        print("shared by all runs: " + " ".join(f"{k}={v}" for k, v in shared.items()))
    rank = ranking(rows)
    if best is not None and rank is not None:
        what = f"{'highest' if rank[2] else 'lowest'} {_column(rank[0], rank[1])}"
        print(f"best run (*, {what}): {shown[best]['run']} " + " ".join(f"{k}={shown[best][k]}" for k in keys))
    print(write_table(shown, columns, out / "summary.csv"))
    for i, row in enumerate(rows):
        row["is_best"] = i == best
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
