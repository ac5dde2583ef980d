"""Soak (slow): thousands of engine steps on a tiny model; resident memory stays flat and the parameters equal the
in-memory MeZO reference at every checkpoint of the run.

``pytest -m slow tests/test_reliability_soak.py -s`` prints the steps run and the memory growth measured.
"""

import gc
import os

import pytest
import torch

from tests import reference, tiny_models
from zo2_lightning.engine import EngineOptions, ZOEngine, discover_blocks

ARCH, SEED, EPS, LR = "opt", 9, 1e-3, 1e-4
STEPS, CHECK_EVERY, WARMUP = 3000, 250, 250
RSS_GROWTH_LIMIT = 8 * 2**20  # bytes between the end of warm-up and the end of the run


def _rss() -> int:
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads resident memory from /proc")
def test_thousands_of_steps_without_memory_growth_or_drift():
    model, _ = tiny_models.build(ARCH)
    expected = tiny_models.build(ARCH)[0]
    data = tiny_models.batches(ARCH, 8)  # cycled
    options = EngineOptions(prefetch=1, force_copies=True)  # the transfer path, as on a GPU
    engine = ZOEngine(model, discover_blocks(model), torch.device("cpu"), options, seed=SEED)
    engine.attach([list(model.parameters())])
    rss_after_warmup = None
    try:
        for step in range(STEPS):
            batch = data[step % len(data)]
            with torch.no_grad():
                lp, lm = engine.run_pair(lambda key, batch=batch: tiny_models.loss(model, batch), step=step, eps=EPS)
            engine.commit(step, (lp.item() - lm.item()) / (2 * EPS), [LR], [0.0])
            reference.mezo_reference(expected, [batch], tiny_models.loss, seed=SEED, eps=EPS, lr=LR, start_step=step)
            if (step + 1) % CHECK_EVERY == 0:
                engine.flush()
                for (n, p), (_, q) in zip(model.named_parameters(), expected.named_parameters()):
                    assert torch.equal(p, q), f"step {step}: {n} drifted by {(p - q).abs().max().item()}"
            if step + 1 == WARMUP:
                rss_after_warmup = _rss()
        growth = _rss() - rss_after_warmup
    finally:
        engine.detach()
    print(f"\nsoak: {STEPS} steps, RSS growth after warm-up {growth / 2**20:.2f} MiB")
    assert growth < RSS_GROWTH_LIMIT, f"resident memory grew by {growth / 2**20:.1f} MiB over {STEPS - WARMUP} steps"
