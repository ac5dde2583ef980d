"""The ZO optimizer family: each variant's step equals a plain-torch implementation of its rule, same z."""

import pytest
import torch

from tests import reference, tiny_models
from tests.lit_helpers import SEED, TinyTask, assert_params_equal, clone_model, loader, trainer
from zo2_lightning import ZOSGD, ZOSGDSign
from zo2_lightning.engine import draw_direction

EPS = 1e-3


def _task(optimizer_cls, **opt_kwargs):
    class Task(TinyTask):
        def configure_optimizers(self):
            return optimizer_cls(self.parameters(), lr=5e-3, eps=EPS, **opt_kwargs)

    return Task("llama")


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
