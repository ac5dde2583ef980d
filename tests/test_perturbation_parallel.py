"""Perturbation parallelism (DistZO2) and 2-D ZO parallelism on Lightning's launchers (CPU, gloo, forked ranks).

The ranks of a group see the same batch and z and split each step's perturbed runs (2 ranks, q=1: one makes the
+eps run, the other the -eps run); their losses meet in the step's one all-reduce. Groups are data-parallel with
each other. Select with ``-k perturbation_parallel``; the multi-process fits beyond the first are marked slow.
"""

import copy
import json

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tests import dist_helpers as dh
from tests.test_distributed import ATOL
from tests.test_distributed_order import SeenRows
from zo2_lightning import ZO2OffloadStrategy, ZOAdam, ZOSGD, ZOSGDCons
from zo2_lightning.engine import Perturbation
from zo2_lightning.engine.keys import TRIAL_PERTURBATIONS, step_perturbations
from zo2_lightning.strategy.collectives import share_of
from zo2_lightning.strategy.refusals import check_layout, check_step
from zo2_lightning.tasks import SyntheticDataModule

STEPS = 3
PAIR = {"perturbation_parallel": 2}


@pytest.fixture(autouse=True)
def _slow_only_when_asked(request):
    """pyproject's `slow` marker deselects nothing by itself: run these with `pytest -m slow`."""
    if request.node.get_closest_marker("slow") and "slow" not in (request.config.option.markexpr or ""):
        pytest.skip("slow: run with `pytest -m slow`")


def _runs(rank):
    """The (step, run) of every training_step call a rank made."""
    return [(step, tuple(key)) for step, key, _ in rank["record"]]


def _rows(rank):
    """The rows of the batch of each step a rank saw (its first run's)."""
    return {step: rows for step, _, rows in reversed(rank["record"])}


def _assert_equal_params(got, expected, initial=None):
    for name, p in got.items():
        if initial is not None:
            assert not torch.equal(p, dict(initial.named_parameters())[name]), f"{name} did not change"
        assert torch.equal(p, expected[name]), f"{name}: max diff {(p - expected[name]).abs().max()}"


# ---------------------------------------------------------------------------------------------- the default run
def test_perturbation_parallel_two_ranks_in_one_group_equal_one_process_bitwise(tmp_path):
    """One group of 2: rank 0 makes every +eps run, rank 1 every -eps run, on the same batch (Lightning's sampler
    shards by group: one shard), each logging with sync_dist; the step's one all-reduce carries 16 bytes."""
    task = dh.RunLog(model=dh.opt_model(), lr=dh.LR, eps=dh.EPS)
    initial = copy.deepcopy(task.model)
    data = dh.examples(6)
    ranks = dh.fit_ranks(tmp_path, task, dh.loader(data, 2), max_steps=STEPS, strategy_kwargs=PAIR)
    expected = dh.fit_one(dh.task(copy.deepcopy(initial)), dh.joint_loader(data, 2), max_steps=STEPS)
    assert _runs(ranks[0]) == [(t, (0, +1, 0)) for t in range(STEPS)]
    assert _runs(ranks[1]) == [(t, (0, -1, 0)) for t in range(STEPS)]
    assert _rows(ranks[0]) == _rows(ranks[1])
    for rank in ranks:
        _assert_equal_params(rank["params"], expected, initial)
        assert all(("all_reduce", 16) in calls for calls in rank["step_calls"])  # (L+, L-) in float64


def test_perturbation_parallel_shares_partition_every_step_and_trial():
    for runs in (step_perturbations(1), step_perturbations(2), step_perturbations(3, one_sided=True),
                 TRIAL_PERTURBATIONS):
        for size in range(1, len(runs) + 1):
            shares = [share_of(runs, size, member) for member in range(size)]
            assert [p for share in shares for p in share] == runs
    assert share_of(step_perturbations(1), 2, 0) == [Perturbation(0, +1)]  # the +eps run, then the -eps run
    assert share_of(step_perturbations(2), 2, 1) == [Perturbation(1, +1), Perturbation(1, -1)]  # one direction


