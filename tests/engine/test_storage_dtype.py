"""16-bit host storage: half the bytes, no lost updates (stochastic rounding), exact where nothing changes."""

import pytest
import torch

from tests import tiny_models
from zo2_lightning.engine import EngineOptions, ZOEngine, discover_blocks
from zo2_lightning.engine.rounding import stochastic_round


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased_and_exact_on_representable_values(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.full((100_000,), 0.0123456789)
    y = stochastic_round(x, dtype, g)
    assert len(y.unique()) == 2  # both neighbours are used
    assert y.double().mean().item() == pytest.approx(x[0].item(), rel=2e-4)
    representable = torch.randn(1000).to(dtype).float()
    assert torch.equal(stochastic_round(representable, dtype, g).float(), representable)


def _engine(model, dtype, **kw):
    options = EngineOptions(storage_dtype=dtype, **kw)
    engine = ZOEngine(model, discover_blocks(model), torch.device("cpu"), options, seed=3)
    engine.attach([list(model.parameters())])
    return engine


def test_bf16_storage_halves_the_bytes_moved_and_computes_in_fp32():
    model, batch = tiny_models.build("opt")
    engine = _engine(model, torch.bfloat16)
    assert all(h.dtype == torch.bfloat16 for flats in engine.streamer.host for h in flats)
    seen = []
    discover_blocks(model)[0].register_forward_pre_hook(lambda m, a: seen.append(m.fc1.weight.dtype))
    with torch.no_grad():
        engine.run_pair(lambda s: tiny_models.loss(model, batch), step=0, eps=1e-3)
    assert seen == [torch.float32, torch.float32]
    fp32_bytes = sum(u.nbytes for u in engine.units)
    assert engine.streamer.bytes_uploaded == fp32_bytes // 2
    engine.detach()
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_lr_zero_keeps_16_bit_storage_bitwise():
    model, batch = tiny_models.build("llama")
    for block in discover_blocks(model):  # start from bf16-representable block weights
        for p in block.parameters():
            p.data = p.data.to(torch.bfloat16).float()
    before = {n: p.clone() for n, p in model.named_parameters()}
    engine = _engine(model, torch.bfloat16)
    for step in range(3):
        with torch.no_grad():
            lp, lm = engine.run_pair(lambda s: tiny_models.loss(model, batch), step=step, eps=1e-3)
        engine.commit(step, (lp.item() - lm.item()) / 2e-3, [0.0], [0.0])
    engine.detach()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("stochastic", [True, False], ids=["stochastic", "nearest"])
def test_tiny_updates_survive_only_stochastic_rounding(stochastic):
    model, batch = tiny_models.build("opt")
    for block in discover_blocks(model):
        for p in block.parameters():
            p.data = p.data.to(torch.bfloat16).float()
    before = {n: p.clone() for n, p in model.named_parameters() if ".layers." in n}
    engine = _engine(model, torch.bfloat16, stochastic_rounding=stochastic)
    for step in range(2):
        with torch.no_grad():
            engine.run_pair(lambda s: tiny_models.loss(model, batch), step=step, eps=1e-3)
        engine.commit(step, 1.0, [1e-7], [0.0])  # an update far below half a bf16 ulp
    engine.detach()
    # where |w| >= 1e-3 half a bf16 ulp is >= 3.8e-6, far above any 1e-7 * z: round-to-nearest drops it all
    changed = sum(int(((p != before[n]) & (before[n].abs() >= 1e-3)).sum())
                  for n, p in model.named_parameters() if n in before)
    assert (changed > 0) == stochastic


def test_flush_early_or_late_stores_the_same_bits():
    runs = []
    for flush_each_step in (False, True):
        model, batch = tiny_models.build("gpt2")
        engine = _engine(model, torch.bfloat16)
        for step in range(3):
            with torch.no_grad():
                lp, lm = engine.run_pair(lambda s: tiny_models.loss(model, batch), step=step, eps=1e-3)
            engine.commit(step, (lp.item() - lm.item()) / 2e-3, [1e-3], [0.0])
            if flush_each_step:
                engine.flush()
        engine.detach()
        runs.append({n: p.clone() for n, p in model.named_parameters()})
    for n in runs[0]:
        assert torch.equal(runs[0][n], runs[1][n]), n
