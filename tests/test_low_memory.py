"""The least-device-memory settings change nothing but memory, bit for bit: regenerate_directions (no z kept, one
perturbed copy per block and per resident unit) and device_slots=prefetch+1 (one block buffer fewer)."""

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from tests import reference, tiny_models
from tests.lit_helpers import SEED, TinyTask, assert_params_equal, clone_model, loader, trainer, zo_strategy
from zo2_lightning import ZO2OffloadStrategy, ZOAdam, ZOSGDCons
from zo2_lightning.engine import EngineOptions, ZOEngine, discover_blocks

EPS = 1e-3


def _fit(task, batches, steps, **strategy_kwargs):
    trainer(strategy=zo_strategy(regenerate_directions=True, **strategy_kwargs), max_steps=steps).fit(task, loader(batches))


@pytest.mark.parametrize("q,one_sided", [(1, False), (2, False), (2, True)], ids=["mezo", "q2", "q2-one-sided"])
def test_regenerated_directions_train_exactly_as_the_reference(q, one_sided):
    batches = tiny_models.batches("llama", 3)

    task = TinyTask("llama", lr=5e-3, eps=EPS, weight_decay=0.01, q=q, one_sided=one_sided)
    expected, initial = clone_model(task), clone_model(task)
    _fit(task, batches, 3)
    reference.mezo_reference(expected, batches, tiny_models.loss, seed=SEED, eps=EPS, lr=5e-3, weight_decay=0.01,
                             q=q, one_sided=one_sided)
    assert_params_equal(task.model, expected, initial)


@pytest.mark.parametrize("optimizer", [ZOSGDCons, ZOAdam], ids=["cons", "adam"])
def test_regenerated_directions_equal_the_default_path_for_cons_and_adam(optimizer):
    batches = tiny_models.batches("opt", 4, batch_size=4)

    regenerated = TinyTask("opt", lr=5e-3, eps=EPS, optimizer=optimizer)
    default = TinyTask("opt", lr=5e-3, eps=EPS, optimizer=optimizer, model=clone_model(regenerated))
    _fit(regenerated, batches, 4, micro_batches=2)
    trainer(strategy=zo_strategy(micro_batches=2), max_steps=4).fit(default, loader(batches))
    assert_params_equal(regenerated.model, default.model)


def test_regenerated_directions_keep_one_block_buffer_and_one_resident_copy():
    model, batch = tiny_models.build("llama")
    options = EngineOptions(regenerate_directions=True)
    engine = ZOEngine(model, discover_blocks(model), torch.device("cpu"), options, seed=SEED)
    engine.attach([list(model.parameters())])
    with torch.no_grad():
        engine.run_directions(lambda key: tiny_models.loss(model, batch), step=0, eps=EPS, seeds=[1, 2, 3])
        engine.commit(0, 0.5, [1e-3], [0.0])
    memory = engine.device_bytes()
    engine.detach()
    names = {name for name in memory if name.startswith("scratch/")}
    assert names == {"scratch/P"} and memory["resident/copies"] == 0  # the resident's one copy is its z buffer


@pytest.mark.parametrize("keep", [False, True], ids=["default", "keep_directions"])
def test_resident_scratch_is_the_runs_copies_and_a_z_only_where_kept(keep):
    """Default: 2q resident copies and no z buffer (z is drawn into each +eps copy, and again for the commit,
    into a copy the runs are done with). keep_directions: a z buffer too, which saves that second draw."""
    from zo2_lightning.engine import RESIDENT_UNIT
    from zo2_lightning.engine import spsa as spsa_mod

    model, batch = tiny_models.build("opt")  # tied head: the resident unit is large
    engine = ZOEngine(model, discover_blocks(model), torch.device("cpu"), EngineOptions(keep_directions=keep),
                      seed=SEED)
    engine.attach([list(model.parameters())])
    drawn = []
    real = spsa_mod.UnitSPSA.draw
    spsa_mod.UnitSPSA.draw = lambda self, unit, *a: (drawn.append(unit.index), real(self, unit, *a))[1]
    try:
        with torch.no_grad():
            engine.run_directions(lambda key: tiny_models.loss(model, batch), step=0, eps=EPS, seeds=[1, 2])
            engine.commit(0, 0.5, [1e-3], [0.0], seed=2)
    finally:
        spsa_mod.UnitSPSA.draw = real
    memory = engine.device_bytes()
    engine.detach()
    resident = memory["resident/params"]
    assert memory["resident/copies"] == 4 * resident  # (d, s) for q = 2
    assert memory["resident/copies"] + memory["resident/z"] == (5 if keep else 4) * resident
    assert drawn.count(RESIDENT_UNIT) == (2 if keep else 3)  # a draw per direction, + the commit's


def test_keep_and_regenerate_exclude_each_other():
    with pytest.raises(ValueError, match="exclude each other"):
        ZO2OffloadStrategy(keep_directions=True, regenerate_directions=True)


@pytest.mark.parametrize("prefetch", [0, 1])
def test_prefetch_plus_one_device_slots_train_exactly_as_the_default(prefetch):
    """Fewer slots than prefetch + 2: each upload reuses the buffer just released (after its write-back)."""
    batches = tiny_models.batches("gpt2", 3)
    lean, default = TinyTask("gpt2", lr=5e-3), None
    default = TinyTask("gpt2", lr=5e-3, model=clone_model(lean))
    initial = clone_model(lean)
    slots = []

    class Slots(Callback):
        def on_train_batch_end(self, trainer, *args):
            slots.append(trainer.strategy.engine.streamer.slot_count)

    for task, kwargs in ((lean, {"device_slots": prefetch + 1, "regenerate_directions": True}), (default, {})):
        trainer(strategy=zo_strategy(prefetch=prefetch, **kwargs), max_steps=3, callbacks=[Slots()]).fit(task, loader(batches))
    assert slots[0] == prefetch + 1 and slots[-1] == prefetch + 2
    assert_params_equal(lean.model, default.model, initial)


def test_device_slots_below_prefetch_plus_one_are_refused():
    with pytest.raises(ValueError, match="at least prefetch \\+ 1 = 3"):
        ZO2OffloadStrategy(prefetch=2, device_slots=2)
