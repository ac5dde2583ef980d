"""micro_batches: the chunks of a batch share one residency of each block, and the step is accumulation's."""

from collections import namedtuple

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from tests import reference, tiny_models
from tests.lit_helpers import SEED, TinyTask, assert_params_equal, clone_model, loader, trainer, zo_strategy
from zo2_lightning import ZOSGD, ZOSGDCons
from zo2_lightning.strategy.batches import split_batch

EPS = 1e-3


def test_split_batch_splits_batch_sized_tensors_and_hands_the_rest_to_every_part():
    Pair = namedtuple("Pair", "x y")
    batch = {"ids": torch.arange(8).reshape(4, 2), "scale": torch.tensor(2.0), "name": "b",
             "pair": Pair(torch.arange(4), [torch.ones(4, 3)]), "other": torch.zeros(3)}
    parts = split_batch(batch, 2)
    assert [p["ids"].tolist() for p in parts] == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    assert all(p["scale"] is batch["scale"] and p["name"] == "b" and p["other"] is batch["other"] for p in parts)
    assert isinstance(parts[1]["pair"], Pair) and parts[1]["pair"].x.tolist() == [2, 3]
    assert parts[0]["pair"].y[0].shape == (2, 3)


def test_split_batch_refuses_a_size_it_cannot_divide_and_a_batch_without_tensors():
    with pytest.raises(ValueError, match="multiple of it"):
        split_batch({"ids": torch.zeros(3, 2)}, 2)
    with pytest.raises(ValueError, match="batch of tensors"):
        split_batch(["text"], 2)


class UploadCounter(Callback):
    def __init__(self):
        self.per_step = []

    def on_train_batch_end(self, trainer, *args):
        self.per_step.append(trainer.strategy.engine.streamer.bytes_uploaded)


def _fit(task, batches, micro_batches=1, **kwargs):
    counter = UploadCounter()
    strategy = zo_strategy(micro_batches=micro_batches, prefetch=0)  # 2 slots < 3 blocks
    trainer(strategy=strategy, callbacks=[counter], **kwargs).fit(task, loader(batches))
    return counter.per_step


def _halves(batches):
    return [part for b in batches for part in split_batch(b, 2)]


@pytest.mark.parametrize("optimizer,q", [(ZOSGD, 1), (ZOSGD, 2), (ZOSGDCons, 1)], ids=["mezo", "q2", "cons"])
def test_micro_batches_equal_accumulation_over_the_same_chunks_with_one_upload_per_step(optimizer, q):
    batches = tiny_models.batches("llama", 3, batch_size=4)

    def task(model=None):
        return TinyTask("llama", lr=5e-3, eps=EPS, optimizer=optimizer, model=model, q=q)

    split = task()
    expected, initial = clone_model(split), clone_model(split)
    uploads = _fit(split, batches, micro_batches=2, max_steps=3)
    choices: list[int] = []
    reference.mezo_reference(expected, _halves(batches), tiny_models.loss, seed=SEED, eps=EPS, lr=5e-3,
                             micro_batches=2, q=q, conservative=optimizer is ZOSGDCons, choices=choices)
    assert_params_equal(split.model, expected, initial)
    if optimizer is ZOSGD and q == 1:  # the same chunks through accumulate_grad_batches: twice the uploads
        accumulated = task(model=clone_model(TinyTask(model=initial)))
        acc_uploads = _fit(accumulated, _halves(batches), accumulate_grad_batches=2, max_steps=3)
        assert_params_equal(accumulated.model, expected)
        # per optimizer step (the callback fires per loader batch: every half with accumulation)
        assert acc_uploads[3] - acc_uploads[1] == 2 * (uploads[2] - uploads[1]) > 0


def test_micro_batches_with_a_batch_it_cannot_divide_is_refused():
    with pytest.raises(ValueError, match="micro_batches=2 does not divide the batch size 3"):
        _fit(TinyTask("opt"), tiny_models.batches("opt", 1, batch_size=3), micro_batches=2, max_steps=1)
