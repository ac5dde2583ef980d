"""In-memory references of the ZO methods after MeZO, in plain torch, written from each paper's algorithm.

``method_reference(model, batches, loss_fn, method=Method.hizoo(alpha=0.3), seed=0, eps=1e-3, lr=1e-3)``

Like :func:`tests.reference.mezo_reference`, these share only the specification of z with the engine: the seeds
(``derive_seed`` over the (unit, tensor) numbering of :func:`tests.reference.seed_index`), LOZO's seed tag for V,
and the order of the floating-point operations each method's docstring states. Perturbed forwards go through
``functional_call`` on substituted tensors; nothing is streamed, deferred or packed. fp32 models only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from tests.reference import _Call, directions, perturbed_loss, seed_index
from zo2_lightning.engine import derive_seed, direction_seed
from zo2_lightning.methods.lozo import LOZO_V_TAG

Z = dict[str, torch.Tensor]


@dataclass
class Method:
    """One method's choices: how z is drawn, what the runs perturb along, and the update."""

    name: str
    params: dict = field(default_factory=dict)

    @staticmethod
    def hizoo(alpha: float) -> Method:
        return Method("hizoo", {"alpha": alpha})

    @staticmethod
    def lozo(rank: int, interval: int, momentum: float | None = None) -> Method:
        return Method("lozo", {"rank": rank, "interval": interval, "beta": momentum})

    @staticmethod
    def sparse(sparsity: float) -> Method:
        return Method("sparse", {"sparsity": sparsity})

    @staticmethod
    def fzoo(n: int) -> Method:
        return Method("fzoo", {"n": n})


def _normal(shape: Sequence[int], seed: int) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


def lozo_factors(shape: torch.Size, seed: int, step: int, unit: int, j: int, rank: int, interval: int,
                 period: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """LOZO's U (m x r, the step's) and V (n x r, the interval's): Gaussian from their own seeds."""
    m, n = shape[0], math.prod(shape[1:])
    period = step // interval if period is None else period
    return (_normal((m, rank), derive_seed(seed, step, unit, j)),
            _normal((n, rank), derive_seed(seed, period, unit, LOZO_V_TAG + j)))


def lozo_directions(model: nn.Module, seed: int, step: int, index: dict, rank: int, interval: int) -> Z:
    """z = U V^T for matrices, MeZO's Gaussian z for vectors."""
    params = dict(model.named_parameters())
    z = directions(model, seed, step, index)
    for n, (unit, j) in index.items():
        if params[n].dim() >= 2:
            u, v = lozo_factors(params[n].shape, seed, step, unit, j, rank, interval)
            z[n] = (u @ v.t()).view(params[n].shape)
    return z


@torch.no_grad()
def method_reference(model: nn.Module, batches: Sequence[dict], loss_fn: Callable, *, method: Method, seed: int,
                     eps: float, lr: float, weight_decay: float = 0.0, q: int = 1) -> list[tuple[float, ...]]:
    """Run ``method`` in place on ``model`` (eval mode), one step per batch; returns the losses of each step."""
    model.eval()
    index = seed_index(model)
    params = dict(model.named_parameters())
    state: dict[str, torch.Tensor] = {}
    history = []
    p = method.params
    if method.name == "hizoo":
        state = {n: torch.ones_like(params[n]) for n in index}
    if method.name == "sparse":  # thresholds from the weights before training: the (1 - s) quantile of |theta|
        for n in index:
            a = params[n].detach().abs().reshape(-1)
            state[n] = a.kthvalue(max(1, round((1.0 - p["sparsity"]) * a.numel()))).values
    for step, batch in enumerate(batches):
        if method.name == "fzoo":
            history.append(_fzoo_step(model, batch, loss_fn, params, index, seed, step, eps, lr, weight_decay,
                                      p["n"]))
            continue
        updates = []
        for d in range(q):
            dseed = direction_seed(seed, d)
            if method.name == "lozo":
                z = lozo_directions(model, dseed, step, index, p["rank"], p["interval"])
            else:
                z = directions(model, dseed, step, index)
            if method.name == "hizoo":
                along = {n: z[n] / torch.sqrt(state[n]) for n in index}
            elif method.name == "sparse":
                along = {n: z[n] * (params[n].abs() <= state[n]) for n in index}
            else:
                along = z
            lp = perturbed_loss(model, batch, loss_fn, along, eps).item()
            lm = perturbed_loss(model, batch, loss_fn, along, -eps).item()
            g = (lp - lm) / (2 * eps)
            losses = (lp, lm)
            if method.name == "hizoo":
                l0 = loss_fn(model, batch).item()
                losses = (lp, lm, l0)
                curvature = abs(lp + lm - 2.0 * l0) / (2.0 * eps * eps)
                for n in index:  # the Hessian first (with the old H's z), then the step with the new H
                    state[n] = (1.0 - p["alpha"]) * state[n] + state[n] * z[n] * z[n] * (p["alpha"] * curvature)
                    z[n] = z[n] / torch.sqrt(state[n])
            history.append(losses)
            updates.append((g / q if q > 1 else g, dseed, z))
        for g, dseed, z in updates:
            for n, (unit, j) in index.items():
                w = params[n]
                if method.name == "lozo" and p["beta"] is not None:
                    w.data = _lozo_m(w, z[n], g, state, n, dseed, step, unit, j, p, lr, weight_decay)
                elif method.name == "sparse":
                    w.data = w - lr * ((g * z[n] + weight_decay * w) * (w.abs() <= state[n]))
                else:
                    w.data = w - lr * (g * z[n] + weight_decay * w)
    return history


def _lozo_m(w, z, g, state, n, seed, step, unit, j, p, lr, weight_decay):
    """LOZO-M: momentum of the U factor (of z itself for a vector), carried onto a resampled V."""
    beta, first = p["beta"], n not in state
    if w.dim() < 2:
        state[n] = g * z if first else beta * state[n] + (1.0 - beta) * (g * z)
        return w - lr * (state[n] + weight_decay * w)
    u, v = lozo_factors(w.shape, seed, step, unit, j, p["rank"], p["interval"])
    if first:
        state[n] = g * u
    elif step % p["interval"] == 0:
        _, old = lozo_factors(w.shape, seed, step, unit, j, p["rank"], p["interval"], period=step // p["interval"] - 1)
        state[n] = (state[n] @ (old.t() @ v)) * (beta / v.shape[0]) + (1.0 - beta) * (g * u)
    else:
        state[n] = beta * state[n] + (1.0 - beta) * (g * u)
    return w - lr * ((state[n] @ v.t()).view_as(w) + weight_decay * w)


def _fzoo_step(model, batch, loss_fn, params, index, seed, step, eps, lr, weight_decay, n_dirs):
    """FZOO: N one-sided Rademacher losses, L0, sigma = their population deviation, then the N updates in turn."""
    zs = [directions(model, direction_seed(seed, d), step, index, "rademacher") for d in range(n_dirs)]
    perturbed = [perturbed_loss(model, batch, loss_fn, z, eps).item() for z in zs]
    l0 = loss_fn(_Call(model, dict(model.named_parameters())), batch).item()
    mean = sum(perturbed) / n_dirs
    sigma = math.sqrt(sum((x - mean) ** 2 for x in perturbed) / n_dirs)
    for lp, z in zip(perturbed, zs):
        c = (lp - l0) / sigma / n_dirs
        for n in index:
            w = params[n]
            w.data = w - lr * (c * z[n] + weight_decay * w)
    return (*perturbed, l0)