def test_perturbation_parallel_refusals_name_the_fix():
    with pytest.raises(ValueError, match=r"Launch a multiple of 2 ranks, or set perturbation_parallel to one of"):
        check_layout(3, 2)
    check_layout(4, 2)
    trainer = type("T", (), {"accumulate_grad_batches": 1})()
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match=r"Use perturbation_parallel in \[1, 2\], or a q whose 2q runs 4 divides"):
        check_step(ZOSGD(params), trainer, 4, "shared", 4)
    with pytest.raises(ValueError, match=r"q \+ 1 = 3 perturbed runs .* Use perturbation_parallel in \[1, 3\]"):
        check_step(ZOSGD(params, q=2, one_sided=True), trainer, 2, "shared", 2)
    with pytest.raises(ValueError, match="directions='shared'"):  # two groups, each its own Adam update
        check_step(ZOAdam(params), trainer, 4, "independent", 2)
    check_step(ZOAdam(params), trainer, 4, "shared", 2)  # every rank gets every g: its state stays equal
    check_step(ZOSGDCons(params), trainer, 2, "independent", 2)  # one group: one set of directions
    with pytest.raises(ValueError, match="perturbation_parallel must be >= 1"):
        ZO2OffloadStrategy(perturbation_parallel=0)


def test_perturbation_parallel_on_one_process_is_the_single_device_run():
    data = dh.loader(dh.examples(4), 2)
    expected = dh.fit_one(dh.task(), data, max_steps=2)
    task = dh.task()
    trainer = L.Trainer(strategy=dh.strategy(start_method="popen", **PAIR), devices=1, max_steps=2, **dh.QUIET)
    with pytest.warns(UserWarning, match="perturbation_parallel=2 on one process: nothing to split"):
        trainer.fit(task, data)
    _assert_equal_params(dict(task.model.named_parameters()), expected)


# ---------------------------------------------------------------------------------------------- slow: more ranks
@pytest.mark.slow
@pytest.mark.parametrize("variant", [
    dict(optimizer=ZOSGDCons),  # the trial's 3 runs: (step) | (no step, reversed)
    dict(optimizer=ZOAdam),  # every rank gets every g: the moments evolve as on one process
    dict(one_sided=True),  # (+eps) | (theta)
    dict(q=2, micro_batches=2),  # direction 0's two runs | direction 1's, on both micro-batches
    dict(q=2, devices=4, perturbation_parallel=4),  # one run each
], ids=["cons", "adam", "one_sided", "q2_micro_batches", "q2_four_ranks"])
def test_perturbation_parallel_variants_in_one_group_equal_one_process_bitwise(variant, tmp_path):
    variant = dict(variant)
    devices = variant.pop("devices", 2)
    strategy_kwargs = {"perturbation_parallel": variant.pop("perturbation_parallel", 2)}
    if "micro_batches" in variant:
        strategy_kwargs["micro_batches"] = variant.pop("micro_batches")
    task = dh.RunLog(model=dh.opt_model(), lr=dh.LR, eps=dh.EPS, **variant)
    initial = copy.deepcopy(task.model)
    data = dh.examples(8)
    ranks = dh.fit_ranks(tmp_path, task, dh.loader(data, 2), devices=devices, max_steps=STEPS,
                         strategy_kwargs=strategy_kwargs)
    alone_kwargs = {k: v for k, v in strategy_kwargs.items() if k != "perturbation_parallel"}
    one = L.Trainer(strategy=dh.strategy(start_method="popen", **alone_kwargs), devices=1, max_steps=STEPS,
                    **dh.QUIET)
    alone = dh.task(copy.deepcopy(initial), **variant)
    one.fit(alone, dh.joint_loader(data, 2))
    expected = {n: p.detach() for n, p in alone.model.named_parameters()}
    made = [{key for step, key in _runs(rank) if step == 0} for rank in ranks]
    assert all(made) and sum(len(m) for m in made) == len(set().union(*made))  # the ranks split the step's runs
    for rank in ranks:
        _assert_equal_params(rank["params"], expected, initial)


