"""The ZO methods after MeZO (HiZOO, LOZO, LOZO-M, Sparse MeZO, FZOO) on the streaming engine.

Each is held, bitwise, to the in-memory plain-torch reference of :mod:`tests.method_references` (written from its
paper's algorithm), across resume, the simulated asynchronous device, micro-batches against accumulation, 16-bit
storage and disk offload against the synchronous copies, and two ranks against one. Select one method with
``-k hizoo`` / ``-k lozo`` / ``-k sparse`` / ``-k fzoo``.
"""

import copy

import pytest
import torch

from tests import dist_helpers as dh
from tests import method_references as mr
from tests import tiny_models
from tests.lit_helpers import (SEED, TinyTask, assert_params_equal, clone_model, loader, resume_against_uninterrupted,
                               trainer, zo_strategy)
from zo2_lightning import FZOO, LOZO, LOZOM, HiZOO, SparseMeZO
from zo2_lightning.engine.rules import TensorKey
from zo2_lightning.methods import LOZORule, magnitude_threshold

EPS, LR, ARCH = 1e-3, 5e-3, "llama"

#: method -> (optimizer, its options, the reference's description)
METHODS = {
    "hizoo": (HiZOO, dict(hessian_smooth=0.3), mr.Method.hizoo(0.3)),
    "lozo": (LOZO, dict(rank=2, interval=2), mr.Method.lozo(2, 2)),
    "lozo_m": (LOZOM, dict(rank=2, interval=2, momentum=0.8), mr.Method.lozo(2, 2, 0.8)),
    "sparse": (SparseMeZO, dict(sparsity=0.5), mr.Method.sparse(0.5)),
    "fzoo": (FZOO, dict(q=4), mr.Method.fzoo(4)),
}
NAMES = list(METHODS)


def _task(name, **overrides):
    optimizer, options, _ = METHODS[name]
    return TinyTask(ARCH, lr=LR, eps=EPS, optimizer=optimizer, **{**options, **overrides})


@pytest.mark.parametrize("name", NAMES)
def test_method_streamed_steps_equal_the_plain_torch_reference(name):
    """5 streamed steps (host copies, deferred updates, lockstep runs) == the paper's algorithm in memory; with
    interval 2, LOZO resamples V twice and LOZO-M carries its momentum over twice."""
    batches = tiny_models.batches(ARCH, 5)
    task = _task(name)
    expected, initial = clone_model(task), clone_model(task)
    trainer(max_steps=5).fit(task, loader(batches))
    mr.method_reference(expected, batches, tiny_models.loss, method=METHODS[name][2], seed=SEED, eps=EPS, lr=LR)
    assert_params_equal(task.model, expected, initial)


@pytest.mark.parametrize("name", ["lozo", "sparse"])
def test_method_with_q2_equals_the_reference(name):
    batches = tiny_models.batches(ARCH, 3)
    task = _task(name, q=2, weight_decay=0.01)
    expected, initial = clone_model(task), clone_model(task)
    trainer(max_steps=3).fit(task, loader(batches))
    mr.method_reference(expected, batches, tiny_models.loss, method=METHODS[name][2], seed=SEED, eps=EPS, lr=LR,
                        q=2, weight_decay=0.01)
    assert_params_equal(task.model, expected, initial)


@pytest.mark.parametrize("name", NAMES)
def test_method_fit_2_checkpoint_resume_2_equals_fit_4_bitwise(name, tmp_path):
    """Every state the method keeps (HiZOO's Hessian, LOZO-M's momentum, the sparse thresholds) and everything it
    derives from the step (LOZO's V, FZOO's normalisation) survives a checkpoint and resume."""
    resumed, uninterrupted, initial, saved = resume_against_uninterrupted(
        lambda: _task(name), tiny_models.batches(ARCH, 2), tmp_path)
    optimizer, options, _ = METHODS[name]
    rule = optimizer(torch.nn.Linear(1, 1).parameters(), **options).update_rule()
    assert saved["rule_state"]["rule"] == rule.name and saved["rule_state"]["updates"] == 2 * options.get("q", 1)
    assert_params_equal(resumed, uninterrupted, initial)


def _fit(name, strategy, steps=3, batch_size=2, **trainer_kwargs):
    task = _task(name)
    initial = clone_model(task)
    trainer(strategy=strategy, max_steps=steps, **trainer_kwargs).fit(
        task, loader(tiny_models.batches(ARCH, steps * trainer_kwargs.get("accumulate_grad_batches", 1),
                                         batch_size=batch_size)))
    return task.model, initial


