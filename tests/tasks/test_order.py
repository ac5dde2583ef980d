"""The training order of the built-in datamodules: a function of (seed, epoch, rank, world size), and a loader
state that Lightning checkpoints and that continues the order where it stopped.

Epochs are driven as Lightning's fit loop drives them: ``_set_sampler_epoch(loader, e)`` before each pass.
"""

import itertools
import json
from types import SimpleNamespace

import pytest
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.fabric.utilities.types import _Stateful
from torch.utils.data import DistributedSampler

from zo2_lightning.models import byte_tokenizer
from zo2_lightning.tasks import PromptDataModule, SyntheticDataModule
from zo2_lightning.tasks.order import train_loader
from zo2_lightning.tasks.toy_data import write_toy_task


def _ids(loader, epoch, batches=None):
    """The examples of one pass, as a list of batches (synthetic rows as tuples, or plain indices)."""
    _set_sampler_epoch(loader, epoch)
    return [[tuple(r) for r in b["input_ids"].tolist()] if isinstance(b, dict) else b
            for b in itertools.islice(loader, batches)]  # islice draws no batch beyond the last it returns


def _synthetic(seed=0, trainer=None):
    dm = SyntheticDataModule(seq_len=6, num_train=12, num_val=4, batch_size=4, seed=seed)
    dm.trainer = trainer
    dm.setup("fit")
    return dm


def _indices(n, batch_size=2, seed=0, world=1, rank=0, num_workers=0):
    return train_loader(list(range(n)), batch_size=batch_size, seed=seed, collate_fn=list, num_workers=num_workers,
                        trainer=SimpleNamespace(world_size=world, global_rank=rank))


def _flat(batches):
    return [i for b in batches for i in b]


def test_each_epochs_order_depends_only_on_seed_and_epoch():
    """A resumed fit builds its loader afresh: epoch e must not depend on how many epochs this loader ran."""
    dm = _synthetic()
    one_loader = dm.train_dataloader()
    walked = [_ids(one_loader, e) for e in range(3)]
    fresh = [_ids(_synthetic().train_dataloader(), e) for e in range(3)]
    assert walked == fresh
    assert walked[0] != walked[1] != walked[2]  # a new order every epoch
    assert sorted(_flat(walked[1])) == sorted(_flat(walked[0]))  # of the same examples


def test_the_order_is_torchs_distributed_sampler_order():
    for seed, epoch in [(0, 0), (0, 1), (5, 2)]:
        reference = DistributedSampler(list(range(10)), num_replicas=1, rank=0, shuffle=True, seed=seed)
        reference.set_epoch(epoch)
        assert _flat(_ids(_indices(10, seed=seed), epoch)) == list(reference)
    assert _flat(_ids(_indices(10, seed=0), 0)) != _flat(_ids(_indices(10, seed=1), 0))


@pytest.mark.parametrize("n", [12, 13])
def test_ranks_take_disjoint_shards_whose_union_is_the_epoch(n):
    for epoch in range(2):
        shards = [_flat(_ids(_indices(n, world=2, rank=r), epoch)) for r in range(2)]
        assert len(shards[0]) == len(shards[1]) == (n + 1) // 2  # the same number of steps on every rank
        assert set(shards[0]) | set(shards[1]) == set(range(n))
        if n % 2 == 0:
            assert not set(shards[0]) & set(shards[1])
        else:  # one example is repeated to even the shards, the first of the epoch's order (DistributedSampler's)
            first = _flat(_ids(_indices(n), epoch))[0]
            assert set(shards[0]) & set(shards[1]) == {first}
    assert _ids(_indices(n, world=2, rank=0), 0) != _ids(_indices(n, world=2, rank=0), 1)


def test_the_datamodules_shard_by_the_trainers_world_size_and_rank(tmp_path):
    data_dir = write_toy_task("sst2", tmp_path, n_train=24, n_valid=4)
    for make in (
        lambda t: _synthetic(trainer=t),
        lambda t: _prompt(data_dir, trainer=t),
    ):
        one = make(SimpleNamespace(world_size=1, global_rank=0)).train_dataloader()
        halves = [make(SimpleNamespace(world_size=2, global_rank=r)).train_dataloader() for r in range(2)]
        assert len(halves[0].sampler) == len(halves[1].sampler) == len(one.sampler) // 2 > 0  # examples per epoch
        assert isinstance(halves[0].sampler, DistributedSampler)  # Lightning keeps it instead of injecting its own


def _prompt(data_dir, trainer=None, num_workers=0):
    dm = PromptDataModule("sst2", byte_tokenizer(), data_dir=str(data_dir), num_train=16, num_dev=4, num_eval=4,
                          batch_size=2, num_workers=num_workers)
    dm.trainer = trainer
    dm.setup("fit")
    return dm


def test_a_restored_loader_continues_mid_epoch_then_draws_the_next_epoch():
    dm = _synthetic()
    loader = dm.train_dataloader()
    assert isinstance(loader, _Stateful)  # what Lightning checks before saving or restoring it
    epoch0 = _ids(loader, 0)
    part = _ids(loader, 0, batches=1)
    state = json.loads(json.dumps(loader.state_dict()))  # plain values: the checkpoint loads with weights_only
    assert state["epoch"] == 0 and state["consumed"] == 4

    resumed = _synthetic().train_dataloader()
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state  # a checkpoint written before the first batch keeps the place
    rest = _ids(resumed, 0)
    assert part + rest == epoch0
    assert _ids(resumed, 1) == _ids(dm.train_dataloader(), 1)


def test_a_state_saved_after_the_epochs_last_batch_starts_the_next_epoch():
    loader = _indices(10, batch_size=4)
    _ids(loader, 3)
    state = loader.state_dict()
    assert state["consumed"] == 10
    resumed = _indices(10, batch_size=4)
    resumed.load_state_dict(state)
    assert _ids(resumed, 4) == _ids(_indices(10, batch_size=4), 4)


def test_a_two_rank_state_resumes_on_one_rank_at_the_same_place_of_the_order():
    ranks = [_indices(12, world=2, rank=r) for r in range(2)]
    seen = [_flat(_ids(r, 1, batches=2)) for r in ranks]  # each rank: 2 batches of 2
    one = _indices(12, batch_size=4)
    one.load_state_dict(ranks[0].state_dict())
    rest = _flat(_ids(one, 1))
    assert sorted(seen[0] + seen[1] + rest) == list(range(12))
    assert rest == _flat(_ids(_indices(12), 1))[8:]


def test_a_checkpoint_of_other_data_restarts_the_epoch_with_a_warning():
    loader = _indices(10)
    _ids(loader, 0, batches=2)
    other = _indices(12)
    with pytest.warns(UserWarning, match="covers 10 examples, this dataset has 12"):
        other.load_state_dict(loader.state_dict())
    assert _ids(other, 0) == _ids(_indices(12), 0)


def test_batches_prefetched_by_workers_are_not_counted_as_consumed(tmp_path):
    data_dir = write_toy_task("sst2", tmp_path, n_train=24, n_valid=4)
    loader = _prompt(data_dir, num_workers=2).train_dataloader()  # workers run ahead of the batches handed out
    _set_sampler_epoch(loader, 0)
    batches = iter(loader)
    next(batches)
    assert loader.state_dict()["consumed"] == 2
    resumed = _prompt(data_dir, num_workers=2).train_dataloader()
    resumed.load_state_dict(loader.state_dict())
    _set_sampler_epoch(resumed, 0)
    for expected, got in zip(batches, resumed, strict=True):
        assert torch.equal(expected["input_ids"], got["input_ids"])