@pytest.fixture(scope="module")
def two_by_two(tmp_path_factory):
    """4 ranks as 2 groups x 2, batch 2 per group (Lightning's DistributedSampler shards 8 examples by group: 2
    steps per epoch), float64, 4 steps."""
    task = dh.RunLog(model=dh.opt_model(), lr=dh.LR, eps=dh.EPS, weight_decay=0.01)
    initial = copy.deepcopy(task.model).double()
    ranks = dh.fit_ranks(tmp_path_factory.mktemp("two_by_two"), task, dh.loader(dh.examples(8), 2), devices=4,
                         max_steps=4, precision="64-true", strategy_kwargs=PAIR)
    return initial, ranks


@pytest.mark.slow
def test_perturbation_parallel_two_groups_of_two_equal_one_process_with_the_double_batch(two_by_two, tmp_path):
    initial, ranks = two_by_two
    rows = [_rows(r) for r in ranks]
    assert rows[0] == rows[1] and rows[2] == rows[3]  # a group shares its shard
    assert all(not {tuple(x) for x in rows[0][t]} & {tuple(x) for x in rows[2][t]} for t in rows[0])
    assert [_runs(r)[0][1] for r in ranks] == [(0, +1, 0), (0, -1, 0)] * 2
    for rank in ranks[1:]:
        _assert_equal_params(rank["params"], ranks[0]["params"])
    data = dh.examples(8)
    joint = dh.fit_one(dh.task(copy.deepcopy(initial), weight_decay=0.01), dh.joint_loader(data, 4), max_steps=4,
                       precision="64-true")
    for name, p in ranks[0]["params"].items():
        torch.testing.assert_close(p, joint[name], rtol=0, atol=ATOL, msg=name)
    start = dict(initial.named_parameters())
    assert min((p - start[n]).abs().max().item() for n, p in ranks[0]["params"].items()) > 1e3 * ATOL
    # the same global batch as 2 data-parallel ranks: the sum over ranks of (a, 0, b, 0) is a + b, bitwise
    data_parallel = dh.fit_ranks(tmp_path, dh.task(copy.deepcopy(initial).float(), weight_decay=0.01),
                                 dh.loader(data, 2), max_steps=4, precision="64-true")
    _assert_equal_params(ranks[0]["params"], data_parallel[0]["params"])


@pytest.mark.slow
def test_perturbation_parallel_collective_bytes_per_step_do_not_grow_with_the_model(tmp_path):
    """2 groups x 2 ranks, two model sizes: the same calls of the same sizes per step, one 16-byte all-reduce."""
    per_size = {}
    for hidden, layers in ((32, 3), (64, 6)):
        model = dh.opt_model(hidden, layers)
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        per_size[model_bytes] = dh.fit_ranks(tmp_path / str(hidden), dh.task(model), dh.loader(dh.examples(20), 2),
                                             devices=4, max_steps=5, strategy_kwargs=PAIR)
    (small, ranks_small), (large, ranks_large) = sorted(per_size.items())
    assert large > 6 * small
    for r in range(4):
        steps_small, steps_large = ranks_small[r]["step_calls"], ranks_large[r]["step_calls"]
        assert len(steps_large) == 4 and steps_small == steps_large
        for calls in steps_large:
            assert ("all_reduce", 16) in calls and sum(b for _, b in calls) <= 64
        assert max(ranks_large[r]["step_written"]) < 1024  # the kernel's count, gloo's sockets included
        assert max(ranks_large[r]["step_written"]) <= max(ranks_small[r]["step_written"]) + 64
        assert sum(b for _, b in ranks_large[r]["setup_calls"]) >= large  # the one weight sync, counted


