"""Exact-size page-locked host buffers: what is registered, when it is unregistered, and the refusals.

The CUDA driver is replaced by a fake that records calls, so the lifetime rules run on any machine; the real
registration is covered by ``tests/test_gpu.py``.
"""

import gc
import io

import pytest
import torch

from tests import tiny_models
from zo2_lightning.engine import discover_blocks, pinned
from zo2_lightning.engine.rules import AdamRule
from zo2_lightning.engine.units import Unit


class FakeDriver:
    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.registered: dict[int, int] = {}
        self.calls: list[tuple[str, int]] = []

    def register(self, ptr: int, nbytes: int) -> int:
        self.calls.append(("register", ptr))
        if self.fail:
            return self.fail
        assert ptr % pinned.PAGE == 0 and nbytes % pinned.PAGE == 0, "the driver locks whole pages"
        for start, size in self.registered.items():
            assert ptr + nbytes <= start or start + size <= ptr, "overlapping ranges: the driver refuses them"
        self.registered[ptr] = nbytes
        return 0

    def device(self) -> int:
        return 3

    def unregister(self, ptr: int, device: int) -> int:
        assert device == 3, "unregistered on another device than it was registered on"
        self.calls.append(("unregister", ptr))
        assert ptr in self.registered, "unregistering pages never registered"
        del self.registered[ptr]
        return 0


def _pages(nbytes: int) -> int:
    return -(-nbytes // pinned.PAGE) * pinned.PAGE


@pytest.fixture
def driver(monkeypatch):
    fake = FakeDriver()
    monkeypatch.setattr(pinned, "_driver", fake)
    monkeypatch.setattr(pinned, "MIN_REGISTER_BYTES", 0)
    monkeypatch.delenv("ZO2_PINNED", raising=False)
    return fake


def test_unpinned_buffers_touch_no_driver(driver):
    flat = pinned.host_empty(1000, torch.float32, pin=False)
    assert flat.shape == (1000,) and flat.device.type == "cpu"
    assert driver.calls == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_registers_exactly_the_bytes_asked_for_not_a_power_of_two(driver, dtype):
    before = pinned.registered_bytes()
    numel = 3 * 1000 + 7  # far from a power of two
    flat = pinned.host_empty(numel, dtype, pin=True)
    assert flat.shape == (numel,) and flat.dtype == dtype and flat.is_contiguous()
    pages = _pages(numel * dtype.itemsize)
    assert driver.registered == {flat.data_ptr(): pages}  # whole pages from the buffer's start, no more
    assert flat.data_ptr() % pinned.PAGE == 0
    assert pinned.registered_bytes() - before == pages
    flat.fill_(3)  # the whole buffer is ours to write
    assert flat.float().sum() == 3 * numel
    del flat
    gc.collect()
    assert driver.registered == {} and pinned.registered_bytes() == before


def test_neighbouring_buffers_never_share_a_locked_page(driver):
    """Heap allocations of a few pages sit next to each other; each registers pages of its own."""
    flats = [pinned.host_empty(n, torch.float32, pin=True) for n in range(1000, 1200, 10)]
    assert len(driver.registered) == len(flats)  # the fake asserts no two ranges overlap
    for f in flats:
        f.fill_(1.0)
    assert all(torch.all(f == 1.0) for f in flats)


def test_unregisters_only_after_the_last_view_is_gone(driver):
    flat = pinned.host_zeros(4096, torch.float32, pin=True)
    assert torch.count_nonzero(flat) == 0
    ptr = flat.data_ptr()
    param = torch.nn.Parameter(torch.empty(0))
    param.data = flat[100:200].view(10, 10)  # how units bind parameters to their host copy
    tail = flat[1000:]
    del flat
    gc.collect()
    assert ptr in driver.registered  # views keep the storage, hence the registration
    del tail
    gc.collect()
    assert ptr in driver.registered
    param.data = torch.zeros(3)  # restore() gives the parameter its own storage back
    gc.collect()
    assert driver.registered == {}
    assert driver.calls == [("register", ptr), ("unregister", ptr)]


def test_a_refused_registration_names_the_ways_around_it(monkeypatch, driver):
    driver.fail = 2  # cudaErrorMemoryAllocation
    before = pinned.registered_bytes()
    with pytest.raises(RuntimeError, match=r"ZO2_PINNED=torch.*pin_memory=False"):
        pinned.host_empty(4096, torch.float32, pin=True)
    gc.collect()
    assert pinned.registered_bytes() == before
    assert [c for c, _ in driver.calls] == ["register"]  # nothing to unregister


def test_the_environment_chooses_the_allocator(monkeypatch):
    monkeypatch.setenv("ZO2_PINNED", "torch")
    assert pinned.allocator() == "torch"
    monkeypatch.setenv("ZO2_PINNED", " Exact ")
    assert pinned.allocator() == "exact"
    monkeypatch.setenv("ZO2_PINNED", "cuda")
    with pytest.raises(ValueError, match="use one of exact, torch"):
        pinned.allocator()


def test_block_host_copies_and_rule_state_are_registered_at_their_exact_sizes(driver):
    model, _ = tiny_models.build("opt")
    block = discover_blocks(model)[0]
    unit = Unit.build(0, block.parameters(), {id(p) for p in block.parameters()})
    flats = unit.pack(torch.device("cpu"), pin=True, dtype=torch.bfloat16)
    want = sorted(_pages(seg.numel * 2) for seg in unit.segments)
    assert sorted(driver.registered[f.data_ptr()] for f in flats) == want
    state = AdamRule().new_state(1234, torch.float32, torch.device("cpu"), pin=True)
    assert [driver.registered[b.data_ptr()] for b in state] == [_pages(1234 * 4)] * 2
    assert all(torch.count_nonzero(b) == 0 for b in state)


def test_the_engine_leaves_nothing_registered_after_detach(driver, monkeypatch):
    """The streamer's host copies (forced to pin on this CPU-only machine) are registered while attached and all
    unregistered once detach() has given the parameters their own storage back."""
    from zo2_lightning.engine import EngineOptions, ZOEngine
    from zo2_lightning.engine.streaming import BlockStreamer

    offload = BlockStreamer.offload

    def pinned_offload(self, *args, **kwargs):
        self.pin = True
        return offload(self, *args, **kwargs)

    monkeypatch.setattr(BlockStreamer, "offload", pinned_offload)
    model, batch = tiny_models.build("llama")
    with torch.no_grad():
        expected = tiny_models.logits(model, batch)
    engine = ZOEngine(model, discover_blocks(model), torch.device("cpu"), EngineOptions(force_copies=True))
    engine.attach()
    host = [f for flats in engine.streamer.host for f in flats]
    assert sorted(driver.registered) == sorted(f.data_ptr() for f in host)
    with torch.no_grad():
        got = tiny_models.logits(model, batch)
    saved = io.BytesIO()
    torch.save(model.state_dict(), saved)  # a checkpoint while attached reads the mapped host copies
    engine.detach()
    del host, engine
    gc.collect()
    assert torch.equal(got, expected)
    assert driver.registered == {}
    saved.seek(0)
    for name, value in torch.load(saved, weights_only=True).items():
        assert torch.equal(value, model.state_dict()[name]), name
