"""Checkpoints, resume, validate/predict streaming, and the module handed back after each Trainer call."""

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tests import reference, tiny_models
from tests.lit_helpers import SEED, TinyTask, assert_params_equal, clone_model, loader, trainer

EPS = 1e-3


def test_fit_2_checkpoint_resume_2_equals_fit_4_bitwise(tmp_path):
    batches = tiny_models.batches("llama", 2)  # one epoch = 2 steps; 4 steps = 2 epochs

    uninterrupted = TinyTask("llama", lr=5e-3, weight_decay=0.01)
    initial = clone_model(uninterrupted)
    trainer(max_steps=4).fit(uninterrupted, loader(batches))

    first = TinyTask("llama", lr=5e-3, weight_decay=0.01, model=clone_model(TinyTask(model=initial)))
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer(max_steps=3, enable_checkpointing=True, callbacks=[ckpt]).fit(first, loader(batches))
    path = tmp_path / "step=2.ckpt"
    assert path.exists()

    resumed = TinyTask("llama", lr=5e-3, weight_decay=0.01)  # fresh random init: the checkpoint must win
    trainer(max_steps=4, seed=999).fit(resumed, loader(batches), ckpt_path=path)  # the checkpoint's seed wins too
    assert_params_equal(resumed.model, uninterrupted.model, initial)


def test_checkpoint_holds_flushed_weights(tmp_path):
    batches = tiny_models.batches("gpt2", 2)
    task = TinyTask("gpt2", lr=5e-3)
    expected = clone_model(task)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, filename="last")
    trainer(max_steps=2, enable_checkpointing=True, callbacks=[ckpt]).fit(task, loader(batches))
    reference.mezo_reference(expected, batches, tiny_models.loss, seed=SEED, eps=EPS, lr=5e-3)
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert state["zo2_lightning"]["seed"] == SEED
    for name, p in expected.named_parameters():
        assert torch.equal(state["state_dict"]["model." + name], p), name


@pytest.mark.parametrize("arch", ["opt", "qwen3", "bert", "t5"])
def test_predict_streams_blocks_and_matches_the_stock_forward(arch):
    task = TinyTask(arch)
    batches = tiny_models.batches(arch, 2)
    task.model.eval()
    with torch.no_grad():
        expected = [tiny_models.logits(task.model, b) for b in batches]
    outs = trainer().predict(task, loader(batches))
    for got, want in zip(outs, expected):
        assert torch.equal(got, want)


def test_validation_during_fit_sees_the_current_weights():
    batches = tiny_models.batches("opt", 2)
    seen = []

    class Record(TinyTask):
        def validation_step(self, batch, batch_idx):
            seen.append({n: p.detach().clone() for n, p in self.model.named_parameters()})
            return super().validation_step(batch, batch_idx)

    task = Record("opt", lr=5e-3)
    expected = clone_model(task)
    trainer(max_steps=2, val_check_interval=1, limit_val_batches=1).fit(task, loader(batches), loader(batches))
    reference.mezo_reference(expected, batches[:1], tiny_models.loss, seed=SEED, eps=EPS, lr=5e-3)
    for name, p in expected.named_parameters():  # after step 0, nothing one step behind
        assert torch.equal(seen[0][name], p), name


def test_module_comes_back_as_it_was_after_fit(tmp_path):
    task = TinyTask("opt", lr=5e-3)
    blocks = task.zo_blocks()
    devices = {n: p.device for n, p in task.named_parameters()}
    trainer(max_steps=2).fit(task, loader(tiny_models.batches("opt", 2)))
    assert all(not b._forward_pre_hooks for b in blocks)
    assert {n: p.device for n, p in task.named_parameters()} == devices
    ptrs = [p.untyped_storage().data_ptr() for p in task.parameters()]
    assert len(set(ptrs)) == len(ptrs)
    task.model.save_pretrained(tmp_path)
    batch = tiny_models.batches("opt", 1)[0]
    assert torch.isfinite(tiny_models.loss(task.model, batch))  # a plain forward just works


def test_state_dict_mid_fit_is_flushed():
    batches = tiny_models.batches("opt", 3)
    captured = {}

    class Capture(TinyTask):
        def on_train_batch_start(self, batch, batch_idx):
            if self.trainer.global_step == 2:  # two updates committed, the second still pending for blocks
                captured.update({k: v.clone() for k, v in self.model.state_dict().items()})

    task = Capture("opt", lr=5e-3)
    expected = clone_model(task)
    trainer(max_steps=3).fit(task, loader(batches))
    reference.mezo_reference(expected, batches[:2], tiny_models.loss, seed=SEED, eps=EPS, lr=5e-3)
    for name, p in expected.named_parameters():
        assert torch.equal(captured[name], p), name
