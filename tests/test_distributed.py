"""Distributed ZO on Lightning's DDP machinery (CPU, gloo): ranks exchange losses, never weights.

The fits fork their ranks (``start_method="fork"``: no re-import, about a second each); the launches a user
runs (popen, two "nodes", torchrun) start fresh interpreters and are marked slow.
"""

import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import RandomSampler

from tests import dist_helpers as dh
from tests import dist_script
from tests.lit_helpers import SEED
from zo2_lightning import ZO2OffloadStrategy, ZOAdam, ZOSGDCons

STEPS = 3
# 2 ranks with batch B against 1 rank with 2B, in float64: the one rounding that the reduction order cannot avoid
# is the core's float32 copy of each loss (refusals.scalar_loss). The mean of two ranks' rounded losses and the
# rounded loss of the joint batch differ by at most one float32 ulp (4.8e-7 near L = 4.2), so g by at most
# ulp / (2 eps), and a step moves a parameter by at most lr * ulp / (2 eps) * max|z| (< 6 here) more or less.
ATOL = STEPS * dh.LR * 4.8e-7 / (2 * dh.EPS) * 6  # about 4e-6; the data's own effect is some 0.05


@pytest.fixture(autouse=True)
def _slow_only_when_asked(request):
    """pyproject's `slow` marker deselects nothing by itself: run these with `pytest -m slow`."""
    if request.node.get_closest_marker("slow") and "slow" not in (request.config.option.markexpr or ""):
        pytest.skip("slow: run with `pytest -m slow`")


def _max_diff(a, b):
    return max((a[n] - b[n]).abs().max().item() for n in a)


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    """2 ranks x batch 2 (Lightning's DistributedSampler shards 12 examples), float64, 3 steps, shared z."""
    task = dh.task(weight_decay=0.01)
    initial = copy.deepcopy(task.model).double()
    ranks = dh.fit_ranks(tmp_path_factory.mktemp("shared"), task, dh.loader(dh.examples(12), 2), max_steps=STEPS,
                         precision="64-true")
    return initial, ranks


@pytest.fixture(scope="module")
def independent_run(tmp_path_factory):
    """2 ranks, independent directions, every rank on the same batches (no sampler), 3 steps."""
    task = dh.task()
    initial = copy.deepcopy(task.model)
    ranks = dh.fit_ranks(tmp_path_factory.mktemp("independent"), task, dh.loader(dh.examples(6), 2), max_steps=STEPS,
                         directions="independent", use_distributed_sampler=False)
    return initial, ranks


def test_two_ranks_with_batch_b_equal_one_rank_with_batch_2b(shared_run):
    initial, ranks = shared_run
    data = dh.examples(12)
    joint = dh.fit_one(dh.task(copy.deepcopy(initial), weight_decay=0.01), dh.joint_loader(data, 4),
                       max_steps=STEPS, precision="64-true")
    one_shard = dh.fit_one(dh.task(copy.deepcopy(initial), weight_decay=0.01), dh.joint_loader(data, 2),
                           max_steps=STEPS, precision="64-true")
    got = ranks[0]["params"]
    for name, p in got.items():
        torch.testing.assert_close(p, joint[name], rtol=0, atol=ATOL, msg=name)
    # the tolerance is far below what the other rank's examples change, and training moved every parameter past it
    assert _max_diff(joint, one_shard) > 1e4 * ATOL
    start = dict(initial.named_parameters())
    assert min((got[n] - start[n]).abs().max().item() for n in got) > 1e3 * ATOL


def test_two_ranks_on_the_same_batches_equal_one_rank_bitwise(tmp_path):
    task = dh.task()
    initial = copy.deepcopy(task.model)
    data = dh.loader(dh.examples(6), 2)  # without a DistributedSampler every rank iterates all of it
    rank0 = dh.fit_ranks(tmp_path, task, data, max_steps=STEPS, use_distributed_sampler=False)[0]["params"]
    expected = dh.fit_one(dh.task(copy.deepcopy(initial)), data, max_steps=STEPS)
    start = dict(initial.named_parameters())
    for name, p in rank0.items():
        assert not torch.equal(p, start[name]), name
        assert torch.equal(p, expected[name]), f"{name}: max diff {(p - expected[name]).abs().max()}"


@pytest.mark.parametrize("optimizer", [ZOAdam, ZOSGDCons], ids=["adam", "cons"])
def test_stateful_and_conservative_variants_on_two_ranks_equal_one_rank_bitwise(optimizer, tmp_path):
    """Adam's moments evolve identically on every rank; Cons's trial losses are reduced like L+ and L-."""
    task = dh.task(optimizer=optimizer)
    initial = copy.deepcopy(task.model)
    data = dh.loader(dh.examples(6), 2)
    rank0, rank1 = (r["params"] for r in dh.fit_ranks(tmp_path, task, data, max_steps=STEPS,
                                                      use_distributed_sampler=False))
    expected = dh.fit_one(dh.task(copy.deepcopy(initial), optimizer=optimizer), data, max_steps=STEPS)
    for name, p in rank0.items():
        assert torch.equal(p, expected[name]) and torch.equal(p, rank1[name]), name
    assert any(not torch.equal(p, dict(initial.named_parameters())[n]) for n, p in rank0.items())


