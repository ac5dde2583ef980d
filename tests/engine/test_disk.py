"""Disk offload: same numbers as memory, files replaced atomically, mostly reads, clear errors."""

import pytest
import torch
from safetensors.torch import load_file

from tests import tiny_models
from zo2_lightning.engine import EngineOptions, ZOEngine, discover_blocks
from zo2_lightning.engine import disk as disk_mod


def _train(steps, tmp_path=None, storage=None, flush_every=3, arch="llama", **kw):
    model, batch = tiny_models.build(arch)
    options = EngineOptions(prefetch=0, storage_dtype=storage, offload_device="cpu" if tmp_path is None else "disk",
                            offload_dir=None if tmp_path is None else str(tmp_path), disk_flush_every=flush_every, **kw)
    engine = ZOEngine(model, discover_blocks(model), torch.device("cpu"), options, seed=9)
    engine.attach([list(model.parameters())])
    for step in range(steps):
        with torch.no_grad():
            lp, lm = engine.run_pair(lambda key: tiny_models.loss(model, batch), step=step, eps=1e-3)
        engine.commit(step, (lp.item() - lm.item()) / 2e-3, [1e-2], [0.0])
    return model, engine


@pytest.mark.parametrize("storage", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_disk_offload_equals_memory_offload_bitwise(tmp_path, storage):
    in_memory, engine = _train(7, storage=storage, force_copies=True)
    engine.detach()
    on_disk, engine = _train(7, tmp_path, storage=storage)
    assert engine.streamer.disk.bytes_written > 0
    engine.detach()
    for (n, p), (_, q) in zip(in_memory.named_parameters(), on_disk.named_parameters()):
        assert torch.equal(p, q), n


def test_files_are_rewritten_every_n_updates_and_replayed_in_between(tmp_path):
    model, engine = _train(1, tmp_path, flush_every=4)
    store = engine.streamer.disk
    block_bytes = sum(u.nbytes for u in engine.units)
    written_at_offload = store.bytes_written
    assert written_at_offload == block_bytes
    for step in range(1, 4):  # updates 1..3 are replayed on read, files untouched
        with torch.no_grad():
            lp, lm = engine.run_pair(lambda key: model(**tiny_models.build("llama")[1]).loss, step=step, eps=1e-3)
        engine.commit(step, (lp.item() - lm.item()) / 2e-3, [1e-2], [0.0])
    assert store.bytes_written == written_at_offload
    with torch.no_grad():  # the 4th arrival lags 4 updates: each block is written once
        engine.run_pair(lambda key: model(**tiny_models.build("llama")[1]).loss, step=4, eps=1e-3)
    assert store.bytes_written == written_at_offload + block_bytes
    engine.detach()


def test_state_dict_reads_through_the_files_and_files_load_anywhere(tmp_path):
    model, engine = _train(3, tmp_path)
    state = model.state_dict()  # flushes, then maps the files
    block0_numel = engine.units[0].numel
    engine.detach()
    for name, p in model.named_parameters():
        assert torch.equal(state[name], p), name
    block0 = load_file(str(tmp_path / "block_00000.safetensors"))
    assert block0["seg0"].numel() == block0_numel


def test_a_crash_while_writing_leaves_the_previous_file(tmp_path, monkeypatch):
    model, engine = _train(1, tmp_path, flush_every=1)
    before = load_file(str(tmp_path / "block_00000.safetensors"))["seg0"].clone()

    def torn_write(tensors, path, metadata=None):
        with open(path, "wb") as fh:
            fh.write(b"\x00" * 10)  # a partial temp file, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(disk_mod, "save_file", torn_write)
    with pytest.raises(KeyboardInterrupt):
        engine.flush()
    after = load_file(str(tmp_path / "block_00000.safetensors"))["seg0"]
    assert torch.equal(after, before)


def test_not_enough_disk_is_refused_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(disk_mod.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    model, batch = tiny_models.build("opt")
    options = EngineOptions(offload_device="disk", offload_dir=str(tmp_path))
    engine = ZOEngine(model, discover_blocks(model), torch.device("cpu"), options)
    with pytest.raises(disk_mod.DiskSpaceError, match="point offload_dir at a larger drive"):
        engine.attach()
    assert not list(tmp_path.glob("*.safetensors"))


def test_a_truncated_block_file_is_reported(tmp_path):
    model, engine = _train(1, tmp_path)
    path = tmp_path / "block_00001.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(disk_mod.CorruptBlockFileError, match="truncated"):
        with torch.no_grad():
            engine.run_pair(lambda key: model(**tiny_models.build("llama")[1]).loss, step=1, eps=1e-3)


def test_blocks_on_the_meta_device_are_materialized_one_at_a_time(tmp_path):
    reference, batch = tiny_models.build("opt")
    with torch.device("meta"):
        model = type(reference)(reference.config).eval()
    state = reference.state_dict()
    names = {id(p): n for n, p in model.named_parameters()}
    def fill(p):  # keeps the Parameter object (the optimizer and the engine hold it)
        torch.utils.swap_tensors(p, torch.nn.Parameter(state[names[id(p)]].clone(), p.requires_grad))

    for n, p in model.named_parameters():  # resident parts are loaded normally
        if ".layers." not in n:
            fill(p)

    def materialize(block):
        for p in block.parameters():
            fill(p)

    options = EngineOptions(offload_device="disk", offload_dir=str(tmp_path))
    engine = ZOEngine(model, discover_blocks(model), torch.device("cpu"), options, materialize=materialize)
    engine.attach()
    # parked: shape-only placeholders (one element, stride 0), nothing model-sized in memory
    assert all(p.untyped_storage().nbytes() <= 8 for b in discover_blocks(model) for p in b.parameters())
    with torch.no_grad():
        got = model(**batch).logits
        want = reference(**batch).logits
    engine.detach()
    assert torch.equal(got, want)
