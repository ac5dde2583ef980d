"""The simulated asynchronous device: it behaves like a GPU at its worst, the schedule is right on it, and it catches
each wait the schedule would be wrong without.

Every engine run here is compared with the same run on synchronous copies (itself held to the in-memory MeZO
reference by the other tests), bitwise, across scheduler seeds.
"""

import re
from pathlib import Path

import pytest
import torch

from tests import reference, tiny_models
from zo2_lightning.engine import EngineOptions, ZOEngine, discover_blocks
from zo2_lightning.engine.device import WAITS
from zo2_lightning.engine.simulated import SimulatedDevice

SEEDS = (0, 1, 2, 3)
EPS, LR = 1e-3, 1e-2
ARCH = "llama"  # 3 blocks: more blocks than the 2 device slots of prefetch 0 or device_slots=2


# ---------------------------------------------------------------------- the device itself
def test_simulated_copy_lands_late_poisoned_until_then_and_reads_its_source_when_it_lands():
    sim = SimulatedDevice(torch.device("cpu"), seed=0, early=0.0)  # no early completions: only waits complete
    up = sim.new_stream()
    src, dst, ints = torch.arange(4.0), torch.zeros(4), torch.zeros(2, dtype=torch.int32)
    sim.copy([dst, ints], [src, torch.tensor([7, 8], dtype=torch.int32)], up)
    assert torch.isnan(dst).all() and (ints.view(torch.uint8) == 0xA5).all()
    src[0] = 42.0  # written before the copy lands: the copy reads it
    sim.wait(sim.compute_stream(), sim.record(up), "upload->compute")
    assert dst.tolist() == [42.0, 1.0, 2.0, 3.0] and ints.tolist() == [7, 8] and sim.pending() == 0


def test_simulated_streams_run_in_order_and_after_the_events_they_wait_for():
    sim = SimulatedDevice(torch.device("cpu"), seed=0, early=0.0)
    up, off = sim.new_stream(), sim.new_stream()
    host, slot, again = torch.ones(3), torch.zeros(3), torch.zeros(3)
    sim.copy([slot], [host], up)
    sim.wait(off, sim.record(up), "write-back->upload:slot")
    sim.copy([again], [slot], off)  # may only start once the upload landed
    assert torch.isnan(slot).all() and torch.equal(again, torch.zeros(3))  # not started: still its old bits
    sim.synchronize(off, "write-back->host")
    assert torch.equal(again, torch.ones(3)) and sim.pending() == 0


def test_simulated_early_completions_follow_the_seed():
    def landed(seed):
        sim = SimulatedDevice(torch.device("cpu"), seed=seed)
        up = sim.new_stream()
        dsts = [torch.zeros(1) for _ in range(20)]
        for d in dsts:
            sim.copy([d], [torch.ones(1)], up)
        return [bool(d.item() == 1.0) for d in dsts]

    assert landed(3) == landed(3) and landed(3) != landed(4)
    assert any(landed(3)) and not all(landed(3))


def test_every_named_wait_is_in_the_schedule():
    source = (Path(__file__).resolve().parents[2] / "zo2_lightning" / "engine" / "streaming.py").read_text()
    assert set(re.findall(r'"((?:upload|write-back|compute)->[a-z:-]+)"', source)) == set(WAITS)


# ---------------------------------------------------------------------- the engine on it
def _run(options: EngineOptions, steps: int = 4, between=None, q: int = 1):
    """``steps`` MeZO steps through the engine; ``between(engine, step)`` runs after each commit. Returns the flushed
    parameters, the losses and the device's operations."""
    model, _ = tiny_models.build(ARCH)
    batches = tiny_models.batches(ARCH, steps)
    engine = ZOEngine(model, discover_blocks(model), torch.device("cpu"), options, seed=5)
    engine.attach([list(model.parameters())])
    losses = []
    for step in range(steps):
        with torch.no_grad():
            pairs = engine.run_directions(lambda key: tiny_models.loss(model, batches[step]), step, EPS,
                                          [5 + d for d in range(q)])
        for d, (lp, lm) in enumerate(pairs):
            losses.append((lp.item(), lm.item()))
            engine.commit(step, (lp.item() - lm.item()) / (2 * EPS) / q, [LR], [0.0], seed=5 + d)
        if between is not None:
            between(engine, step)
    engine.flush()
    params = [p.detach().clone() for p in model.parameters()]
    ops = engine.ops
    engine.detach()
    return params, losses, ops


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and a[1] == b[1]


def _promote_after(step: int):
    def between(engine, s):
        if s == step:  # the last block's write-back is still pending: its upload must wait for it
            engine.streamer.set_resident(len(engine.units))
    return between


def _demote_after(step: int):
    def between(engine, s):
        if s == step:  # the resident blocks are stale: written back, then their buffers freed
            engine.streamer.set_resident(0)
    return between


