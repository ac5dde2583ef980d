"""The strategy's step is MeZO: the SPSA identity, N steps against the in-memory reference, lr=0, logging."""

import glob

import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger

from tests import reference, tiny_models
from tests.lit_helpers import SEED, TinyTask, TwoGroupTask, assert_params_equal, clone_model, loader, trainer
from zo2_lightning import ZOSGD

EPS = 1e-3


def test_one_step_satisfies_the_spsa_identity():
    task = TinyTask("llama", lr=1e-2)
    before = clone_model(task)
    batch = tiny_models.batches("llama", 1)[0]
    trainer(max_steps=1).fit(task, loader([batch]))

    index = reference.seed_index(before)
    z = reference.directions(before, SEED, step=0, index=index)
    l_plus = reference.perturbed_loss(before, batch, tiny_models.loss, z, EPS).item()
    l_minus = reference.perturbed_loss(before, batch, tiny_models.loss, z, -EPS).item()
    g = (l_plus - l_minus) / (2 * EPS)
    assert g != 0.0
    old, new = dict(before.named_parameters()), dict(task.model.named_parameters())
    for name in index:
        assert torch.equal(new[name], old[name] - 1e-2 * (g * z[name])), name


@pytest.mark.parametrize("force_copies", [False, True], ids=["in-place", "copied"])
@pytest.mark.parametrize("arch", ["opt", "t5", "roberta"])
def test_n_steps_equal_the_in_memory_reference(arch, force_copies):
    batches = tiny_models.batches(arch, 4)
    task = TinyTask(arch, lr=5e-3, weight_decay=0.1)
    expected, initial = clone_model(task), clone_model(task)
    trainer(force_copies=force_copies, max_steps=4).fit(task, loader(batches))
    reference.mezo_reference(expected, batches, tiny_models.loss, seed=SEED, eps=EPS, lr=5e-3, weight_decay=0.1)
    assert_params_equal(task.model, expected, initial)


def test_frozen_parameters_are_neither_perturbed_nor_updated():
    batches = tiny_models.batches("gpt2", 3)
    task = TinyTask("gpt2", lr=5e-3)
    for name, p in task.model.named_parameters():
        p.requires_grad_(".mlp." in name)  # ZO on a subset, as MeZO-LoRA / head-only do
    expected = clone_model(task)
    frozen_before = {n: p.clone() for n, p in task.model.named_parameters() if not p.requires_grad}
    trainer(max_steps=3).fit(task, loader(batches))
    reference.mezo_reference(expected, batches, tiny_models.loss, seed=SEED, eps=EPS, lr=5e-3)
    assert_params_equal(task.model, expected)
    for n, p in task.model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n])


def test_param_groups_with_their_own_learning_rates():
    batches = tiny_models.batches("qwen2", 2)

    task = TwoGroupTask("qwen2", ZOSGD)
    expected = clone_model(task)
    trainer(max_steps=2).fit(task, loader(batches))
    lr_of = {n: (1e-2 if "layers" in n else 2e-3) for n, _ in expected.named_parameters()}
    reference.mezo_reference(expected, batches, tiny_models.loss, seed=SEED, eps=EPS, lr=0.0, lr_of=lr_of)
    assert_params_equal(task.model, expected)


@pytest.mark.parametrize(
    "dtype,precision",
    [(torch.float32, "32-true"), (torch.float32, "bf16-mixed"), (torch.bfloat16, "32-true"), (torch.float64, "64-true")],
)
def test_lr_zero_leaves_every_parameter_bitwise_unchanged(dtype, precision):
    task = TinyTask("mistral", lr=0.0, weight_decay=0.1)
    task.model.to(dtype)
    before = clone_model(task)
    trainer(max_steps=5, precision=precision).fit(task, loader(tiny_models.batches("mistral", 5)))
    assert_params_equal(task.model, before)
    assert all(p.dtype == dtype for p in task.model.parameters())


def test_scheduler_drives_lr_and_zo_metrics_reach_the_csv(tmp_path):
    batches = tiny_models.batches("opt", 4)
    sched = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))  # noqa: E731
    task = TinyTask("opt", lr=1e-2, scheduler=sched)
    expected = clone_model(task)
    logger = CSVLogger(tmp_path)
    trainer(max_steps=4, logger=logger, log_every_n_steps=1,
            callbacks=[LearningRateMonitor(logging_interval="step")]).fit(task, loader(batches))
    reference.mezo_reference(expected, batches, tiny_models.loss, seed=SEED, eps=EPS,
                             lr=[1e-2 / (1 + k) for k in range(4)])
    assert_params_equal(task.model, expected)
    (csv,) = glob.glob(str(tmp_path / "**" / "metrics.csv"), recursive=True)
    header = open(csv).readline().strip().split(",")
    for column in ("zo/loss_plus", "zo/loss_minus", "zo/projected_grad", "zo/lr", "lr-ZOSGD", "train_loss"):
        assert column in header
    rows = [dict(zip(header, line.strip().split(","))) for line in open(csv).readlines()[1:]]
    lrs = [float(r["zo/lr"]) for r in rows if r["zo/lr"]]
    assert lrs == pytest.approx([1e-2 / (1 + k) for k in range(4)])


