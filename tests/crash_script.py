"""``python -m tests.crash_script OUT_DIR``: the fit that tests/test_reliability_crash.py kills with SIGKILL.

The shipped synthetic datamodule, shuffling, 3 batches per epoch; a checkpoint every 2 steps into OUT_DIR, so
checkpoints fall in the middle of epochs as often as at their ends; ``STEP_DELAY_S`` of sleep after every step so
the killer lands somewhere in the middle of the run (during a step, between steps or during a save).
"""

from __future__ import annotations

import sys
import time

from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from tests.lit_helpers import TinyTask, trainer
from zo2_lightning.tasks import SyntheticDataModule

ARCH, LR, WEIGHT_DECAY = "opt", 5e-3, 0.01
STEPS = 16
CHECKPOINT_EVERY = 2
STEP_DELAY_S = 0.15
QUIET = dict(limit_val_batches=0)  # training only


def data() -> SyntheticDataModule:
    """6 sequences of a Markov chain over tokens 5..20 (the tiny models' vocabulary is 64), 2 per batch."""
    return SyntheticDataModule(vocab_size=16, seq_len=8, num_train=6, num_val=2, batch_size=2, seed=5)


class ChainTask(TinyTask):
    """TinyTask on the datamodule's batches (which carry a ``kind`` entry the HF model does not take)."""

    def training_step(self, batch: dict, batch_idx: int):
        return self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss


class _Slow(Callback):
    def on_train_batch_end(self, *args: object) -> None:
        time.sleep(STEP_DELAY_S)


def main(out_dir: str) -> None:
    task = ChainTask(ARCH, lr=LR, weight_decay=WEIGHT_DECAY)  # tiny_models.build is seeded: the parent's init
    ckpt = ModelCheckpoint(dirpath=out_dir, every_n_train_steps=CHECKPOINT_EVERY, save_top_k=-1, filename="{step}")
    trainer(max_steps=STEPS, enable_checkpointing=True, callbacks=[ckpt, _Slow()], **QUIET).fit(task, data())


if __name__ == "__main__":
    main(sys.argv[1])
