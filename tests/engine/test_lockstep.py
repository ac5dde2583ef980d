"""Lockstep L+/L- equal two sequential full-model perturbed forwards, bitwise, on every architecture."""

import pytest
import torch

from tests import reference, tiny_models
from zo2_lightning.engine import EngineOptions, ZOEngine, discover_blocks

EPS = 1e-3
SEED = 11


@pytest.mark.parametrize("force_copies", [False, True], ids=["in-place", "copied"])
@pytest.mark.parametrize("arch", tiny_models.ARCHITECTURES)
def test_lockstep_equals_sequential_perturbed_forwards(arch, force_copies):
    model, batch = tiny_models.build(arch)
    index = reference.seed_index(model)
    z = reference.directions(model, SEED, step=3, index=index)
    expect_plus = reference.perturbed_loss(model, batch, tiny_models.loss, z, EPS)
    expect_minus = reference.perturbed_loss(model, batch, tiny_models.loss, z, -EPS)

    options = EngineOptions(force_copies=force_copies)
    engine = ZOEngine(model, discover_blocks(model), torch.device("cpu"), options, seed=SEED)
    engine.attach([list(model.parameters())])
    with torch.no_grad():
        plus, minus = engine.run_pair(lambda sign: tiny_models.loss(model, batch), step=3, eps=EPS)
    engine.detach()

    assert torch.equal(plus, expect_plus), (plus.item(), expect_plus.item())
    assert torch.equal(minus, expect_minus), (minus.item(), expect_minus.item())
    assert not torch.equal(plus, minus)


def test_each_block_is_prepared_once_per_step_and_runs_alternate():
    model, batch = tiny_models.build("llama")
    blocks = discover_blocks(model)
    engine = ZOEngine(model, blocks, torch.device("cpu"), EngineOptions(force_copies=True), seed=0)
    engine.attach([list(model.parameters())])
    order = []
    for i, b in enumerate(blocks):
        b.register_forward_pre_hook(lambda m, a, i=i: order.append((i, engine.run_key.sign)))
    with torch.no_grad():
        engine.run_pair(lambda s: tiny_models.loss(model, batch), step=0, eps=EPS)
    # each block: exactly two forwards (one per sign), both before the next block starts
    assert [i for i, _ in order] == [i for i in range(len(blocks)) for _ in (0, 1)]
    assert all({order[2 * i][1], order[2 * i + 1][1]} == {1, -1} for i in range(len(blocks)))
    assert engine.streamer.bytes_uploaded == sum(u.nbytes for u in engine.units)  # one upload per block
    engine.detach()


def test_q_directions_share_one_upload_and_equal_separate_pairs():
    model, batch = tiny_models.build("qwen2")
    engine = ZOEngine(model, discover_blocks(model), torch.device("cpu"), EngineOptions(force_copies=True), seed=SEED)
    engine.attach([list(model.parameters())])
    seeds = [SEED, 77, 78]
    with torch.no_grad():
        together = engine.run_directions(lambda key: tiny_models.loss(model, batch), step=1, eps=EPS, seeds=seeds)
        assert engine.streamer.bytes_uploaded == sum(u.nbytes for u in engine.units)  # each block once
        apart = [engine.run_pair(lambda key: tiny_models.loss(model, batch), step=1, eps=EPS, seed=s) for s in seeds]
    engine.detach()
    for (tp, tm), (ap, am) in zip(together, apart):
        assert torch.equal(tp, ap) and torch.equal(tm, am)
    assert len({round(tp.item(), 7) for tp, _ in together}) == 3


def test_kept_directions_give_the_same_bits_with_one_draw_less_per_step(monkeypatch):
    from zo2_lightning.engine import rules as rules_mod  # the default rule draws every tensor's z there

    results, draws = [], []
    for keep in (False, True):
        counter = {"n": 0}
        real = rules_mod.draw_direction

        def counting(out, *args, real=real, counter=counter):
            counter["n"] += out.numel()
            return real(out, *args)

        monkeypatch.setattr(rules_mod, "draw_direction", counting)
        model, batch = tiny_models.build("opt")
        options = EngineOptions(keep_directions=keep)
        engine = ZOEngine(model, discover_blocks(model), torch.device("cpu"), options, seed=SEED)
        engine.attach([list(model.parameters())])
        for step in range(3):
            with torch.no_grad():
                lp, lm = engine.run_pair(lambda key: tiny_models.loss(model, batch), step=step, eps=EPS)
            if step != 1:  # step 1 is skipped, as after a non-finite loss: its kept z must be dropped
                engine.commit(step, (lp.item() - lm.item()) / (2 * EPS), [1e-2], [0.0])
        engine.flush()
        assert engine.device_bytes()["kept_directions"] == 0
        results.append({n: p.clone() for n, p in model.named_parameters()})
        draws.append(counter["n"])
        engine.detach()
    for n in results[0]:
        assert torch.equal(results[0][n], results[1][n]), n
    assert draws[1] < draws[0]


def test_autocast_with_its_cast_cache_on_still_gives_each_run_its_own_weights():
    """torch.autocast caches the low-precision cast of a leaf parameter; the runs rebind the same Parameter to
    other data, so a cached cast would hand the -eps run the +eps weights. The engine turns the cache off."""
    model, batch = tiny_models.build("llama")
    index = reference.seed_index(model)
    z = reference.directions(model, SEED, step=0, index=index)
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        expect = [reference.perturbed_loss(model, batch, tiny_models.loss, z, s * EPS) for s in (1, -1)]
    engine = ZOEngine(model, discover_blocks(model), torch.device("cpu"), seed=SEED)
    engine.attach([list(model.parameters())])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # cache_enabled defaults to True
        got = engine.run_pair(lambda key: tiny_models.loss(model, batch), step=0, eps=EPS)
        assert torch.is_autocast_cache_enabled()  # given back as it was
        # the same with the autocast inside the runs, where the engine's switch cannot reach the cache flag
        inner = engine.run_pair(lambda key: _in_autocast(model, batch), step=0, eps=EPS)
    engine.detach()
    assert [g.item() for g in got] == [e.item() for e in expect] == [g.item() for g in inner]


def _in_autocast(model, batch):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return tiny_models.loss(model, batch)


@pytest.mark.parametrize("q", [1, 2])
def test_a_block_needs_one_perturbed_copy_and_one_z_per_direction(q):
    """The runs take turns at a block, so one perturbed copy serves them all (rebuilt per run, same values):
    block scratch is q z buffers + 1 copy, not 1 z + 2q copies."""
    model, batch = tiny_models.build("llama")
    engine = ZOEngine(model, discover_blocks(model), torch.device("cpu"), EngineOptions(force_copies=True), seed=SEED)
    engine.attach([list(model.parameters())])
    seeds = [SEED + k for k in range(q)]
    with torch.no_grad():
        engine.run_directions(lambda key: tiny_models.loss(model, batch), step=0, eps=EPS, seeds=seeds)
    names = {name for name in engine.device_bytes() if name.startswith("scratch/")}
    engine.detach()
    assert names == {"scratch/z", "scratch/P", *[f"scratch/z{d}" for d in range(1, q)]}
