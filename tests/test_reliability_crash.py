"""A fit killed with SIGKILL at an arbitrary moment, resumed from its last checkpoint, ends bitwise equal to a fit
that was never interrupted; every checkpoint file left behind is whole. The data are the shipped synthetic
datamodule's, shuffled, and the checkpoints fall mid-epoch as often as at epoch ends."""

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests import crash_script, tiny_models
from tests.lit_helpers import assert_params_equal, clone_model, trainer

REPO = Path(__file__).resolve().parents[1]


def _steps_saved(out_dir: Path) -> list[int]:
    return sorted(int(m.group(1)) for f in os.listdir(out_dir) if (m := re.fullmatch(r"step=(\d+)\.ckpt", f)))


def _run_and_kill(out_dir: Path, after_step: int, rng: random.Random) -> int:
    """Start the fit in a subprocess, SIGKILL it at a random moment after checkpoint ``after_step`` exists."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.crash_script", str(out_dir)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not any(s >= after_step for s in _steps_saved(out_dir)):
        assert proc.poll() is None, f"the fit ended before it could be killed:\n{proc.stderr.read().decode()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 4 * crash_script.STEP_DELAY_S))  # somewhere in the next few steps or saves
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    return proc.returncode


@pytest.mark.slow  # ~20 s: a fresh interpreter importing lightning and transformers, then two fits
@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_fit(tmp_path, seed):
    rng = random.Random(seed)
    code = _run_and_kill(tmp_path, after_step=4, rng=rng)
    assert code == -signal.SIGKILL, f"exit code {code}: the fit was not killed mid-run"
    saved = _steps_saved(tmp_path)
    assert saved and saved[-1] < crash_script.STEPS, saved
    for step in saved:  # a kill during a save leaves whole files (at worst a stray hidden .tmp)
        assert torch.load(tmp_path / f"step={step}.ckpt", weights_only=True)["global_step"] == step

    task = crash_script.ChainTask
    uninterrupted = task(crash_script.ARCH, lr=crash_script.LR, weight_decay=crash_script.WEIGHT_DECAY)
    initial = clone_model(uninterrupted)
    trainer(max_steps=crash_script.STEPS, **crash_script.QUIET).fit(uninterrupted, crash_script.data())

    resumed = task(crash_script.ARCH, lr=crash_script.LR, weight_decay=crash_script.WEIGHT_DECAY,
                   model=tiny_models.build(crash_script.ARCH, seed=7)[0])  # another init: the checkpoint wins
    trainer(max_steps=crash_script.STEPS, seed=999, **crash_script.QUIET).fit(
        resumed, crash_script.data(), ckpt_path=tmp_path / f"step={saved[-1]}.ckpt")
    assert_params_equal(resumed.model, uninterrupted.model, initial)
