"""Checkpoints survive a save that dies mid-write; loading refuses pickled code, other models, other strategies and
broken files with errors that name the fix, and the module is untouched by every refusal."""

import os

import pytest
import torch
import transformers as tf
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

from tests import tiny_models
from tests.lit_helpers import (
    TinyTask,
    assert_params_equal,
    clone_model,
    loader,
    trainer,
)
from zo2_lightning.strategy.checkpoint_io import (
    AtomicCheckpointIO,
    CorruptCheckpointError,
    UnsafeCheckpointError,
)

ARCH = "opt"


class Opaque:
    """A user object that only round-trips through full pickling (as a Hydra DictConfig hparam would)."""

    def __init__(self, value: int = 0) -> None:
        self.value = value


def _fit_and_save(path, steps=2, lr=5e-3):
    """A trained module and the checkpoint of it at ``path``."""
    task = TinyTask(ARCH, lr=lr)
    t = trainer(max_steps=steps)
    t.fit(task, loader(tiny_models.batches(ARCH, 2)))
    t.save_checkpoint(path)
    return task


def _params(state):
    return {k: v for k, v in state["state_dict"].items()}


# ================================================================== atomic saves
def test_strategy_uses_the_atomic_checkpoint_io_unless_the_user_gives_one():
    assert type(trainer().strategy.checkpoint_io) is AtomicCheckpointIO
    own = TorchCheckpointIO()
    assert trainer(plugins=[own]).strategy.checkpoint_io is own
    wrapped = trainer(plugins=[AsyncCheckpointIO()]).strategy.checkpoint_io  # a wrapper gets ours inside
    assert type(wrapped.checkpoint_io) is AtomicCheckpointIO


def test_a_save_that_dies_mid_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    _fit_and_save(path)
    before = torch.load(path, weights_only=True)

    real_save = torch.save

    def dies_half_way(obj, f, *args, **kwargs):  # a kill (or a full disk) after half the bytes are out
        import io

        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        raise OSError(28, "No space left on device")

    later = TinyTask(ARCH, lr=5e-3)
    t = trainer(max_steps=3)
    t.fit(later, loader(tiny_models.batches(ARCH, 2)))
    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="No space left"):
        t.save_checkpoint(path)
    monkeypatch.undo()

    after = torch.load(path, weights_only=True)  # whole, and still the old one
    assert after["global_step"] == before["global_step"] == 2
    for name, p in _params(before).items():
        assert torch.equal(after["state_dict"][name], p), name
    assert os.listdir(tmp_path) == ["last.ckpt"]  # the partial temporary file is gone
    # the failed save did not stop a later one
    t.save_checkpoint(path)
    assert torch.load(path, weights_only=True)["global_step"] == 3


# ================================================================== safe loading
def test_a_checkpoint_that_needs_pickled_code_is_refused_unless_the_user_opts_in(tmp_path):
    path = tmp_path / "pickled.ckpt"
    _fit_and_save(path)
    state = torch.load(path, weights_only=True)
    state["hyper_parameters"] = {"cfg": Opaque(3)}
    torch.save(state, path)

    task = TinyTask(ARCH, lr=5e-3, model=tiny_models.build(ARCH, seed=7)[0])
    untouched = clone_model(task)
    with pytest.raises(UnsafeCheckpointError, match=r"weights_only=False"):
        trainer(max_steps=3).fit(task, loader(tiny_models.batches(ARCH, 2)), ckpt_path=path)
    assert_params_equal(task.model, untouched)  # nothing was loaded, nothing executed

    trainer(max_steps=2).fit(task, loader(tiny_models.batches(ARCH, 2)), ckpt_path=path, weights_only=False)
    for name, p in task.named_parameters():  # opted in: the checkpoint's weights (max_steps reached, no step)
        assert torch.equal(p, state["state_dict"][name]), name


