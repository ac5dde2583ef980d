"""Resuming through the entry point: a run killed after a checkpoint and resumed with ``ckpt_path=`` ends bitwise
equal to the run that was never interrupted (parameters and the logged L+ / L-), with the shipped datamodules
shuffling their training data, from a checkpoint in the middle of an epoch and from one at an epoch's end.

Each run: 6 steps per epoch, 10 steps (so every resumed run crosses into the second epoch), validation and a
checkpoint every 3 steps (``step3`` mid-epoch, ``step6`` at the end of epoch 0); the killed run dies as step 7
starts (:class:`tests.run_helpers.StopAtStep`), leaving what a SIGKILL there would leave.
"""

from pathlib import Path

import pytest
import torch

from tests.run_helpers import Interrupt, compose_run
from zo2_lightning.tasks.toy_data import write_toy_task
from zo2_lightning.train import read_metric_series, train

RUN = ["trainer=debug", "trainer.max_steps=10", "trainer.val_check_interval=3", "trainer.limit_val_batches=1",
       "callbacks.model_checkpoint.save_top_k=-1", "callbacks.perf_monitor=null"]
SYNTHETIC = ["task.num_train=24", "task.batch_size=4", "task.seq_len=8"]
KILL = ["+callbacks.stop._target_=tests.run_helpers.StopAtStep", "+callbacks.stop.step=7"]
LOGGED = ("zo/loss_plus", "zo/loss_minus")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny model's steps gain nothing from a second intra-op thread, and on a busy 2-core machine the threads'
    spinning costs several times the work itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(out: Path, overrides: list[str]) -> dict:
    _, objects = train(compose_run(out, overrides))
    run_dir = out / "run"
    return {"params": {n: p.detach().clone() for n, p in objects["module"].named_parameters()},
            "logged": {k: read_metric_series(run_dir / "csv" / "metrics.csv", k) for k in LOGGED},
            "checkpoints": run_dir / "checkpoints"}


def _killed(out: Path, overrides: list[str]) -> Path:
    with pytest.raises(Interrupt):
        train(compose_run(out, overrides + KILL))
    return out / "run" / "checkpoints"


def _assert_resumed_equals(resumed: dict, full: dict, from_step: int) -> None:
    for name, p in full["params"].items():
        assert torch.equal(resumed["params"][name], p), name
    for key in LOGGED:
        after = [(s, v) for s, v in full["logged"][key] if s >= from_step]
        assert after and resumed["logged"][key] == after, key  # the same values at the same steps


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return _run(root / "full", RUN + SYNTHETIC), _killed(root / "killed", RUN + SYNTHETIC), root


def test_the_checkpoint_holds_the_place_in_the_epoch(synthetic):
    _, checkpoints, _ = synthetic
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step3.ckpt", "step6.ckpt"]
    state = torch.load(checkpoints / "step3.ckpt", weights_only=True)["loops"]["fit_loop"]["state_dict"]
    assert state["combined_loader"] == [{"epoch": 0, "consumed": 12, "seed": 42, "num_examples": 24}]


@pytest.mark.parametrize("step", [3, 6], ids=["mid-epoch", "epoch-end"])
def test_a_killed_synthetic_run_resumes_bitwise(synthetic, step, recwarn):
    full, checkpoints, root = synthetic
    resumed = _run(root / f"resumed{step}", RUN + SYNTHETIC + [f"ckpt_path={checkpoints / f'step{step}.ckpt'}"])
    _assert_resumed_equals(resumed, full, from_step=step)
    assert not [w for w in recwarn if "not resumable" in str(w.message)]


def test_a_killed_prompt_task_run_resumes_mid_epoch_bitwise(tmp_path):  # ~3 s: three fits
    data_dir = write_toy_task("sst2", tmp_path / "data", n_train=24, n_valid=8)
    task = ["task=sst2", f"task.data_dir={data_dir}", "task.num_train=12", "task.num_dev=4", "task.num_eval=4",
            "task.batch_size=2", "task.eval_batch_size=4", "task.max_length=128"]  # 6 steps per epoch
    full = _run(tmp_path / "full", RUN + task)
    checkpoints = _killed(tmp_path / "killed", RUN + task)
    resumed = _run(tmp_path / "resumed", RUN + task + [f"ckpt_path={checkpoints / 'step3.ckpt'}"])
    _assert_resumed_equals(resumed, full, from_step=3)