@pytest.mark.parametrize("name", NAMES)
def test_method_on_the_simulated_device_equals_synchronous_copies(name):
    """The asynchronous schedule (prefetch, a slot more than it needs, the rule's state travelling with each
    block) on the simulated device, two scheduler seeds, bitwise as the synchronous copies."""
    options = dict(prefetch=1, device_slots=3)
    expected, initial = _fit(name, zo_strategy(force_copies=True, **options))
    for seed in (0, 1):
        got, _ = _fit(name, zo_strategy(force_copies=False, simulated_device=seed, **options))
        assert_params_equal(got, expected, initial)


@pytest.mark.parametrize("name", NAMES)
def test_method_with_micro_batches_equals_gradient_accumulation(name):
    """micro_batches=2 (one residency per step for all runs of both halves) == accumulate_grad_batches=2."""
    split, initial = _fit(name, zo_strategy(micro_batches=2), batch_size=4)
    task = _task(name)
    task.model.load_state_dict(initial.state_dict())
    halves = [part for b in tiny_models.batches(ARCH, 3, batch_size=4)
              for part in ({k: v[:2] for k, v in b.items()}, {k: v[2:] for k, v in b.items()})]
    trainer(max_steps=3, accumulate_grad_batches=2).fit(task, loader(halves))
    assert_params_equal(split, task.model, initial)


@pytest.mark.parametrize("name", NAMES)
def test_method_with_bf16_storage_and_disk_offload_on_the_simulated_device(name, tmp_path):
    """16-bit host copies (stochastic rounding) in block files, every method's state beside them: the simulated
    device gives the synchronous copies' bits."""
    options = dict(storage_dtype="bf16", offload_device="disk")
    expected, initial = _fit(name, zo_strategy(offload_dir=str(tmp_path / "a"), **options))
    got, _ = _fit(name, zo_strategy(force_copies=False, simulated_device=3, offload_dir=str(tmp_path / "b"),
                                    **options))
    assert_params_equal(got, expected, initial)


@pytest.mark.parametrize("name", ["hizoo", "lozo_m", "fzoo"])
def test_method_on_two_ranks_equals_one_rank_bitwise(name, tmp_path):
    """Data parallel on gloo: the Hessian / momentum evolve identically on both ranks, FZOO normalises the same
    losses; both ranks end with the one-process parameters."""
    optimizer, options, _ = METHODS[name]
    task = dh.task(optimizer=optimizer, **options)
    initial = copy.deepcopy(task.model)
    data = dh.loader(dh.examples(6), 2)
    rank0, rank1 = (r["params"] for r in dh.fit_ranks(tmp_path, task, data, max_steps=3,
                                                      use_distributed_sampler=False))
    expected = dh.fit_one(dh.task(copy.deepcopy(initial), optimizer=optimizer, **options), data, max_steps=3)
    start = dict(initial.named_parameters())
    for n, p in rank0.items():
        assert torch.equal(p, expected[n]) and torch.equal(p, rank1[n]), n
    assert all(not torch.equal(p, start[n]) for n, p in rank0.items())


def test_hizoo_splits_its_three_runs_over_three_ranks_bitwise(tmp_path):
    """perturbation_parallel=3: L+, L- and L0 each on its own rank, (L+, L-, L0) reduced in one all-reduce."""
    optimizer, options, _ = METHODS["hizoo"]
    task = dh.task(optimizer=optimizer, **options)
    initial = copy.deepcopy(task.model)
    data = dh.examples(6)
    ranks = dh.fit_ranks(tmp_path, task, dh.loader(data, 2), devices=3, max_steps=3,
                         strategy_kwargs={"perturbation_parallel": 3})
    expected = dh.fit_one(dh.task(copy.deepcopy(initial), optimizer=optimizer, **options), dh.joint_loader(data, 2),
                          max_steps=3)
    for rank in ranks:
        for n, p in rank["params"].items():
            assert torch.equal(p, expected[n]), n


