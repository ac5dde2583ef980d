"""Running a grid of configurations into folders and collecting what they logged: the machinery of experiments/.

``metrics = run_config(["experiment=mezo_opt13b", "task=rte"], "results/mezo/rte")`` runs one configuration
in-process and records it; ``rows = collect_runs("results/mezo")`` reads every run folder below a root —
these folders or Hydra's own (``logs/train/multiruns/...``) — into flat rows for tables and plots.

A run folder holds ``overrides.yaml`` (the override list; Hydra writes ``.hydra/overrides.yaml``),
``config.yaml`` (the composed config) and ``csv/metrics.csv`` (the CSV logger), plus ``result.json`` here.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from zo2_lightning.config import compose


def run_config(overrides: Sequence[str], out_dir: str | Path, *, config_name: str = "train") -> dict[str, Any]:
    """Compose and run one configuration into ``out_dir``; never raises for a failed run.

    Args:
        overrides: Hydra overrides.
        out_dir: the run folder (created).
        config_name: ``train`` or ``eval``.

    Returns:
        The run's metrics, plus ``status`` (``ok``, ``oom`` or ``error: ...``) and ``params`` (model size).
    """
    from zo2_lightning.eval import evaluate
    from zo2_lightning.train import train

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    cfg = compose(config_name, overrides, output_dir=out)
    OmegaConf.save(cfg, out / "config.yaml")
    result: dict[str, Any]
    try:
        metrics, objects = (train if config_name == "train" else evaluate)(cfg)
        result = {**metrics, "status": "ok", "params": sum(p.numel() for p in objects["model"].parameters())}
    except Exception as err:  # a grid keeps going past one bad point, and the table says why
        oom = "out of memory" in str(err).lower()
        result = {"status": "oom" if oom else f"error: {type(err).__name__}: {err}"}
    (out / "result.json").write_text(json.dumps(result, indent=1, default=float))
    return result


def read_overrides(run: Path) -> dict[str, str]:
    """A run folder's overrides as ``{key: value}`` (``overrides.yaml``, or Hydra's ``.hydra/overrides.yaml``)."""
    for path in (run / "overrides.yaml", run / ".hydra" / "overrides.yaml"):
        if path.is_file():
            pairs = [str(item).lstrip("+~").partition("=") for item in yaml.safe_load(path.read_text()) or []]
            return {key: value for key, _, value in pairs}
    return {}


def higher_is_better(key: str) -> bool:
    """Whether a larger value of metric ``key`` is better (scores, accuracies, throughput) or worse (losses)."""
    return any(word in key.rsplit("/", 1)[-1] for word in ("score", "acc", "f1", "em", "tokens_per_s"))


def read_metrics_csv(metrics_csv: Path, window: int = 5) -> tuple[dict[str, float], dict[str, float]]:
    """``(final, best)`` values of each metric a CSVLogger wrote.

    ``final`` is the last logged value (the largest for ``perf/peak*``), plus ``train/loss_start`` and
    ``train/loss_end``: the means of the first and last ``window`` logged training losses (one ZO step's loss
    is noisy); ``best`` is the lowest loss / highest score over the run.
    """
    series: dict[str, list[float]] = {}
    with metrics_csv.open(newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key not in ("epoch", "step") and value not in (None, ""):
                    series.setdefault(key, []).append(float(value))
    final = {k: (max(v) if k.startswith("perf/peak") else v[-1]) for k, v in series.items()}
    losses = [v for v in series.get("train/loss", []) if math.isfinite(v)]
    if losses:
        n = min(window, len(losses))
        final.update({"train/loss_start": sum(losses[:n]) / n, "train/loss_end": sum(losses[-n:]) / n})
    finite = {k: [x for x in v if math.isfinite(x)] for k, v in series.items()}
    best = {k: (max(v) if higher_is_better(k) else min(v)) for k, v in finite.items() if v}
    return final, best


def _natural(path: Path) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def collect_runs(root: str | Path) -> list[dict[str, Any]]:
    """One flat row per run folder below ``root``: ``run``, its overrides as ``key: value`` columns (and the
    same as a dict under ``overrides``), its final metrics, and ``best``: each metric's best value.

    Final metrics come from ``csv/metrics.csv`` (see :func:`read_metrics_csv`), updated by ``result.json``
    when present (written by :func:`run_config`: status, model size, the run summary).
    """
    rows = []
    for marker in sorted(Path(root).rglob("overrides.yaml"), key=_natural):  # multirun jobs 0, 1, ..., 10
        run = marker.parent.parent if marker.parent.name == ".hydra" else marker.parent
        overrides = read_overrides(run)
        row: dict[str, Any] = {"run": str(run), **overrides, "overrides": overrides, "best": {}}
        for metrics_csv in sorted(run.rglob("metrics.csv")):
            final, best = read_metrics_csv(metrics_csv)
            row.update(final)
            row["best"].update(best)
        if (run / "result.json").is_file():
            row.update(json.loads((run / "result.json").read_text()))
        rows.append(row)
    return rows


def write_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], path: str | Path) -> str:
    """Write ``rows`` as ``path`` (csv) and ``path`` with ``.md`` (markdown); returns the markdown."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    markdown = markdown_table(rows, columns)
    path.with_suffix(".md").write_text(markdown + "\n")
    return markdown


def markdown_table(rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub markdown table of ``columns`` (missing cells blank, floats to 4 significant digits)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
