"""Configurations that would silently do the wrong thing are refused with an error that names the fix."""

import lightning.pytorch as L
import pytest
import torch

from tests import tiny_models
from tests.lit_helpers import TinyTask, loader, trainer
from zo2_lightning import ZO2OffloadStrategy, ZOModule, ZOSGD
from zo2_lightning.engine import NoBlocksError


def _fit(task, **kwargs):
    trainer(max_steps=1, **kwargs).fit(task, loader(tiny_models.batches("opt", 1)))


@pytest.mark.parametrize("precision,needle", [("16-mixed", "GradScaler"), ("16-true", "overflow")])
def test_unsupported_precision_is_refused(precision, needle):
    # on CPU Lightning itself rewrites 16-mixed to bf16-mixed, so pass the plugin the GPU would get
    from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision

    plugin = MixedPrecision("16-mixed", "cuda") if precision == "16-mixed" else HalfPrecision("16-true")
    with pytest.raises(ValueError, match=needle) as err:
        _fit(TinyTask(), plugins=[plugin])
    assert "precision='bf16-true'" in str(err.value)


def test_16_mixed_on_cpu_is_replaced_by_bf16_mixed_before_the_strategy_sees_it():
    """What the README says happens where: on CPU Lightning swaps 16-mixed for bf16-mixed (with a warning), which
    the strategy supports, so the run trains; on a GPU the strategy refuses it (the test above)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    with pytest.warns(UserWarning, match="AMP with fp16 is not supported on CPU"):
        fit = trainer(max_steps=1, precision="16-mixed")
    assert isinstance(fit.precision_plugin, MixedPrecision) and fit.precision_plugin.precision == "bf16-mixed"
    fit.fit(TinyTask(), loader(tiny_models.batches("opt", 1)))
    assert fit.global_step == 1


def test_manual_optimization_is_refused():
    class Manual(TinyTask):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(ValueError, match="Remove `self.automatic_optimization = False`"):
        _fit(Manual())


def test_a_torch_optimizer_other_than_zosgd_is_refused():
    class WithSGD(TinyTask):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(TypeError, match=r"got: SGD.*zo2_lightning.ZOSGD"):
        _fit(WithSGD())


def test_a_lightning_module_without_zomodule_is_refused():
    class Plain(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_models.build("opt")[0]

        def training_step(self, batch, batch_idx):
            return tiny_models.loss(self.model, batch)

        def configure_optimizers(self):
            return ZOSGD(self.parameters())

    with pytest.raises(TypeError, match=r"class Plain\(ZOModule, L.LightningModule\)"):
        _fit(Plain())


class Mlp(ZOModule, L.LightningModule):
    """No repeated layer stack: one linear layer."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        scale = batch if isinstance(batch, torch.Tensor) and batch.dim() == 0 else 1.0
        return self.net(torch.ones(2, 4) * scale).mean()

    def configure_optimizers(self):
        return ZOSGD(self.parameters(), lr=1e-2)


def test_a_model_without_discoverable_blocks_is_refused():
    with pytest.raises(NoBlocksError, match="Override `zo_blocks"):
        _fit(Mlp())


def test_a_model_without_blocks_trains_resident_and_a_streamed_one_is_pointed_there():
    module = Mlp()
    before = module.net.weight.detach().clone()
    L.Trainer(strategy="zo2_resident", accelerator="cpu", devices=1, max_steps=2, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False).fit(
        module, torch.utils.data.DataLoader([torch.tensor(1.0), torch.tensor(2.0)], batch_size=None))
    assert not torch.equal(module.net.weight, before)  # trained with every parameter resident
    with pytest.raises(NoBlocksError, match="zo2_resident"):
        _fit(Mlp())


def test_backward_in_training_step_says_zo_needs_none():
    class Backward(TinyTask):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            loss.backward()
            return loss

    with pytest.raises(RuntimeError, match="needs no backward pass.*Remove `loss.backward\\(\\)`"):
        _fit(Backward())


def test_a_training_step_returning_none_is_refused():
    class ReturnsNone(TinyTask):
        def training_step(self, batch, batch_idx):
            tiny_models.loss(self.model, batch)

    with pytest.raises(ValueError, match="training_step returned None"):
        _fit(ReturnsNone())


def test_a_training_step_returning_a_non_scalar_is_refused():
    class PerExample(TinyTask):
        def training_step(self, batch, batch_idx):
            return self.model(**batch).logits.mean(dim=(1, 2))

    with pytest.raises(ValueError, match=r"got \(2,\).*loss.mean\(\)"):
        _fit(PerExample())


def test_parameters_are_untouched_when_a_step_fails():
    class Boom(TinyTask):
        def training_step(self, batch, batch_idx):
            raise RuntimeError("boom")

    task = Boom()
    before = {n: p.clone() for n, p in task.named_parameters()}
    with pytest.raises(RuntimeError, match="boom"):
        _fit(task)
    for n, p in task.named_parameters():
        assert torch.equal(p, before[n])
    assert all(not b._forward_pre_hooks for b in task.zo_blocks())


def test_unknown_offload_device_is_refused():
    with pytest.raises(ValueError, match="use 'cpu'"):
        ZO2OffloadStrategy(offload_device="nvme")


@pytest.mark.parametrize("kwargs,needle", [({"eps": 0.0}, "eps must be > 0"), ({"lr": -1.0}, "lr must be >= 0"),
                                           ({"weight_decay": -0.1}, "weight_decay must be >= 0")])
def test_bad_zosgd_hyperparameters_are_refused(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        ZOSGD(torch.nn.Linear(2, 2).parameters(), **kwargs)


def test_zosgd_step_outside_the_strategy_is_refused():
    opt = ZOSGD(torch.nn.Linear(2, 2).parameters())
    with pytest.raises(RuntimeError, match="strategy='zo2_offload'"):
        opt.step(lambda: 0.0)


@pytest.mark.parametrize("kwargs,needle", [({"lr": "abc"}, "optimizer.lr="), ({"eps": None}, "optimizer.eps=")])
def test_non_numeric_zosgd_hyperparameters_name_the_override(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        ZOSGD(torch.nn.Linear(2, 2).parameters(), **kwargs)


def test_non_numeric_strategy_options_name_the_override():
    with pytest.raises(ValueError, match=r"prefetch must be an integer, got 'abc'.*offload.prefetch="):
        ZO2OffloadStrategy(prefetch="abc")


def test_an_unknown_preset_or_option_is_named_in_the_error():
    with pytest.raises(ValueError, match="strategy='zo2_ofload'"):
        L.Trainer(strategy="zo2_ofload", accelerator="cpu", logger=False)
    with pytest.raises(TypeError, match="'prefech'"):
        ZO2OffloadStrategy(prefech=2)
