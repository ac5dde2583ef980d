"""``python -m tests.crash_script OUT_DIR``: the fit that tests/test_reliability_crash.py kills with SIGKILL.

A checkpoint every 2 steps (one epoch of 2 batches) into OUT_DIR, ``STEP_DELAY_S`` of sleep after every step so
the killer lands somewhere in the middle of the run (during a step, between steps or during a save).
"""

from __future__ import annotations

import sys
import time

from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from tests import tiny_models
from tests.lit_helpers import TinyTask, loader, trainer

ARCH, LR, WEIGHT_DECAY = "opt", 5e-3, 0.01
STEPS = 16
CHECKPOINT_EVERY = 2  # = batches per epoch: checkpoints fall on epoch ends, where a plain DataLoader resumes exactly
STEP_DELAY_S = 0.15


def batches() -> list[dict]:
    return tiny_models.batches(ARCH, CHECKPOINT_EVERY)


class _Slow(Callback):
    def on_train_batch_end(self, *args: object) -> None:
        time.sleep(STEP_DELAY_S)


def main(out_dir: str) -> None:
    task = TinyTask(ARCH, lr=LR, weight_decay=WEIGHT_DECAY)  # tiny_models.build is seeded: the parent's init
    ckpt = ModelCheckpoint(dirpath=out_dir, every_n_train_steps=CHECKPOINT_EVERY, save_top_k=-1, filename="{step}")
    trainer(max_steps=STEPS, enable_checkpointing=True, callbacks=[ckpt, _Slow()]).fit(task, loader(batches()))


if __name__ == "__main__":
    main(sys.argv[1])