def test_accumulation_averages_g_over_micro_batches_with_one_z():
    batches = tiny_models.batches("gpt_neox", 4)
    task = TinyTask("gpt_neox", lr=5e-3)
    expected = clone_model(task)
    trainer(max_steps=2, accumulate_grad_batches=2).fit(task, loader(batches))
    reference.mezo_reference(expected, batches, tiny_models.loss, seed=SEED, eps=EPS, lr=5e-3, micro_batches=2)
    assert_params_equal(task.model, expected)


def test_gradient_clip_val_clamps_the_projected_gradient():
    batches = tiny_models.batches("opt", 2)
    task = TinyTask("opt", lr=5e-3)
    expected = clone_model(task)
    trainer(max_steps=2, gradient_clip_val=1e-3).fit(task, loader(batches))
    history = reference.mezo_reference(expected, batches, tiny_models.loss, seed=SEED, eps=EPS, lr=5e-3, clip=1e-3)
    assert all(abs(g) == 1e-3 for _, _, g in history)  # the clamp was active at every step
    assert_params_equal(task.model, expected)


def test_gradient_clipping_by_value_clips_the_projected_gradient_as_by_norm_does():
    """For the scalar g the two algorithms are one clamp; Lightning's value pass over empty grads used to crash."""
    batches = tiny_models.batches("opt", 2)
    by_value = TinyTask("opt", lr=5e-3)
    by_norm = TinyTask("opt", lr=5e-3, model=clone_model(by_value))
    initial = clone_model(by_value)
    trainer(max_steps=2, gradient_clip_val=1e-3, gradient_clip_algorithm="value").fit(by_value, loader(batches))
    trainer(max_steps=2, gradient_clip_val=1e-3, gradient_clip_algorithm="norm").fit(by_norm, loader(batches))
    assert_params_equal(by_value.model, by_norm.model, initial)


def test_dropout_is_off_during_the_zo_forwards():
    cfg_model, _ = tiny_models.build("opt")
    cfg_model.config.dropout = 0.5
    from transformers import OPTForCausalLM

    torch.manual_seed(0)
    model = OPTForCausalLM(cfg_model.config)
    batches = tiny_models.batches("opt", 2)
    task = TinyTask(model=model, lr=5e-3)
    expected = clone_model(task)
    trainer(max_steps=2).fit(task, loader(batches))
    reference.mezo_reference(expected, batches, tiny_models.loss, seed=SEED, eps=EPS, lr=5e-3)
    assert_params_equal(task.model, expected)
    assert task.model.training  # train mode is given back after each step


def test_non_finite_loss_skips_the_update_and_warns():
    batches = tiny_models.batches("opt", 3)

    class NanAtStep1(TinyTask):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if self.trainer.global_step == 1 else loss

    task = NanAtStep1("opt", lr=5e-3)
    expected = clone_model(task)
    t = trainer(max_steps=3)
    with pytest.warns(UserWarning, match="non-finite loss at step 1"):
        t.fit(task, loader(batches))
    assert t.strategy.skipped_steps == 1
    # step 0 and step 2 applied, step 1 skipped: the reference run over steps 0 and 2 only
    reference.mezo_reference(expected, batches[:1], tiny_models.loss, seed=SEED, eps=EPS, lr=5e-3)
    reference.mezo_reference(expected, batches[2:], tiny_models.loss, seed=SEED, eps=EPS, lr=5e-3, start_step=2)
    assert_params_equal(task.model, expected)


def test_q_directions_average_q_two_point_estimates():
    batches = tiny_models.batches("llama", 2)

    task = TinyTask("llama", lr=5e-3, eps=EPS, q=3)
    expected, initial = clone_model(task), clone_model(task)
    trainer(max_steps=2).fit(task, loader(batches))
    history = reference.mezo_reference(expected, batches, tiny_models.loss, seed=SEED, eps=EPS, lr=5e-3, q=3)
    assert len({round(g, 6) for _, _, g in history}) == len(history)  # three different directions per step
    assert_params_equal(task.model, expected, initial)


def test_consecutive_non_finite_steps_stop_the_fit_with_the_likely_causes():
    class AlwaysNan(TinyTask):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) * float("inf")

    task = AlwaysNan("opt")
    before = clone_model(task)
    strategy = __import__("zo2_lightning").ZO2OffloadStrategy(seed=SEED, max_consecutive_skips=3)
    with pytest.warns(UserWarning, match="non-finite"), pytest.raises(FloatingPointError, match="lr too large"):
        trainer(strategy=strategy, max_steps=10).fit(task, loader(tiny_models.batches("opt", 10)))
    assert strategy.skipped_steps == 3
    assert_params_equal(task.model, before)