def test_a_checkpoint_of_a_different_model_shape_is_refused_before_anything_is_copied(tmp_path):
    path = tmp_path / "opt.ckpt"
    _fit_and_save(path)
    cfg = tf.OPTConfig(vocab_size=tiny_models.VOCAB, hidden_size=32, num_hidden_layers=3, ffn_dim=96,  # not 64
                       num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)
    torch.manual_seed(0)
    wider = TinyTask(ARCH, lr=5e-3, model=tf.OPTForCausalLM(cfg).eval())
    untouched = clone_model(wider)
    with pytest.raises(ValueError, match=r"different model: shape mismatch .*fc1\.weight: \(64, 32\) in the checkpoint,"
                                         r" \(96, 32\) here.*same size and architecture"):
        trainer(max_steps=3).fit(wider, loader(tiny_models.batches(ARCH, 2)), ckpt_path=path)
    assert_params_equal(wider.model, untouched)


def test_fit_refuses_to_resume_a_checkpoint_of_another_strategy_but_validate_reads_it(tmp_path):
    path = tmp_path / "ddp.ckpt"
    trained = _fit_and_save(path)
    state = torch.load(path, weights_only=True)
    del state["zo2_lightning"]  # what a first-order (DDP, single-device) run writes
    torch.save(state, path)

    task = TinyTask(ARCH, lr=5e-3, model=tiny_models.build(ARCH, seed=7)[0])
    untouched = clone_model(task)
    with pytest.raises(ValueError, match=r"not written by a zo2 strategy.*load_state_dict.*without ckpt_path"):
        trainer(max_steps=3).fit(task, loader(tiny_models.batches(ARCH, 2)), ckpt_path=path)
    assert_params_equal(task.model, untouched)

    trainer().validate(task, loader(tiny_models.batches(ARCH, 1)), ckpt_path=path, verbose=False)
    assert_params_equal(task.model, trained.model)  # evaluating someone else's weights is fine


@pytest.mark.parametrize("damage", ["truncated", "garbled", "empty"])
def test_a_broken_checkpoint_file_gets_a_clear_error(tmp_path, damage):
    path = tmp_path / "last.ckpt"
    _fit_and_save(path)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbled":
        path.write_bytes(data[:64] + bytes(b ^ 0x5A for b in data[64:2048]) + data[2048:])
    else:
        path.write_bytes(b"")
    task = TinyTask(ARCH, lr=5e-3)
    untouched = clone_model(task)
    with pytest.raises(CorruptCheckpointError, match=r"truncated or not a torch checkpoint.*earlier checkpoint"):
        trainer(max_steps=3).fit(task, loader(tiny_models.batches(ARCH, 2)), ckpt_path=path)
    assert_params_equal(task.model, untouched)


# ================================================================== bad input (the current answers, kept clear)
def test_a_batch_of_the_wrong_dtype_names_the_dtype():
    batch = tiny_models.batches(ARCH, 1)[0]
    batch = {"input_ids": batch["input_ids"].float(), "labels": batch["labels"]}
    task = TinyTask(ARCH, lr=5e-3)
    untouched = clone_model(task)
    with pytest.raises(RuntimeError, match=r"Long, Int.*Float"):
        trainer(max_steps=1).fit(task, loader([batch]))
    assert_params_equal(task.model, untouched)


def test_a_scheduler_that_drives_lr_below_zero_stops_the_fit_before_the_update():
    def negative(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 if step == 0 else -1.0)

    task = TinyTask(ARCH, lr=5e-3, scheduler=negative)
    batches = tiny_models.batches(ARCH, 2)
    after_one = clone_model(task)
    trainer(max_steps=1).fit(TinyTask(ARCH, lr=5e-3, model=after_one), loader(batches[:1]))
    with pytest.raises(ValueError, match=r"lr must be >= 0, got -0\.005"):
        trainer(max_steps=2).fit(task, loader(batches))
    assert_params_equal(task.model, after_one)  # step 0 applied, the negative step not