# ---------------------------------------------------------------------------------------------- what each does
def test_lozo_directions_have_rank_r_and_keep_v_for_an_interval():
    rule, gen = LOZORule(rank=2, interval=3), torch.Generator()

    def z(step):
        out = torch.empty(16, 12)
        rule.draw_(out, TensorKey(7, step, 0, 1), gen, "gaussian")
        return out

    assert torch.linalg.matrix_rank(z(0)).item() == 2
    row_space = lambda m: torch.linalg.svd(m).Vh[:2]  # noqa: E731 - V's span, the same while V is kept
    same = row_space(z(0)) @ row_space(z(2)).T  # cosines of the principal angles between the two spans
    other = row_space(z(0)) @ row_space(z(3)).T
    assert torch.allclose(torch.linalg.svdvals(same)[:2], torch.ones(2), atol=1e-4)
    assert torch.linalg.svdvals(other)[1] < 0.99
    vector = torch.empty(5)
    rule.draw_(vector, TensorKey(7, 0, 0, 2), gen, "gaussian")
    assert torch.linalg.vector_norm(vector) > 0  # vectors: MeZO's full z


def test_sparse_mezo_leaves_every_weight_above_its_threshold_untouched():
    task = _task("sparse", sparsity=0.8)
    initial = clone_model(task)
    trainer(max_steps=3).fit(task, loader(tiny_models.batches(ARCH, 3)))
    for (n, p), p0 in zip(task.model.named_parameters(), initial.parameters()):
        h = magnitude_threshold(p0, 0.8)
        big = p0.abs() > h
        assert torch.equal(p[big], p0[big]), n
        assert not torch.equal(p[~big], p0[~big]), n
        if p0.unique().numel() == p0.numel():  # (a norm's weights start equal: all at the threshold, all tuned)
            assert 0.15 < (~big).float().mean().item() < 0.3, n


def test_fzoo_steps_nowhere_when_its_losses_do_not_spread():
    opt = FZOO(torch.nn.Linear(2, 2).parameters(), q=3)
    assert opt.estimate({1: [(2.0, 1.0)], 2: [(2.0, 1.5)], 3: [(2.0, 0.5)]}) == {1: 0.0, 2: 0.0, 3: 0.0}
    g = opt.estimate({1: [(3.0, 2.0)], 2: [(1.0, 2.0)]})
    assert g == {1: 1.0, 2: -1.0}  # (L_i - L0) / population std of {3, 1}


@pytest.mark.parametrize("make,match", [
    (lambda ps: HiZOO(ps, q=2), "q=1"),
    (lambda ps: HiZOO(ps, one_sided=True), "central"),
    (lambda ps: HiZOO(ps, hessian_smooth=1.0), r"\[0, 1\)"),
    (lambda ps: LOZO(ps, rank=0), "rank must be an integer >= 1"),
    (lambda ps: LOZO(ps, interval=1.5), "interval must be an integer >= 1"),
    (lambda ps: LOZOM(ps, q=2), "q=1"),
    (lambda ps: LOZOM(ps, momentum=1.0), r"\[0, 1\)"),
    (lambda ps: SparseMeZO(ps, sparsity=1.0), "0.8"),
    (lambda ps: FZOO(ps, q=1), ">= 2"),
    (lambda ps: FZOO(ps, one_sided=False), "one-sided"),
], ids=["hizoo-q", "hizoo-one-sided", "hizoo-alpha", "lozo-rank", "lozo-interval", "lozo_m-q", "lozo_m-beta",
        "sparse-sparsity", "fzoo-q", "fzoo-central"])
def test_method_options_out_of_range_are_refused_naming_the_range(make, match):
    with pytest.raises(ValueError, match=match):
        make(torch.nn.Linear(2, 2).parameters())


@pytest.mark.parametrize("name,refused", [("hizoo", True), ("lozo_m", True), ("lozo", False), ("sparse", False),
                                          ("fzoo", False)])
def test_method_with_independent_directions_is_refused_only_where_its_state_follows_one_direction(name, refused):
    """HiZOO's Hessian and LOZO-M's momentum follow one direction per step; LOZO, FZOO and Sparse MeZO (whose
    thresholds never change) combine any number of directions, so each group may draw its own."""
    from zo2_lightning.strategy.refusals import check_step

    optimizer, options, _ = METHODS[name]
    trainer_stub = type("T", (), {"accumulate_grad_batches": 1})()
    opt = optimizer(torch.nn.Linear(2, 2).parameters(), **options)
    if refused:
        with pytest.raises(ValueError, match="directions='shared'"):
            check_step(opt, trainer_stub, 2, "independent")
    else:
        check_step(opt, trainer_stub, 2, "independent")
    check_step(opt, trainer_stub, 2, "shared")