def test_independent_directions_refuse_stateful_variants(tmp_path):
    with pytest.raises(Exception, match="directions='shared'"):
        dh.fit_ranks(tmp_path, dh.task(optimizer=ZOAdam), dh.loader(dh.examples(4), 2), max_steps=1,
                     directions="independent", use_distributed_sampler=False)


@pytest.mark.parametrize("run", ["shared_run", "independent_run"])
def test_parameters_are_bitwise_identical_across_ranks(run, request):
    initial, (rank0, rank1) = request.getfixturevalue(run)
    start = dict(initial.named_parameters())
    for name, p in rank0["params"].items():
        assert not torch.equal(p, start[name]), f"{name} did not change: the test would prove nothing"
        assert torch.equal(p, rank1["params"][name]), f"{name}: ranks differ by {(p - rank1['params'][name]).abs().max()}"


def test_collective_bytes_per_step_do_not_grow_with_the_model(tmp_path):
    per_size = {}
    for hidden, layers in ((32, 3), (64, 6)):
        model = dh.opt_model(hidden, layers)
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        ranks = dh.fit_ranks(tmp_path / str(hidden), dh.task(model), dh.loader(dh.examples(12), 2), max_steps=5)
        for rank in ranks:
            assert len(rank["step_calls"]) == 4  # full steps between consecutive batch starts
            assert sum(b for _, b in rank["setup_calls"]) >= model_bytes  # the one weight sync, counted
        per_size[model_bytes] = ranks
    (small, ranks_small), (large, ranks_large) = sorted(per_size.items())
    assert large > 6 * small
    for r in range(2):
        steps_small, steps_large = ranks_small[r]["step_calls"], ranks_large[r]["step_calls"]
        assert steps_small == steps_large  # the same calls of the same sizes for a 7x larger model
        for calls in steps_large:
            assert ("all_reduce", 16) in calls  # the ZO step's (L+, L-) in float64: one collective, 16 bytes
            assert sum(b for _, b in calls) <= 64
        # the kernel's count of the bytes each rank wrote (gloo's sockets included) agrees: flat and small
        assert max(ranks_large[r]["step_written"]) < 1024
        assert max(ranks_large[r]["step_written"]) <= max(ranks_small[r]["step_written"]) + 64
    assert ranks_large[0]["setup_written"] >= large  # rank 0 sent the weights once: the counter sees sockets


@pytest.mark.parametrize("q", [1, 2])
def test_independent_directions_equal_one_process_with_n_times_q_directions(q, tmp_path, independent_run):
    if q == 1:
        initial, (rank0, _) = independent_run
    else:
        task = dh.task(q=q)
        initial = copy.deepcopy(task.model)
        rank0 = dh.fit_ranks(tmp_path, task, dh.loader(dh.examples(6), 2), max_steps=STEPS, directions="independent",
                             use_distributed_sampler=False)[0]
    assert all(("all_gather", 16 * q) in calls for calls in rank0["step_calls"])  # q (L+, L-) pairs per rank
    expected = dh.fit_one(dh.task(copy.deepcopy(initial), q=2 * q), dh.loader(dh.examples(6), 2), max_steps=STEPS)
    for name, p in rank0["params"].items():
        assert torch.equal(p, expected[name]), f"{name}: max diff {(p - expected[name]).abs().max()}"


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """Uninterrupted: 2 ranks, 4 steps. Interrupted: 2 ranks, 2 steps, checkpoint at step 2 (float64)."""
    root = tmp_path_factory.mktemp("resume")
    task = dh.task(weight_decay=0.01)
    initial = copy.deepcopy(task.model).double()
    data = dh.loader(dh.examples(8), 2)  # 2 steps per epoch on 2 ranks
    full = dh.fit_ranks(root / "full", task, data, max_steps=4, precision="64-true")
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    dh.fit_ranks(root / "first", dh.task(copy.deepcopy(initial), weight_decay=0.01), data, max_steps=2,
                 precision="64-true", enable_checkpointing=True, callbacks=[ckpt], plugins=[dh.RecordingIO()])
    return initial, full, root / "ckpt"


def test_checkpoints_are_written_once_by_rank_zero(checkpointed):
    _, _, ckpt_dir = checkpointed
    assert (ckpt_dir / "step=2.ckpt").exists()
    assert (ckpt_dir / "writes.txt").read_text().split() == ["0"]
    state = torch.load(ckpt_dir / "step=2.ckpt", weights_only=True)["zo2_lightning"]
    assert state["seed"] == SEED and state["world_size"] == 2 and state["directions"] == "shared"


