"""Through the Trainer: 16-bit storage and disk offload change where the weights live, not the numbers."""

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from tests import tiny_models
from tests.lit_helpers import SEED, TinyTask, assert_params_equal, clone_model, loader, trainer, zo_strategy
from zo2_lightning import ZO2OffloadStrategy


def _fit(task, batches, max_steps, ckpt_path=None, callbacks=(), **strategy_kwargs):
    strategy = zo_strategy(**strategy_kwargs)
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


# ---------------------------------------------------------------------------------------- 16-bit working weights
@pytest.mark.parametrize("chunk", [1 << 22, 7], ids=["one-chunk", "chunks-of-7"])
def test_bf16_true_weights_update_in_fp32_with_stochastic_rounding_as_specified(monkeypatch, chunk):
    """precision='bf16-true': bf16 parameters (half the bytes of every slot and copy); each update runs in fp32
    and is stochastically rounded back, tensor by tensor and chunk by chunk, equal to the reference bitwise."""
    from lightning.pytorch.plugins.precision import HalfPrecision

    from tests import reference
    from zo2_lightning.engine import spsa

    monkeypatch.setattr(spsa, "HALF_CHUNK", chunk)
    batches = tiny_models.batches("llama", 3)
    task = TinyTask("llama", lr=5e-3, weight_decay=0.01)
    task.model.to(torch.bfloat16)
    expected, initial = clone_model(task), clone_model(task)
    trainer(max_steps=3, plugins=[HalfPrecision("bf16-true")]).fit(task, loader(batches))
    assert all(p.dtype == torch.bfloat16 for p in task.model.parameters())
    reference.mezo_reference(expected, batches, tiny_models.loss, seed=SEED, eps=1e-3, lr=5e-3, weight_decay=0.01)
    assert_params_equal(task.model, expected, initial)


def test_stochastic_rounding_keeps_updates_far_below_a_bf16_ulp_that_rounding_to_nearest_loses():
    from zo2_lightning.engine import EngineOptions, ZOEngine, discover_blocks

    changed = {}
    for sr in (True, False):
        model, batch = tiny_models.build("opt")
        model.to(torch.bfloat16)
        before = [p.detach().clone() for p in model.parameters()]
        options = EngineOptions(stochastic_rounding=sr)
        engine = ZOEngine(model, discover_blocks(model), torch.device("cpu"), options, seed=SEED)
        engine.attach([list(model.parameters())])
        with torch.no_grad():
            for step in range(3):
                lp, lm = engine.run_pair(lambda key: tiny_models.loss(model, batch), step=step, eps=1e-2)
                engine.commit(step, 1.0, [1e-5], [0.0])
        engine.detach()
        # where |w| >= 2^-6 a bf16 ulp is >= 1.2e-4: an update of 1e-5 * |z| (|z| < 6) is below half of it
        changed[sr] = sum(int(((p != b) & (b.abs() >= 2**-6)).sum()) for p, b in zip(model.parameters(), before))
    assert changed[False] == 0 < changed[True]


def test_adam_state_of_bf16_weights_is_fp32():
    from lightning.pytorch.plugins.precision import HalfPrecision

    from zo2_lightning import ZOAdam

    dtypes = set()

    class Record(Callback):
        def on_train_end(self, trainer, module):
            state = trainer.strategy.engine.rule_state()["buffers"]
            dtypes.update(b.dtype for segs in state.values() for bufs in segs for b in bufs)

    task = TinyTask("opt", lr=1e-3, eps=1e-3, optimizer=ZOAdam)
    trainer(max_steps=2, plugins=[HalfPrecision("bf16-true")], callbacks=[Record()]).fit(
        task, loader(tiny_models.batches("opt", 2)))
    assert dtypes == {torch.float32}
