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


def _read_overrides(run: Path) -> list[str]:
    for path in (run / "overrides.yaml", run / ".hydra" / "overrides.yaml"):
        if path.is_file():
            return list(yaml.safe_load(path.read_text()) or [])
    return []


def _last_values(metrics_csv: Path) -> dict[str, float]:
    last: dict[str, float] = {}
    peak: dict[str, float] = {}
    with metrics_csv.open(newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key in ("epoch", "step") or value in (None, ""):
                    continue
                last[key] = float(value)
                if key.startswith("perf/peak"):
                    peak[key] = max(peak.get(key, -math.inf), float(value))
    return {**last, **peak}


def collect_runs(root: str | Path) -> list[dict[str, Any]]:
    """One flat row per run folder below ``root``: its overrides as ``key=value`` columns, then metrics.

    A run's metrics are ``result.json`` when present (written by :func:`run_config`), else the last logged
    value of each metric in ``csv/metrics.csv`` (the maximum for ``perf/peak*``).
    """
    rows = []
    for marker in sorted(Path(root).rglob("overrides.yaml")):
        run = marker.parent.parent if marker.parent.name == ".hydra" else marker.parent
        row: dict[str, Any] = {"run": str(run)}
        for item in _read_overrides(run):
            key, _, value = item.lstrip("+~").partition("=")
            row[key] = value
        if (run / "result.json").is_file():
            row.update(json.loads((run / "result.json").read_text()))
        else:
            for metrics_csv in run.rglob("metrics.csv"):
                row.update(_last_values(metrics_csv))
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
