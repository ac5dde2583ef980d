"""The lockstep scheduler: per-run thread-local and RNG state, divergence, failures."""

import pytest
import torch
from torch import nn

from zo2_lightning.engine import LockstepDivergenceError, ZOEngine


class Stack(nn.Module):
    def __init__(self, n=3):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(n))
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x).mean()


def _engine(model):
    engine = ZOEngine(model, list(model.layers), torch.device("cpu"), seed=0)
    engine.attach([list(model.parameters())])
    return engine


def test_each_run_keeps_its_own_autocast_and_grad_state():
    model = Stack()
    engine = _engine(model)
    seen = {}

    def fn(key):
        sign = key[1]
        x = torch.randn(4, 8)
        if sign > 0:  # only the + run enters autocast, and the context spans block boundaries
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
        else:
            out = model(x)
        seen[sign] = (out.dtype, torch.is_autocast_enabled("cpu"), torch.is_grad_enabled())
        return out

    with torch.no_grad():
        engine.run_pair(fn, step=0, eps=1e-3)
    assert seen[1] == (torch.bfloat16, False, False)
    assert seen[-1] == (torch.float32, False, False)
    assert not torch.is_autocast_enabled("cpu") and torch.is_grad_enabled()
    engine.detach()


def test_both_runs_see_the_same_random_numbers_and_the_rng_moves_on_once():
    model = Stack()
    engine = _engine(model)
    draws = {}
    torch.manual_seed(5)

    def fn(key):
        sign = key[1]
        a = torch.rand(3)
        model(torch.ones(2, 8))
        draws[sign] = (a, torch.rand(3))
        return torch.zeros(())

    engine.run_pair(fn, step=0, eps=1e-3)
    after = torch.rand(3)
    torch.manual_seed(5)
    expect = (torch.rand(3), torch.rand(3))
    assert all(torch.equal(x, y) for x, y in zip(draws[1], expect))
    assert all(torch.equal(x, y) for x, y in zip(draws[-1], expect))
    assert torch.equal(after, torch.rand(3))  # as if training_step had run once
    engine.detach()


def test_sign_dependent_control_flow_is_reported():
    model = Stack()
    engine = _engine(model)

    def fn(key):
        sign = key[1]
        x = torch.ones(2, 8)
        layers = model.layers if sign > 0 else list(model.layers)[::-1]
        for layer in layers:
            x = layer(x)
        return x.sum()

    with pytest.raises(LockstepDivergenceError, match="diverged at block call 0"):
        engine.run_pair(fn, step=0, eps=1e-3)
    engine.detach()


def test_a_failing_run_leaves_no_perturbation_behind():
    model = Stack()
    before = {n: p.clone() for n, p in model.named_parameters()}
    engine = _engine(model)

    def fn(key):
        sign = key[1]
        model(torch.ones(2, 8))
        if sign < 0:
            raise KeyError("bad batch")
        return torch.zeros(())

    with pytest.raises(KeyError, match="bad batch"):
        engine.run_pair(fn, step=0, eps=1e-3)
    engine.detach()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