@pytest.mark.slow
def test_perturbation_parallel_checkpoints_are_written_once_and_resume_under_another_layout(two_by_two, tmp_path):
    initial, full = two_by_two
    data = dh.loader(dh.examples(8), 2)  # 2 steps per epoch on 2 groups: the checkpoint closes epoch 0
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    dh.fit_ranks(tmp_path / "first", dh.task(copy.deepcopy(initial).float(), weight_decay=0.01), data, devices=4,
                 max_steps=2, precision="64-true", enable_checkpointing=True, callbacks=[ckpt],
                 plugins=[dh.RecordingIO()], strategy_kwargs=PAIR)
    path = tmp_path / "ckpt" / "step=2.ckpt"
    assert (tmp_path / "ckpt" / "writes.txt").read_text().split() == ["0"]
    entry = torch.load(path, weights_only=True)["zo2_lightning"]
    assert (entry["world_size"], entry["perturbation_parallel"], entry["directions"]) == (4, 2, "shared")
    # on 2 data-parallel ranks (the same 2 shards): bitwise; on one process with the double batch: to rounding
    resumed = dh.fit_ranks(tmp_path / "dp", dh.task(dh.fresh_fp64_model(), weight_decay=0.01), data, max_steps=4,
                           precision="64-true", ckpt_path=path)
    _assert_equal_params(resumed[0]["params"], full[0]["params"])
    alone = dh.fit_one(dh.task(dh.fresh_fp64_model(), weight_decay=0.01), dh.joint_loader(dh.examples(8), 4),
                       max_steps=4, precision="64-true", ckpt_path=path)
    for name, p in alone.items():
        torch.testing.assert_close(p, full[0]["params"][name], rtol=0, atol=ATOL, msg=name)


def _synthetic() -> SyntheticDataModule:
    return SyntheticDataModule(vocab_size=16, seq_len=8, num_train=12, num_val=2, batch_size=2, seed=3)


def _fit_builtin(out_dir, max_steps, devices, strategy_kwargs, **kwargs):
    out_dir.mkdir(parents=True)
    ranks = dh.fit_ranks(out_dir, dh.task(), _synthetic(), devices=devices, max_steps=max_steps,
                         callbacks=[SeenRows(out_dir), *kwargs.pop("callbacks", [])],
                         strategy_kwargs=strategy_kwargs, **kwargs)
    seen = [json.loads((out_dir / f"seen{r}.json").read_text()) for r in range(devices)]
    return [r["params"] for r in ranks], seen


@pytest.mark.slow
def test_perturbation_parallel_builtin_tasks_shard_by_group_and_resume_mid_epoch_on_data_parallel_ranks(tmp_path):
    """The built-in order on 2 groups x 2: a group's ranks see the same rows, the groups split each epoch; a
    mid-epoch checkpoint resumed on 2 data-parallel ranks sees, and ends with, what the 2 x 2 fit did."""
    params, seen = _fit_builtin(tmp_path / "full", 5, 4, PAIR)
    assert seen[0] == seen[1] and seen[2] == seen[3]
    data = _synthetic()
    data.setup()
    every_row = sorted(tuple(r) for r in data.sets["train"].tensors[0].tolist())
    shards = [[tuple(row) for epoch, rows in seen[r] if epoch == 0 for row in rows] for r in (0, 2)]
    assert sorted(shards[0] + shards[1]) == every_row
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    _fit_builtin(tmp_path / "first", 2, 4, PAIR, enable_checkpointing=True, callbacks=[ckpt])
    resumed_params, resumed_seen = _fit_builtin(tmp_path / "resumed", 5, 2, {},
                                                ckpt_path=tmp_path / "ckpt" / "step=2.ckpt")
    for r in range(2):
        assert resumed_seen[r] == seen[2 * r][2:], f"rank {r}"
        _assert_equal_params(resumed_params[r], params[0])


@pytest.mark.slow
def test_perturbation_parallel_refuses_a_world_size_that_is_not_a_multiple_of_the_group(tmp_path):
    with pytest.raises(Exception, match="not a multiple of 2"):
        dh.fit_ranks(tmp_path, dh.task(), dh.loader(dh.examples(6), 2), devices=3, max_steps=1, strategy_kwargs=PAIR)
