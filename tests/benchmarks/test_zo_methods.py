"""benchmarks/zo_methods.py: its in-process row function trains a method on each task within the budget and counts
what the table shows (forwards per step, state bytes per trainable parameter)."""

import importlib
import math
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
FIELDS = {"method", "task", "seed", "lr", "steps", "forwards_per_step", "train_loss", "metric", "step_time_s",
          "state_bytes", "trainable_params"}


@pytest.fixture
def zo_methods(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the script runs them: a tiny model's second thread only waits on a busy machine
    yield importlib.import_module("zo_methods")
    torch.set_num_threads(threads)


def test_zo_methods_rows_of_two_methods_within_a_tiny_budget(zo_methods, tmp_path):
    synthetic = zo_methods.run_row("MeZO-SGD", "synthetic", 42, budget=12, extra=["task.num_val=16"])
    data_dir = zo_methods.write_sentiment(tmp_path / "sst2", num_train=24, num_valid=8)
    sst2 = zo_methods.run_row("HiZOO", "sst2", 42, budget=12, data_dir=data_dir,
                              extra=["task.num_train=16", "task.num_dev=8", "task.num_eval=8", "task.batch_size=4"])
    for row in (synthetic, sst2):
        assert FIELDS <= set(row) and "error" not in row
        assert row["steps"] == 12 // zo_methods.FORWARDS[row["method"]]
        assert row["forwards_per_step"] == zo_methods.FORWARDS[row["method"]]  # counted, not assumed
        assert math.isfinite(row["train_loss"]) and row["step_time_s"] > 0 and row["trainable_params"] > 0
    assert synthetic["metric"] > 0 and synthetic["state_bytes"] == 0  # val loss; MeZO keeps no state
    assert 0.0 <= sst2["metric"] <= 1.0  # val accuracy
    assert sst2["state_bytes"] == 4 * sst2["trainable_params"]  # HiZOO: one fp32 Hessian value per parameter


def test_zo_methods_budget_divides_by_forwards_and_the_table_has_every_column(zo_methods):
    assert zo_methods.steps_for("MeZO-SGD", 600) == 300 and zo_methods.steps_for("FZOO", 600) == 66
    assert set(zo_methods.FORWARDS) == set(zo_methods.METHODS)
    rows = [{"method": m, "task": "synthetic", "seed": 42, "lr": 1e-3, "steps": 3, "forwards_per_step": f,
             "train_loss": 5.0, "metric": 5.1, "step_time_s": 0.01 * f, "state_bytes": 8, "trainable_params": 4}
            for m, f in (("MeZO-SGD", 2), ("FZOO", 9))]
    rows.append({"method": "LOZO", "task": "synthetic", "seed": 42, "lr": 1e-3, "steps": 3,
                 "error": "FloatingPointError"})
    lines = zo_methods.table("synthetic", rows, budget=6, seeds=[42])
    header, body = lines[2], [ln for ln in lines[4:] if ln]
    assert [ln.split(" | ")[0] for ln in body] == ["| MeZO-SGD", "| LOZO", "| FZOO"]  # METHODS order
    assert all(ln.count("|") == header.count("|") for ln in body)
    assert body[1].endswith("| 1/1 (FloatingPointError) |")
    assert "| 4.50 | 1.00 | 2.00 | 0/1 |" in body[2]  # FZOO: 4.5x the step time, the same per forward
