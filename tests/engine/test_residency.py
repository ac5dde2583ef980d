"""Blocks kept resident by count or from a memory budget: fewer transfers, the same numbers."""

import pytest
import torch

from tests import tiny_models
from zo2_lightning.engine import EngineOptions, ZOEngine, discover_blocks
from zo2_lightning.engine.residency import blocks_that_fit


def test_blocks_that_fit_fills_the_room_under_the_budget():
    assert blocks_that_fit(budget_bytes=1000, peak_bytes=300, block_bytes=200, blocks=10) == 3
    assert blocks_that_fit(budget_bytes=1000, peak_bytes=1200, block_bytes=200, blocks=10) == 0
    assert blocks_that_fit(budget_bytes=10**9, peak_bytes=0, block_bytes=200, blocks=10) == 10


def _train(resident_blocks, steps=3, max_gpu_memory=None, memory_probe=None):
    model, batch = tiny_models.build("llama")
    options = EngineOptions(force_copies=True, resident_blocks=resident_blocks, prefetch=0,  # 2 slots: streamed
                            max_gpu_memory=max_gpu_memory)  # blocks do not stay
    engine = ZOEngine(model, discover_blocks(model), torch.device("cpu"), options, seed=5, memory_probe=memory_probe)
    engine.attach([list(model.parameters())])
    uploads = []
    for step in range(steps):
        before = engine.streamer.bytes_uploaded
        with torch.no_grad():
            lp, lm = engine.run_pair(lambda key: tiny_models.loss(model, batch), step=step, eps=1e-3)
        engine.commit(step, (lp.item() - lm.item()) / 2e-3, [1e-3], [0.0])
        uploads.append(engine.streamer.bytes_uploaded - before)
    resident = sorted(engine.streamer.resident)
    engine.detach()
    return model, uploads, resident


@pytest.mark.parametrize("resident_blocks", [1, 3])
def test_resident_blocks_change_transfers_not_results(resident_blocks):
    streamed, up_streamed, _ = _train(0)
    kept, up_kept, resident = _train(resident_blocks)
    assert resident == list(range(resident_blocks))
    assert up_kept[-1] < up_streamed[-1]
    for (n, p), (_, q) in zip(streamed.named_parameters(), kept.named_parameters()):
        assert torch.equal(p, q), n


def test_auto_residency_promotes_what_the_budget_allows_after_the_first_step():
    model, _ = tiny_models.build("llama")
    block_bytes = max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in discover_blocks(model))
    peak = 10_000
    streamed, _, _ = _train(0)
    auto, uploads, resident = _train("auto", max_gpu_memory=peak + 2 * block_bytes + 1, memory_probe=lambda: peak)
    assert resident == [0, 1]
    assert uploads[0] > uploads[1]  # step 0 streamed every block, later steps only the third
    for (n, p), (_, q) in zip(streamed.named_parameters(), auto.named_parameters()):
        assert torch.equal(p, q), n
