"""benchmarks/gpu_offload.py: its --smoke form runs every code path on the CPU, and its arithmetic holds.

The script runs for real only on a GPU machine (``bash benchmarks/gpu_all.sh``), once, with minutes to spare:
these tests are what makes it right the first time.
"""

import importlib
import json
import math
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
GIB = 2**30


@pytest.fixture
def gpu(monkeypatch):
    """The script's modules, imported as the script imports them (benchmarks/ first on the path)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("gpu_offload"), importlib.import_module("gpu_helpers")


def test_smoke_runs_every_mode_and_counts_one_upload_per_block(gpu, tmp_path):
    bench, helpers = gpu
    out = tmp_path / "rows.json"
    result = bench.main(["--smoke", "--no-save", "--sizes", "1.3b", "--out", str(out)])
    rows = result["rows"]
    assert [(r["precision"], r["mode"], r["setting"]) for r in rows] == [
        ("bf16_weights", m, s)
        for m in ["streamed p1", "streamed p1 regen", "streamed p1 min-mem", "in-GPU", "MeZO ref"]
        for s in ("zo2", "mezo")]
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    assert all(r["loss"] == pytest.approx(math.log(helpers.SMOKE_VOCAB), abs=0.05) for r in rows)  # random init
    # 4 blocks of 12*32^2 + 13*32 = 12704 parameters, stored in bf16; 3 device slots, so each block goes up and
    # (updated) comes back once per step
    streamed = [r for r in rows if r["mode"].startswith("streamed p1")]
    assert all(round(r["up_gb_step"] * 1e9) == round(r["down_gb_step"] * 1e9) == 4 * 12704 * 2 for r in streamed)
    assert all(r["link_bound_s"] > 0 for r in streamed)
    assert all(r["link_bound_s"] is None for r in rows if not r["mode"].startswith("streamed"))
    saved = json.loads(out.read_text())
    assert saved["finished"] and saved["rendered"] and len(saved["rows"]) == len(rows)
    assert set(saved["bandwidth"]) >= {"h2d_pinned", "h2d_pageable", "d2h_pinned", "d2h_pageable"}


def test_past_the_time_budget_every_row_is_recorded_as_skipped(gpu, tmp_path):
    bench, _ = gpu
    result = bench.main(["--smoke", "--no-save", "--sizes", "1.3b,2.7b", "--budget-s", "0",
                         "--out", str(tmp_path / "rows.json")])
    assert len(result["rows"]) == 2 * 10  # 2 sizes x 5 modes x 2 settings
    assert all(r["status"].startswith("skipped: time budget") for r in result["rows"])
    lines = bench.main(["--table-from", str(tmp_path / "rows.json"), "--no-save"])["rows"]
    assert len(lines) == 20


def test_a_smoke_run_never_writes_the_results_file(gpu, tmp_path, monkeypatch):
    bench, _ = gpu
    results = importlib.import_module("results")
    monkeypatch.setattr(results, "RESULTS", tmp_path / "RESULTS.md")  # where report() appends
    (tmp_path / "RESULTS.md").write_text("# Benchmark results\n")
    out = tmp_path / "rows.json"
    bench.main(["--smoke", "--sizes", "1.3b", "--budget-s", "0", "--out", str(out)])  # no --no-save
    bench.main(["--table-from", str(out)])  # a smoke run's saved rows, rendered again
    assert (tmp_path / "RESULTS.md").read_text() == "# Benchmark results\n"


def test_published_shapes_and_host_bytes(gpu, monkeypatch):
    _, h = gpu
    from zo2_lightning.engine import discover_blocks

    model = h.meta_model(h.opt_config("13b"), torch.bfloat16)
    per_block, rest = h.block_numels(model, discover_blocks(model))
    assert per_block == [12 * 5120**2 + 13 * 5120] * 40  # q k v out + fc1 fc2 (ffn 4h), biases, 2 layer norms
    assert rest == 50272 * 5120 + 2050 * 5120 + 2 * 5120  # tied embeddings, positions (offset 2), final norm
    assert sum(per_block) + rest == 12_853_473_280  # OPT-13B's 12.85B
    # 629 MB of bf16 per block: pinned at exactly that size by the engine, but torch's pinned allocator
    # (ZO2_PINNED=torch) hands out 1 GiB for each
    assert h.host_bytes_needed(per_block, 2, pinned=False) == 40 * 629_278_720
    assert h.host_bytes_needed(per_block, 2, pinned=True) == 40 * 629_278_720
    monkeypatch.setenv("ZO2_PINNED", "torch")
    assert h.host_bytes_needed(per_block, 2, pinned=True) == 40 * GIB


def test_arithmetic_by_hand(gpu):
    _, h = gpu
    assert [h.pow2ceil(n) for n in (0, 1, 5, 1024, 1025)] == [1, 1, 8, 1024, 2048]
    assert h.fits_in_host(96 * GIB, 123 * GIB)  # 30B pinned: reserve max(8, 12.3) GiB leaves 110.7
    assert not h.fits_in_host(128 * GIB, 123 * GIB)  # 66B
    assert not h.fits_in_host(10 * GIB, 17 * GIB)  # 8 GiB reserve at least
    assert h.fits_in_host(10**15, None)  # unknown: try
    bw = {"h2d_pinned": 50.0, "d2h_pinned": 40.0, "bidir_pinned": 60.0}
    assert h.link_bound_s(26e9, 26e9, bw) == pytest.approx(52 / 60)  # both ways at once is the limit
    assert h.link_bound_s(26e9, 26e9, {"h2d_pinned": 50.0, "d2h_pinned": 40.0}) == pytest.approx(0.65)
    assert h.link_bound_s(26e9, 0, bw) == pytest.approx(0.52)
    prec = h.PRECISIONS
    # blocks 1000 params (largest 100), resident 50: weights + 3 x (largest + resident) scratch
    assert h.device_bytes_needed(1000, 100, 50, prec["bf16_weights"], margin=0) == 2000 + 100 + 900
    # fp32 working, bf16 storage: blocks in bf16 + 3 fp32 slots of the largest, fp32 resident and scratch
    assert h.device_bytes_needed(1000, 100, 50, prec["bf16_storage"], margin=7) == 2000 + 1200 + 200 + 1800 + 7


def test_table_judges_the_targets(gpu):
    importlib.import_module("gpu_offload")
    table = importlib.import_module("gpu_table")

    def row(mode, tokens, step, link=None, peak=None):
        return dict(size="1.3b", precision="bf16_weights", mode=mode, setting="zo2", status="ok", peak_gb=peak,
                    step_s=step, tokens_per_s=tokens, link_bound_s=link, up_gb_step=1.0 if link else None,
                    down_gb_step=1.0 if link else None)

    rows = [row("streamed p1", 950.0, 1.0, link=0.9, peak=3.0), row("in-GPU", 1000.0, 0.5)]
    d = table.derived(rows[0], rows)
    assert d["zo2"] == pytest.approx(3.0 / 3.75) and d["in_gpu"] == pytest.approx(0.95)
    assert d["link"] == pytest.approx(0.9) and d["transfer_bound"]
    lines = table.targets(rows)
    assert lines[-2] == "| 1.3b | bf16_weights | streamed p1 | zo2 | pass (0.80x) | pass (0.95x) | pass (0.90x) |"
    rows[0].update(peak_gb=3.1, tokens_per_s=900.0, link_bound_s=0.4)
    assert table.targets(rows)[-2].endswith("| FAIL (0.83x) | FAIL (0.90x) | compute-bound (0.40x) |")


def test_the_gpu_script_and_gpu_tests_need_no_hydra():
    """The GPU machine's image has torch, transformers and lightning but neither hydra nor omegaconf: the
    benchmark and the GPU tests must import without them (the one device run cannot afford an ImportError)."""
    import os
    import subprocess
    import sys

    root = BENCHMARKS.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).with_name("without_hydra")), str(root)]))
    probe = "import importlib.util as u; assert u.find_spec('omegaconf') is None; import gpu_offload, gpu_steps"
    done = subprocess.run([sys.executable, "-c", probe], cwd=BENCHMARKS, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    collect = [sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", "-p",
               "no:hydra_pytest", "tests/test_gpu.py", "tests/engine/test_pinned.py"]
    done = subprocess.run(collect, cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