#: a scenario per wait: the engine options and what runs between steps
SCENARIOS = {
    "upload->compute": (dict(prefetch=1), None),
    "write-back->upload:slot": (dict(prefetch=1, device_slots=2), None),
    "write-back->upload:host": (dict(prefetch=0), _promote_after(1)),
    "write-back->host": (dict(prefetch=0), None),
    "write-back->free": (dict(prefetch=0, resident_blocks=2), _demote_after(1)),
}
#: the compute stream of the simulated device is immediate (a CPU forward), so a write-back issued after the compute
#: can never read the slot before the compute wrote it: removing this wait changes nothing the simulator can see
UNCATCHABLE = {"compute->write-back"}


def test_every_wait_has_a_scenario_or_a_reason():
    assert set(SCENARIOS) | UNCATCHABLE == set(WAITS)


def test_simulated_device_catches_a_dropped_wait(monkeypatch):
    _catches("write-back->upload:slot", monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("wait", ["upload->compute", "write-back->upload:host", "write-back->host", "write-back->free"])
def test_simulated_device_catches_a_dropped_wait_slow(wait, monkeypatch):
    _catches(wait, monkeypatch)


def _catches(wait, monkeypatch):
    kwargs, between = SCENARIOS[wait]
    expected = _run(EngineOptions(force_copies=True, **kwargs), between=between)
    for seed in SEEDS:  # with every wait, the schedule is right whatever the scheduler does
        assert _same(_run(EngineOptions(simulated_device=seed, **kwargs), between=between), expected), seed
    monkeypatch.setattr(SimulatedDevice, "dropped", frozenset({wait}))
    caught = [not _same(_run(EngineOptions(simulated_device=seed, **kwargs), between=between), expected)
              for seed in SEEDS]
    assert any(caught), f"dropping {wait!r} went unnoticed under seeds {SEEDS}"


@pytest.mark.parametrize("kwargs", [dict(prefetch=1), dict(prefetch=0, regenerate_directions=True)],
                         ids=["prefetch1", "prefetch0-regenerate"])
def test_simulated_steps_equal_synchronous_copies_and_the_reference(kwargs):
    model, _ = tiny_models.build(ARCH)
    batches = tiny_models.batches(ARCH, 4)
    reference.mezo_reference(model, batches, tiny_models.loss, seed=5, eps=EPS, lr=LR)
    expected = _run(EngineOptions(force_copies=True, **kwargs))
    assert all(torch.equal(p, q) for p, q in zip(expected[0], model.parameters()))
    for seed in SEEDS[:2]:
        assert _same(_run(EngineOptions(simulated_device=seed, **kwargs)), expected), seed


def test_simulated_lockstep_equals_two_sequential_forwards():
    model, batch = tiny_models.build(ARCH)
    index = reference.seed_index(model)
    z = reference.directions(model, 5, step=0, index=index)
    expect = [reference.perturbed_loss(model, batch, tiny_models.loss, z, s * EPS).item() for s in (1, -1)]
    engine = ZOEngine(model, discover_blocks(model), torch.device("cpu"), EngineOptions(simulated_device=1), seed=5)
    engine.attach([list(model.parameters())])
    with torch.no_grad():
        got = engine.run_pair(lambda key: tiny_models.loss(model, batch), step=0, eps=EPS)
    engine.detach()
    assert [g.item() for g in got] == expect


def test_simulated_device_counts_the_bytes_each_step_moves():
    """prefetch 0: 2 slots for 3 blocks, so every step uploads every block and writes every updated one back."""
    model, _ = tiny_models.build(ARCH)
    batches = tiny_models.batches(ARCH, 4)
    engine = ZOEngine(model, discover_blocks(model), torch.device("cpu"),
                      EngineOptions(simulated_device=0, prefetch=0), seed=5)
    engine.attach([list(model.parameters())])
    block_bytes = sum(u.nbytes for u in engine.units)
    uploaded = []
    for step in range(4):
        before = engine.ops.bytes_h2d
        with torch.no_grad():
            lp, lm = engine.run_pair(lambda key: tiny_models.loss(model, batches[step]), step, EPS)
        engine.commit(step, (lp.item() - lm.item()) / (2 * EPS), [LR], [0.0])
        uploaded.append(engine.ops.bytes_h2d - before)
    engine.flush()
    counted = (engine.ops.bytes_h2d, engine.ops.bytes_d2h)
    streamer = (engine.streamer.bytes_uploaded, engine.streamer.bytes_offloaded)
    engine.detach()
    assert uploaded == [block_bytes] * 4  # every block, once per step
    assert counted == streamer  # the device's own count of what landed agrees with the streamer's
    assert counted[1] == 4 * block_bytes  # steps 1-3 and the final flush each wrote every updated block back
