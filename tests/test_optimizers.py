"""The ZO optimizer family: each variant's step equals a plain-torch implementation of its rule, same z."""

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from tests import reference, tiny_models
from tests.lit_helpers import (SEED, TinyTask, TwoGroupTask, assert_params_equal, clone_model, loader,
                               resume_against_uninterrupted, trainer)
from zo2_lightning import ZO2OffloadStrategy, ZOSGD, ZOAdam, ZOSGDCons, ZOSGDMomentum, ZOSGDSign
from zo2_lightning.engine import draw_direction

EPS = 1e-3


def _task(optimizer_cls, **opt_kwargs):
    return TinyTask("llama", lr=5e-3, eps=EPS, optimizer=optimizer_cls, **opt_kwargs)


@pytest.mark.parametrize(
    "optimizer_cls,opt_kwargs,ref_kwargs",
    [
        (ZOSGD, {"direction": "rademacher"}, {"distribution": "rademacher"}),
        (ZOSGDSign, {}, {"sign": True}),
        (ZOSGDSign, {"q": 2, "direction": "rademacher"}, {"sign": True, "q": 2, "distribution": "rademacher"}),
    ],
    ids=["rademacher", "sign", "sign-q2-rademacher"],
)
def test_variant_steps_equal_their_plain_torch_rule(optimizer_cls, opt_kwargs, ref_kwargs):
    batches = tiny_models.batches("llama", 3)
    task = _task(optimizer_cls, **opt_kwargs)
    expected, initial = clone_model(task), clone_model(task)
    trainer(max_steps=3).fit(task, loader(batches))
    reference.mezo_reference(expected, batches, tiny_models.loss, seed=SEED, eps=EPS, lr=5e-3, **ref_kwargs)
    assert_params_equal(task.model, expected, initial)


def test_rademacher_directions_are_plus_or_minus_one_and_balanced():
    z = draw_direction(torch.empty(100_000), 7, torch.Generator(), "rademacher")
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(z.mean().item()) < 0.02


def test_an_unknown_direction_distribution_is_refused():
    with pytest.raises(ValueError, match="rademacher"):
        ZOSGD(torch.nn.Linear(2, 2).parameters(), direction="uniform")


# ---------------------------------------------------------------------------------------- stateful rules
def _torch_sgd_momentum(params):
    return torch.optim.SGD(params, lr=5e-3, momentum=0.9, weight_decay=0.01, foreach=False)


def _torch_adam(params):
    return torch.optim.Adam(params, lr=5e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01, foreach=False)


STATEFUL = [
    (ZOSGDMomentum, {"momentum": 0.9, "weight_decay": 0.01}, _torch_sgd_momentum),
    (ZOAdam, {"betas": (0.8, 0.99), "adam_eps": 1e-6, "weight_decay": 0.01}, _torch_adam),
]


@pytest.mark.parametrize("optimizer_cls,opt_kwargs,torch_opt", STATEFUL, ids=["momentum", "adam"])
def test_stateful_variants_equal_torch_optim_stepping_on_g_times_z(optimizer_cls, opt_kwargs, torch_opt):
    """3 streamed steps (host copies, deferred updates) == torch.optim.SGD(momentum) / Adam with p.grad = g * z."""
    batches = tiny_models.batches("llama", 3)
    task = _task(optimizer_cls, **opt_kwargs)
    expected, initial = clone_model(task), clone_model(task)
    trainer(max_steps=3).fit(task, loader(batches))
    reference.mezo_reference(expected, batches, tiny_models.loss, seed=SEED, eps=EPS, lr=5e-3,
                             torch_optimizer=torch_opt)
    assert_params_equal(task.model, expected, initial)


def test_adam_with_param_groups_of_their_own_lr_equals_torch_adam():
    batches = tiny_models.batches("qwen2", 2)

    task = TwoGroupTask("qwen2", ZOAdam)
    expected = clone_model(task)
    trainer(max_steps=2).fit(task, loader(batches))

    def torch_adam(params):  # the same grouping, in seed_index order
        names = {id(p): n for n, p in expected.named_parameters()}
        body = [p for p in params if "layers" in names[id(p)]]
        head = [p for p in params if "layers" not in names[id(p)]]
        return torch.optim.Adam([{"params": body}, {"params": head, "lr": 2e-3}], lr=1e-2, foreach=False)

    reference.mezo_reference(expected, batches, tiny_models.loss, seed=SEED, eps=EPS, lr=0.0,
                             torch_optimizer=torch_adam)
    assert_params_equal(task.model, expected)


def test_adam_fit_2_checkpoint_resume_2_equals_fit_4_bitwise(tmp_path):
    """The moments and the update count travel in the checkpoint: resuming continues Adam exactly."""
    resumed, uninterrupted, initial, saved = resume_against_uninterrupted(
        lambda: _task(ZOAdam), tiny_models.batches("llama", 2), tmp_path)
    assert saved["rule_state"]["rule"] == "adam" and saved["rule_state"]["updates"] == 2
    assert_params_equal(resumed, uninterrupted, initial)


