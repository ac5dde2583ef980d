"""The entry points: the default run trains (loss falls), a 2-job multirun writes two runs, eval reads checkpoints."""

import argparse
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.run_helpers import compose_run
from zo2_lightning.strategy.checkpoint_io import AtomicCheckpointIO, UnsafeCheckpointError
from zo2_lightning.eval import evaluate
from zo2_lightning.train import print_report, read_metric_series, train

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
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trained, _ = evaluate(compose_run(tmp_path / "a", [f"ckpt_path={ckpt}"], "eval"))
    assert not [w for w in caught if "callbacks used to create the checkpoint" in str(w.message)]
    untrained, _ = evaluate(compose_run(tmp_path / "b", [], "eval"))
    assert trained["test/loss"] == pytest.approx(metrics["test/loss"], abs=1e-5)
    assert trained["test/loss"] < untrained["test/loss"] - 0.3


def test_eval_loads_checkpoints_weights_only_unless_told_otherwise(short_default_run, tmp_path):
    cfg, metrics, _ = short_default_run
    checkpoint = torch.load(next((Path(cfg.paths.output_dir) / "checkpoints").glob("*.ckpt")), weights_only=True)
    checkpoint["notes"] = argparse.Namespace(by="someone else")  # only loads by running pickled code
    torch.save(checkpoint, tmp_path / "pickled.ckpt")
    with pytest.raises(UnsafeCheckpointError, match="`weights_only=false`"):
        evaluate(compose_run(tmp_path / "a", [f"ckpt_path={tmp_path / 'pickled.ckpt'}"], "eval"))
    trusted, _ = evaluate(compose_run(tmp_path / "b", [f"ckpt_path={tmp_path / 'pickled.ckpt'}", "weights_only=false"],
                                      "eval"))
    assert trusted["test/loss"] == pytest.approx(metrics["test/loss"], abs=1e-5)


def test_the_test_step_loads_the_best_checkpoint_weights_only(tmp_path, monkeypatch):
    asked = []
    load = AtomicCheckpointIO.load_checkpoint

    def recording(self, path, map_location=None, weights_only=None):
        asked.append(weights_only)
        return load(self, path, weights_only=weights_only)

    monkeypatch.setattr(AtomicCheckpointIO, "load_checkpoint", recording)
    metrics, _ = train(compose_run(tmp_path, ["trainer=debug", "test=true"]))
    assert "test/loss" in metrics and asked and all(w is not False for w in asked)


def test_logger_none_works_with_the_default_callbacks(tmp_path):
    metrics, objects = train(compose_run(tmp_path, ["logger=none", "trainer=debug"]))
    assert objects["loggers"] == [] and objects["trainer"].global_step == 4 and "zo/lr" in metrics


def test_the_final_metrics_are_printed_by_rank_zero_only(capsys, caplog):
    with caplog.at_level(logging.INFO, logger="zo2_lightning.train"):  # logged where Hydra set up logging
        for rank_zero in (True, False):
            print_report({"val/loss": 1.0}, SimpleNamespace(is_global_zero=rank_zero), "out")
    assert (capsys.readouterr().out + caplog.text).count("Final metrics:") == 1


def test_eval_validates_a_task_split(tmp_path):
    metrics, _ = evaluate(compose_run(tmp_path, ["split=val", "trainer=debug"], "eval"))
    assert set(metrics) == {"val/loss"}


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["zo_sgd", "zo_sgd_sign", "zo_sgd_cons", "zo_sgd_mmt", "zo_adam"])
def test_every_optimizer_trains_the_default_model_at_its_preset_lr(optimizer, tmp_path):
    """300 steps, as `python -m zo2_lightning.train optimizer=... trainer.max_steps=300` (zo_sgd_mmt diverged)."""
    metrics, _ = train(compose_run(tmp_path, [f"optimizer={optimizer}", "trainer.max_steps=300", "callbacks=none"]))
    assert metrics["train/loss_end"] < metrics["train/loss_start"] - 0.5


@pytest.mark.slow
def test_the_full_default_run_brings_the_loss_down(tmp_path):
    metrics, _ = train(compose_run(tmp_path))
    assert metrics["train/loss_end"] < metrics["train/loss_start"] - 1.0


@pytest.fixture(scope="module")
def multirun(tmp_path_factory):
    """A real two-job sweep from the command line: the default callbacks (and LearningRateMonitor) and logger,
    a few steps, the progress bar on."""
    tmp = tmp_path_factory.mktemp("multirun")
    cmd = [sys.executable, "-m", "zo2_lightning.train", "-m", "trainer=debug", "trainer.enable_progress_bar=true",
           "callbacks=[default,lr_monitor]", "task.num_val=32", "optimizer.lr=1e-3,3e-3", f"paths.log_dir={tmp}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp)
    assert out.returncode == 0, out.stderr[-3000:]
    sweeps = list((tmp / "train" / "multiruns").iterdir())
    assert len(sweeps) == 1
    return sweeps[0], out


def test_a_two_job_multirun_writes_two_run_directories(multirun):
    sweep, out = multirun
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert runs == ["0", "1"]
    for run in runs:
        assert (sweep / run / "csv" / "metrics.csv").is_file()
        assert (sweep / run / ".hydra" / "overrides.yaml").read_text().count("optimizer.lr=") == 1
    assert out.stdout.count("Final metrics:") == 2 and out.stdout.count("Logs and checkpoints:") == 2


def test_a_run_prints_its_size_and_no_dependency_noise(multirun):
    sweep, out = multirun
    printed = out.stdout + out.stderr
    assert printed.count("Trainable parameters: 348,160 of 348,160 (100%)") == 2
    for noise in ("💡 Tip", "LeafSpec", "/-2", "was configured so 100%"):
        assert noise not in printed, noise
    for run in ("0", "1"):  # the run's log file holds what it printed (it used to be empty)
        text = (sweep / run / "train.log").read_text()
        assert "Trainable parameters:" in text and "Final metrics:" in text


def test_summarize_shows_the_swept_overrides_and_the_outcome_of_a_multirun(multirun, tmp_path):
    import importlib.util

    sweep, _ = multirun
    path = Path(__file__).resolve().parents[1] / "experiments" / "summarize.py"
    spec = importlib.util.spec_from_file_location("summarize", path)
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)
    rows, plots = summarize.summarize(sweep, tmp_path)
    header = (tmp_path / "summary.md").read_text().splitlines()[0]
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[:3] == ["best", "run", "optimizer.lr"]  # the swept override, and only it
    assert {"val/loss", "val/loss (best)", "train/loss_start", "train/loss_end"} <= set(columns)
    assert "lr-ZOSGD" not in columns and "seed" not in columns  # a logged metric is not an override
    best = min(rows, key=lambda r: r["best"]["val/loss"])
    assert [r["is_best"] for r in rows] == [r is best for r in rows]
    if importlib.util.find_spec("matplotlib"):
        assert [p.name for p in plots] == ["val_loss_vs_optimizer.lr.png"]


@pytest.mark.slow
def test_two_ranks_print_the_size_and_the_final_metrics_once(tmp_path):
    cmd = [sys.executable, "-m", "zo2_lightning.train", "trainer=debug", "trainer.devices=2", "task.num_val=32",
           f"paths.log_dir={tmp_path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    printed = out.stdout + out.stderr
    assert printed.count("Final metrics:") == 1 and printed.count("Trainable parameters:") == 1
