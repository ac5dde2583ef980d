"""Through the Trainer: 16-bit storage and disk offload change where the weights live, not the numbers."""

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from tests import tiny_models
from tests.lit_helpers import SEED, TinyTask, assert_params_equal, clone_model, loader, trainer
from zo2_lightning import ZO2OffloadStrategy


def _fit(task, batches, max_steps, ckpt_path=None, callbacks=(), **strategy_kwargs):
    strategy = ZO2OffloadStrategy(seed=SEED, **strategy_kwargs)
    strategy._force_copies = True
    trainer(strategy=strategy, max_steps=max_steps, enable_checkpointing=bool(callbacks),
            callbacks=list(callbacks)).fit(task, loader(batches), ckpt_path=ckpt_path)
    return strategy


@pytest.mark.parametrize("storage", [None, "bf16"])
def test_disk_offload_fit_equals_host_memory_fit(tmp_path, storage):
    batches = tiny_models.batches("opt", 5)
    in_memory = TinyTask("opt", lr=5e-3)
    initial = clone_model(in_memory)
    on_disk = TinyTask(model=clone_model(in_memory), lr=5e-3)
    _fit(in_memory, batches, 5, storage_dtype=storage)
    _fit(on_disk, batches, 5, storage_dtype=storage, offload_device="disk", offload_dir=str(tmp_path),
         disk_flush_every=3)
    assert list(tmp_path.glob("block_*.safetensors"))
    assert_params_equal(on_disk.model, in_memory.model, initial)


def test_bf16_storage_resumes_bitwise(tmp_path):
    batches = tiny_models.batches("llama", 2)
    uninterrupted = TinyTask("llama", lr=5e-3)
    initial = clone_model(uninterrupted)
    _fit(uninterrupted, batches, 4, storage_dtype="bf16")
    first = TinyTask(model=clone_model(TinyTask(model=initial)), lr=5e-3)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    _fit(first, batches, 3, callbacks=[ckpt], storage_dtype="bf16")
    resumed = TinyTask("llama", lr=5e-3)
    _fit(resumed, batches, 4, ckpt_path=tmp_path / "step=2.ckpt", storage_dtype="bf16")
    assert_params_equal(resumed.model, uninterrupted.model, initial)


def test_disk_offload_needs_a_directory():
    with pytest.raises(ValueError, match="offload_dir="):
        ZO2OffloadStrategy(offload_device="disk")


def test_unknown_storage_dtype_is_refused():
    with pytest.raises(ValueError, match="'bf16', 'fp16'"):
        ZO2OffloadStrategy(storage_dtype="int8")


def test_keep_directions_changes_nothing_but_the_draws():
    batches = tiny_models.batches("gpt2", 3)
    plain = TinyTask("gpt2", lr=5e-3)
    initial = clone_model(plain)
    kept = TinyTask(model=clone_model(plain), lr=5e-3)
    _fit(plain, batches, 3)
    _fit(kept, batches, 3, keep_directions=True)
    assert_params_equal(kept.model, plain.model, initial)