def test_resume_on_two_ranks_equals_the_uninterrupted_run(checkpointed, tmp_path):
    _, full, ckpt_dir = checkpointed
    fresh = dh.task(dh.fresh_fp64_model(), weight_decay=0.01)
    resumed = dh.fit_ranks(tmp_path, fresh, dh.loader(dh.examples(8), 2), max_steps=4, precision="64-true",
                           ckpt_path=ckpt_dir / "step=2.ckpt")
    for r in range(2):
        for name, p in resumed[r]["params"].items():
            assert torch.equal(p, full[r]["params"][name]), f"rank {r} {name}"


def test_a_two_rank_checkpoint_resumes_on_one_rank_with_the_double_batch(checkpointed):
    initial, full, ckpt_dir = checkpointed
    got = dh.fit_one(dh.task(dh.fresh_fp64_model(), weight_decay=0.01), dh.joint_loader(dh.examples(8), 4),
                     max_steps=4, precision="64-true", ckpt_path=ckpt_dir / "step=2.ckpt")
    start = dict(initial.named_parameters())
    for name, p in got.items():
        torch.testing.assert_close(p, full[0]["params"][name], rtol=0, atol=ATOL, msg=name)
    assert _max_diff(got, {n: start[n] for n in got}) > 1e4 * ATOL


def test_disk_offload_gives_every_rank_its_own_block_files(tmp_path):
    task = dh.task()
    initial = copy.deepcopy(task.model)
    data = dh.loader(dh.examples(6), 2)
    on_disk = {"offload_device": "disk", "offload_dir": str(tmp_path / "blocks")}
    rank0, rank1 = (r["params"] for r in dh.fit_ranks(tmp_path / "out", task, data, max_steps=STEPS,
                                                       use_distributed_sampler=False, strategy_kwargs=on_disk))
    assert sorted(p.name for p in (tmp_path / "blocks").iterdir()) == ["rank0", "rank1"]
    assert all(any((tmp_path / "blocks" / f"rank{r}").iterdir()) for r in range(2))
    expected = dh.fit_one(dh.task(copy.deepcopy(initial)), data, max_steps=STEPS)
    for name, p in rank0.items():
        assert torch.equal(p, rank1[name]) and torch.equal(p, expected[name]), name


def test_one_process_keeps_the_users_sampler_and_starts_no_process_group():
    task = dh.task()
    data = dh.examples(4)
    trainer = L.Trainer(strategy=dh.strategy(start_method="popen"), devices=1, max_steps=2, **dh.QUIET)
    trainer.fit(task, torch.utils.data.DataLoader(data, batch_size=2, shuffle=True))
    assert isinstance(trainer.train_dataloader.sampler, RandomSampler)
    assert trainer.strategy.launcher is None
    assert not torch.distributed.is_initialized()


def test_an_unknown_direction_mode_is_refused():
    with pytest.raises(ValueError, match="use 'shared'"):
        ZO2OffloadStrategy(directions="per-rank")


@pytest.mark.slow
def test_spawned_ranks_end_where_forked_ranks_end(shared_run, tmp_path):
    initial, forked = shared_run
    spawned = dh.fit_ranks(tmp_path, dh.task(copy.deepcopy(initial).float(), weight_decay=0.01),
                           dh.loader(dh.examples(12), 2), max_steps=STEPS, precision="64-true", start_method="spawn")
    for r in range(2):
        for name, p in spawned[r]["params"].items():
            assert torch.equal(p, forked[r]["params"][name]), f"rank {r} {name}"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(how, out_dir):
    cwd = Path(__file__).resolve().parents[1]  # `python -m tests.dist_script` from the repository root
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    module = ["-m", "tests.dist_script", str(out_dir)]
    if how == "popen":
        return [subprocess.Popen([sys.executable, *module, "--devices", "2"], env=env, cwd=cwd)]
    if how == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               env["MASTER_PORT"], *module, "--devices", "2"]
        return [subprocess.Popen(cmd, env=env, cwd=cwd)]
    return [subprocess.Popen([sys.executable, *module, "--devices", "1", "--num-nodes", "2"],
                             env={**env, "NODE_RANK": str(node)}, cwd=cwd) for node in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["popen", "two_nodes", "torchrun"])
def test_the_registered_name_launches_like_ddp(how, tmp_path):
    procs = _launch(how, tmp_path)
    assert all(p.wait(timeout=300) == 0 for p in procs)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False)["params"] for r in range(2))
    data = dh.examples(dist_script.EXAMPLES)
    joint = dh.fit_one(dh.task(), dh.joint_loader(data, 2 * dist_script.PER_RANK_BATCH, seed=SEED),
                       max_steps=dist_script.STEPS, precision="64-true")
    for name, p in rank0.items():
        assert torch.equal(p, rank1[name]), name
        torch.testing.assert_close(p, joint[name], rtol=0, atol=ATOL, msg=name)