def test_resuming_with_another_rule_is_refused(tmp_path):
    batches = tiny_models.batches("opt", 2)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, filename="last")
    trainer(max_steps=1, enable_checkpointing=True, callbacks=[ckpt]).fit(_task(ZOAdam), loader(batches))
    with pytest.raises(ValueError, match="'adam' update rule"):
        trainer(max_steps=2).fit(_task(ZOSGDMomentum), loader(batches), ckpt_path=tmp_path / "last.ckpt")


def test_adam_with_disk_offload_writes_every_update_and_equals_torch_adam(tmp_path):
    batches = tiny_models.batches("gpt2", 3)
    task = _task(ZOAdam)
    expected = clone_model(task)
    strategy = ZO2OffloadStrategy(seed=SEED, offload_device="disk", offload_dir=str(tmp_path), disk_flush_every=8)
    trainer(strategy=strategy, max_steps=3).fit(task, loader(batches))
    reference.mezo_reference(expected, batches, tiny_models.loss, seed=SEED, eps=EPS, lr=5e-3,
                             torch_optimizer=lambda ps: torch.optim.Adam(ps, lr=5e-3, foreach=False))
    assert_params_equal(task.model, expected)


@pytest.mark.parametrize("optimizer_cls", [ZOSGDMomentum, ZOAdam])
def test_stateful_variants_refuse_q_above_one(optimizer_cls):
    with pytest.raises(ValueError, match="q=1"):
        optimizer_cls(torch.nn.Linear(2, 2).parameters(), q=2)


# ---------------------------------------------------------------------------------------- one-sided, Cons
@pytest.mark.parametrize("q", [1, 2])
def test_one_sided_estimate_equals_the_forward_difference(q):
    batches = tiny_models.batches("opt", 3)
    task = _task(ZOSGD, one_sided=True, q=q)
    expected, initial = clone_model(task), clone_model(task)
    trainer(max_steps=3).fit(task, loader(batches))
    reference.mezo_reference(expected, batches, tiny_models.loss, seed=SEED, eps=EPS, lr=5e-3, q=q, one_sided=True)
    assert_params_equal(task.model, expected, initial)


def test_conservative_steps_equal_the_plain_torch_rule_and_take_every_branch():
    """Cons keeps the best of (step, none, reversed) on the batch; a large lr makes all three happen."""
    batches = tiny_models.batches("llama", 8)

    task = TinyTask("llama", lr=LR_CONS, eps=EPS, weight_decay=0.01, optimizer=ZOSGDCons)
    expected = clone_model(task)
    trainer(max_steps=8).fit(task, loader(batches))
    choices: list[int] = []
    reference.mezo_reference(expected, batches, tiny_models.loss, seed=SEED, eps=EPS, lr=LR_CONS,
                             weight_decay=0.01, conservative=True, choices=choices)
    assert set(choices) == {1, 0, -1}, f"choices {choices}: the test would not cover every branch"
    assert_params_equal(task.model, expected)


LR_CONS = 0.05  # large enough that some steps overshoot (-1 or 0), small enough that some help (+1)


def test_conservative_steps_log_each_metric_once_from_the_plus_eps_run():
    """The trial forwards (step, none, reversed) must not log: each step's train_loss is the +eps run's L+."""
    logged: list[float] = []

    class Recording(TinyTask):
        def log(self, name, value, *args, **kwargs):
            if name == "train_loss":
                logged.append(float(value))
            super().log(name, value, *args, **kwargs)

    loss_plus: list[float] = []

    class LossPlus(Callback):
        def on_train_batch_end(self, trainer, module, *args):
            loss_plus.append(float(trainer.callback_metrics["zo/loss_plus"]))

    task = Recording("llama", lr=LR_CONS, eps=EPS, optimizer=ZOSGDCons)
    trainer(max_steps=3, callbacks=[LossPlus()]).fit(task, loader(tiny_models.batches("llama", 3)))
    assert len(loss_plus) == 3 and logged == loss_plus


def test_conservative_step_refuses_gradient_accumulation():
    task = _task(ZOSGDCons)
    with pytest.raises(ValueError, match="accumulate_grad_batches=1"):
        trainer(max_steps=1, accumulate_grad_batches=2).fit(task, loader(tiny_models.batches("opt", 2)))


def test_a_misspelt_optimizer_argument_is_an_error_not_a_param_group_key():
    with pytest.raises(TypeError, match="momentm"):
        ZOSGDMomentum(torch.nn.Linear(2, 2).parameters(), momentm=0.5)
    with pytest.raises(TypeError, match="momentum"):
        ZOSGD(torch.nn.Linear(2, 2).parameters(), momentum=0.9)
