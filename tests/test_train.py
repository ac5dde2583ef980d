"""The entry points: the default run trains (loss falls), a 2-job multirun writes two runs, eval reads checkpoints."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.run_helpers import compose_run
from zo2_lightning.eval import evaluate
from zo2_lightning.train import read_metric_series, train

SHORT = ["trainer.max_steps=150", "trainer.val_check_interval=75", "test=true"]


@pytest.fixture(scope="module")
def short_default_run(tmp_path_factory):
    """The default configuration, cut to 150 steps (the full 1000-step run is the slow test below)."""
    tmp = tmp_path_factory.mktemp("default")
    cfg = compose_run(tmp, SHORT)
    metrics, objects = train(cfg)
    return cfg, metrics, objects


def test_default_configuration_trains_and_its_loss_falls(short_default_run):
    cfg, metrics, objects = short_default_run
    assert objects["trainer"].global_step == 150
    assert metrics["train/loss_end"] < metrics["train/loss_start"] - 0.3
    run_dir = Path(cfg.paths.output_dir)
    series = read_metric_series(run_dir / "csv" / "metrics.csv", "zo/loss_plus")  # logged by the strategy
    assert len(series) == 15 and series[-1][0] == 149
    assert {"zo/loss_minus", "zo/projected_grad", "zo/lr", "val/loss", "perf/run_tokens_per_s"} <= set(metrics)
    assert list((run_dir / "checkpoints").glob("*.ckpt"))


def test_eval_of_the_checkpoint_reproduces_the_runs_test_score(short_default_run, tmp_path):
    cfg, metrics, _ = short_default_run
    ckpt = next((Path(cfg.paths.output_dir) / "checkpoints").glob("*.ckpt"))
    trained, _ = evaluate(compose_run(tmp_path / "a", [f"ckpt_path={ckpt}"], "eval"))
    untrained, _ = evaluate(compose_run(tmp_path / "b", [], "eval"))
    assert trained["test/loss"] == pytest.approx(metrics["test/loss"], abs=1e-5)
    assert trained["test/loss"] < untrained["test/loss"] - 0.3


def test_eval_validates_a_task_split(tmp_path):
    metrics, _ = evaluate(compose_run(tmp_path, ["split=val", "trainer=debug"], "eval"))
    assert set(metrics) == {"val/loss"}


@pytest.mark.slow
def test_the_full_default_run_brings_the_loss_down(tmp_path):
    metrics, _ = train(compose_run(tmp_path))
    assert metrics["train/loss_end"] < metrics["train/loss_start"] - 1.0


def test_a_two_job_multirun_writes_two_run_directories(tmp_path):
    cmd = [sys.executable, "-m", "zo2_lightning.train", "-m", "trainer=debug", "callbacks=none", "seed=1,2",
           f"paths.log_dir={tmp_path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    sweeps = list((tmp_path / "train" / "multiruns").iterdir())
    assert len(sweeps) == 1
    runs = sorted(p.name for p in sweeps[0].iterdir() if p.is_dir() and not p.name.startswith("."))
    assert runs == ["0", "1"]
    for run in runs:
        assert (sweeps[0] / run / "csv" / "metrics.csv").is_file()
        assert (sweeps[0] / run / ".hydra" / "overrides.yaml").read_text().count("seed=") == 1
    assert out.stdout.count("Final metrics:") == 2 and out.stdout.count("Logs and checkpoints:") == 2
