"""A process may run a share of a step's perturbations (perturbation parallelism): each run it makes returns what
the whole step's run returns, bit for bit, it draws only its own directions, and processes that then commit every
direction hold the same weights."""

import copy

import pytest
import torch

from tests import tiny_models
from zo2_lightning.engine import EngineOptions, Perturbation, ZOEngine, discover_blocks
from zo2_lightning.engine.keys import TRIAL_PERTURBATIONS, step_perturbations

EPS, SEED, Q, CHUNKS = 1e-2, 5, 2, 2
OPTIONS = {"default": {}, "keep": {"keep_directions": True}, "regenerate": {"regenerate_directions": True}}


def _engine(model, **options):
    engine = ZOEngine(model, discover_blocks(model), torch.device("cpu"), EngineOptions(force_copies=True, **options),
                      seed=SEED)
    engine.attach([list(model.parameters())])
    return engine


def _chunk_fn(model, batch):
    """Micro-batch ``key.chunk`` is row ``key.chunk`` of the batch."""
    return lambda key: tiny_models.loss(model, {k: v[key.chunk : key.chunk + 1] for k, v in batch.items()})


@pytest.mark.parametrize("one_sided", [False, True], ids=["central", "one_sided"])
@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
def test_perturbation_parallel_shares_of_a_step_run_what_the_whole_step_runs(options, one_sided):
    model, batch = tiny_models.build("opt", batch_size=CHUNKS)
    start = copy.deepcopy(model)
    runs = step_perturbations(Q, one_sided)
    shares = [None, *([p] for p in runs)]  # the whole step, then every run in a process of its own
    models = [copy.deepcopy(model) for _ in shares]
    engines = [_engine(m, **options) for m in models]
    seeds = [SEED, SEED + 100]
    for step in range(3):
        with torch.no_grad():
            outs = [e.run_chunks(_chunk_fn(m, batch), step, EPS, seeds, CHUNKS, one_sided, perturbations=share)
                    for e, m, share in zip(engines, models, shares)]
        whole = outs[0]
        for share, part in zip(shares[1:], outs[1:]):
            (mine,) = share
            for m in range(CHUNKS):
                for d in range(Q):
                    for side, sign in enumerate((+1, 0 if one_sided else -1)):
                        direction = 0 if sign == 0 else d
                        got = part[m][d][side]
                        if Perturbation(direction, sign) == mine:
                            assert torch.equal(got, whole[m][d][side]), (mine, m, d)
                        else:
                            assert got is None, (mine, m, d, side)
        for d, seed in enumerate(seeds):  # every process commits every direction, from the whole step's losses
            plus = sum(whole[m][d][0].item() for m in range(CHUNKS))
            minus = sum(whole[m][d][1].item() for m in range(CHUNKS))
            g = (plus - minus) / (CHUNKS * (EPS if one_sided else 2 * EPS))
            for e in engines:
                e.commit(step, g / Q, [0.05], [0.01], seed)
    for e in engines:
        e.detach()
    params = [dict(m.named_parameters()) for m in models]
    for name, p in params[0].items():
        assert not torch.equal(p, dict(start.named_parameters())[name]), name
        assert all(torch.equal(p, other[name]) for other in params[1:]), name


def test_perturbation_parallel_a_share_draws_only_its_own_directions():
    model, batch = tiny_models.build("llama")
    engine = _engine(model)
    with torch.no_grad():
        (plus, minus), (other_plus, other_minus) = engine.run_chunks(
            lambda key: tiny_models.loss(model, batch), 0, EPS, [SEED, SEED + 1], 1,
            perturbations=[Perturbation(1, -1)])[0]
    names = {name for name in engine.device_bytes() if name.startswith("scratch/")}
    assert engine.streamer.bytes_uploaded == sum(u.nbytes for u in engine.units)  # each block once, as always
    engine.detach()
    assert (plus, minus, other_plus) == (None, None, None) and other_minus is not None
    assert names == {"scratch/z", "scratch/P"}  # one z buffer: direction 1's, not both


def test_perturbation_parallel_shares_of_a_trial_and_refusals():
    model, batch = tiny_models.build("opt")
    whole_model = copy.deepcopy(model)
    whole, part = _engine(whole_model), _engine(model)
    fn = lambda m: (lambda key: tiny_models.loss(m, batch))  # noqa: E731
    commits = [whole.candidate(0, 3.0, [0.05], [0.0], SEED)]
    with torch.no_grad():
        expected = whole.run_trial(fn(whole_model), commits)[0]
        got = part.run_trial(fn(model), commits, perturbations=TRIAL_PERTURBATIONS[2:])[0]
        nothing = part.run_trial(fn(model), commits, perturbations=[])
        with pytest.raises(ValueError, match="not among this step's runs"):
            part.run_chunks(fn(model), 0, EPS, [SEED], 1, perturbations=[Perturbation(1, +1)])
    assert got[:2] == (None, None) and torch.equal(got[2], expected[2])
    assert nothing == [(None, None, None)]
    whole.detach()
    part.detach()
