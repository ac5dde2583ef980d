"""Every script in experiments/ runs in its --smoke form (tiny models, toy data, CPU)."""

import importlib.util
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def _script(name):
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_script_starts_with_its_command_and_hardware():
    for path in EXPERIMENTS.glob("*.py"):
        doc = _script(path.stem).__doc__
        assert doc.startswith(f"python experiments/{path.name}"), path
        assert "Hardware:" in doc and "--smoke" in doc, path


@pytest.fixture(scope="module")
def memory_smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("zo2_memory")
    return out, _script("zo2_memory").main(["--smoke", "--out", str(out)])


def test_zo2_memory_table_smoke(memory_smoke):
    out, rows = memory_smoke
    assert [(r["model"], r["method"]) for r in rows] == [
        ("opt-1.3b", "zo2"), ("opt-1.3b", "mezo"), ("opt-2.7b", "zo2"), ("opt-2.7b", "mezo")]
    assert all(r["status"] == "ok" and r["peak_mem_gb"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert rows[2]["params_b"] > rows[0]["params_b"]  # sizes stay ordered in the shrunk shapes
    assert (out / "zo2_memory.md").read_text().startswith("| model | method |")


def test_mezo_opt13b_table_smoke(tmp_path):
    rows = _script("mezo_opt13b").main(["--smoke", "--tasks", "sst2,squad", "--out", str(tmp_path)])
    assert [r["task"] for r in rows] == ["sst2", "squad"] and all(r["status"] == "ok" for r in rows)
    assert all(0 <= r["test"] <= 100 for r in rows) and rows[0]["paper"] == 91.4


@pytest.mark.slow
def test_mezo_opt13b_table_smoke_all_tasks(tmp_path):
    rows = _script("mezo_opt13b").main(["--smoke", "--out", str(tmp_path)])
    assert len(rows) == 11 and all(r["status"] == "ok" for r in rows)


def test_mezo_roberta_large_smoke(tmp_path):
    rows = _script("mezo_roberta_large").main(["--smoke", "--tasks", "rte_mlm", "--out", str(tmp_path)])
    assert rows and all(r["runs_ok"] == r["runs"] == 1 for r in rows)
    assert all(0 <= r["test_mean"] <= 100 for r in rows)


def test_summarize_makes_tables_and_plots_from_an_experiments_runs(memory_smoke):
    out, _ = memory_smoke
    rows, plots = _script("summarize").main([str(out / "runs"), "--out", str(out / "summary")])
    assert len(rows) == 4 and (out / "summary" / "summary.md").is_file()
    if importlib.util.find_spec("matplotlib"):
        assert sorted(p.name for p in plots) == ["memory_vs_size.png", "throughput_vs_size.png"]
        assert all(p.stat().st_size > 1000 for p in plots)


@pytest.mark.slow
def test_summarize_smoke(tmp_path):
    rows, _ = _script("summarize").main(["--smoke", str(tmp_path / "sweep")])
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows) and all("test/loss" in r for r in rows)
