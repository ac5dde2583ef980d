"""The built-in datamodules on two ranks (CPU, gloo, forked): each rank takes its own shard of every epoch's order,
Lightning keeps that sampler, and a 2-rank fit resumed from a mid-epoch checkpoint sees what the uninterrupted
fit saw and ends with the same weights."""

import json
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tests import dist_helpers as dh
from zo2_lightning.tasks import SyntheticDataModule
from zo2_lightning.tasks.order import ResumableLoader

EXAMPLES, PER_RANK_BATCH, STEPS = 12, 2, 5  # 3 steps per epoch on 2 ranks: the fits cross into the second epoch


class SeenRows(L.Callback):
    """Every rank writes ``seen{rank}.json``: per step, the epoch and the rows of its batch."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir, self.seen = Path(out_dir), []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        assert isinstance(trainer.train_dataloader, ResumableLoader)  # not replaced by Lightning's sampler
        self.seen.append([trainer.current_epoch, batch["input_ids"].tolist()])

    def teardown(self, trainer, pl_module, stage) -> None:
        (self.out_dir / f"seen{trainer.global_rank}.json").write_text(json.dumps(self.seen))


def _data() -> SyntheticDataModule:
    return SyntheticDataModule(vocab_size=16, seq_len=8, num_train=EXAMPLES, num_val=2, batch_size=PER_RANK_BATCH,
                               seed=3)


def _fit(out_dir: Path, max_steps: int, **kwargs) -> tuple[list, list]:
    out_dir.mkdir(parents=True)
    ranks = dh.fit_ranks(out_dir, dh.task(), _data(), max_steps=max_steps,
                         callbacks=[SeenRows(out_dir), *kwargs.pop("callbacks", [])], **kwargs)
    seen = [json.loads((out_dir / f"seen{r}.json").read_text()) for r in range(2)]
    return [r["params"] for r in ranks], seen


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return _fit(tmp_path_factory.mktemp("order") / "full", STEPS)


def test_each_rank_takes_its_own_shard_of_every_epoch(uninterrupted):
    _, seen = uninterrupted
    data = _data()
    data.setup()
    every_row = sorted(tuple(r) for r in data.sets["train"].tensors[0].tolist())
    shards = [[tuple(row) for epoch, rows in steps if epoch == 0 for row in rows] for steps in seen]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == every_row
    first_of_epoch1 = [[rows for epoch, rows in steps if epoch == 1][0] for steps in seen]
    assert first_of_epoch1 != [steps[0][1] for steps in seen]  # a new order in the next epoch


def test_two_ranks_resumed_mid_epoch_see_and_end_as_the_uninterrupted_fit(uninterrupted, tmp_path):
    params, seen = uninterrupted
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    _fit(tmp_path / "first", 2, enable_checkpointing=True, callbacks=[ckpt])
    resumed_params, resumed_seen = _fit(tmp_path / "resumed", STEPS, ckpt_path=tmp_path / "ckpt" / "step=2.ckpt")
    for r in range(2):
        assert resumed_seen[r] == seen[r][2:], f"rank {r}"
        for name, p in params[r].items():
            assert torch.equal(resumed_params[r][name], p), f"rank {r} {name}"
