"""An independent, in-memory MeZO in plain torch: the yardstick the engine and the strategy are held to.

``params = mezo_reference(model, batches, loss_fn, seed=0, eps=1e-3, lrs=[1e-3])``

It shares only the *specification* of z with the engine (``derive_seed`` and the (block, tensor) numbering:
blocks in ``discover_blocks`` order and tensors in ``parameters()`` order among the trainable ones; everything
else is the resident unit), and for 16-bit parameters that of the stochastic rounding (its function, chunk size
and seeds). Perturbed forwards go through ``torch.func.functional_call`` on copies; nothing
is streamed, deferred or packed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call

from zo2_lightning.engine import RESIDENT_UNIT, derive_seed, direction_seed, discover_blocks
from zo2_lightning.engine.rounding import stochastic_round
from zo2_lightning.engine import spsa as engine_spsa
from zo2_lightning.engine.spsa import HALF_DTYPES, HALF_TAG


def seed_index(model: nn.Module, trainable: set[int] | None = None,
               units: Sequence[nn.Module] | None = None) -> dict[str, tuple[int, int]]:
    """Parameter name -> (unit, tensor) for the trainable parameters (all with requires_grad by default); ``units``:
    the streamed units in order (default ``discover_blocks(model)``)."""
    names = {id(p): n for n, p in model.named_parameters()}
    is_trainable = (lambda p: id(p) in trainable) if trainable is not None else (lambda p: p.requires_grad)
    index: dict[str, tuple[int, int]] = {}
    in_blocks: set[int] = set()
    for b, block in enumerate(discover_blocks(model) if units is None else units):
        j = 0
        for p in block.parameters():
            in_blocks.add(id(p))
            if is_trainable(p) and names[id(p)] not in index:
                index[names[id(p)]] = (b, j)
                j += 1
    j = 0
    for n, p in model.named_parameters():
        if id(p) not in in_blocks and is_trainable(p):
            index[n] = (RESIDENT_UNIT, j)
            j += 1
    return index


def directions(
    model: nn.Module, seed: int, step: int, index: dict[str, tuple[int, int]], distribution: str = "gaussian"
) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    out = {}
    for n, (unit, j) in index.items():
        g = torch.Generator().manual_seed(derive_seed(seed, step, unit, j))
        shape, dtype = params[n].shape, params[n].dtype
        if distribution == "gaussian":
            out[n] = torch.randn(shape, generator=g, dtype=dtype)
        else:  # rademacher
            out[n] = (2 * torch.randint(0, 2, shape, generator=g) - 1).to(dtype)
    return out


@torch.no_grad()
def perturbed_loss(model: nn.Module, batch: dict, loss_fn, z: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    params = {n: p + scale * z[n] if n in z else p for n, p in model.named_parameters()}
    return loss_fn(_Call(model, params), batch)


class _Call:
    """Quacks like the model for loss_fn(model, batch), but calls it with substituted parameters."""

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor]) -> None:
        self._model, self._params = model, params

    def __call__(self, *args, **kwargs):
        return functional_call(self._model, self._params, args, kwargs)


@torch.no_grad()
def mezo_reference(
    model: nn.Module,
    batches: Sequence[dict],
    loss_fn,
    *,
    seed: int,
    eps: float,
    lr: float | Sequence[float],
    weight_decay: float = 0.0,
    start_step: int = 0,
    micro_batches: int = 1,
    clip: float | None = None,
    lr_of: dict[str, float] | None = None,
    q: int = 1,
    distribution: str = "gaussian",
    sign: bool = False,
    one_sided: bool = False,
    torch_optimizer=None,
    conservative: bool = False,
    choices: list[int] | None = None,
    units: Sequence[nn.Module] | None = None,
) -> list[tuple[float, float, float]]:
    """Run MeZO in place on ``model`` (eval mode); one step per ``micro_batches`` batches.

    Args:
        lr: one learning rate, or one per step (a schedule).
        clip: clamp g to [-clip, clip].
        lr_of: per-parameter-name learning rates (param groups); overrides ``lr``.
        q: directions per step (q-SPSA); direction k uses run seed ``direction_seed(seed, k)`` and the step
            applies ``-lr * (g_k / q) * z_k`` for k = 0..q-1 in turn.
        distribution: of z, ``"gaussian"`` or ``"rademacher"``.
        sign: ZO-SGD-Sign: the update uses sign(g) instead of g.
        one_sided: g = (L(theta + eps z) - L(theta)) / eps; L- in the history is then L(theta).
        torch_optimizer: ``params -> torch.optim.Optimizer`` (e.g. SGD with momentum, Adam; ``foreach=False``):
            the update is that optimizer's ``step()`` with ``p.grad = g * z`` (lr and weight decay are its own).
        conservative: ZO-SGD-Cons: the losses at theta - u, theta and theta + u (u = lr * (g z + wd theta)) on
            the step's batch decide which is kept (ties: the step, then none); the choice of each step is
            appended to ``choices`` as +1 / 0 / -1.
        units: the streamed units whose order numbers z (default ``discover_blocks(model)``).

    Returns:
        (L+, L-, g) per step, with g averaged over the micro-batches of the step.
    """
    model.eval()
    index = seed_index(model, units=units)
    params = dict(model.named_parameters())
    opt = torch_optimizer([params[n] for n in index]) if torch_optimizer is not None else None
    history = []
    for k in range(len(batches) // micro_batches):
        step = start_step + k
        step_lr = lr[k] if isinstance(lr, Sequence) else lr
        updates, seeds_of = [], {}
        for d in range(q):
            z = directions(model, direction_seed(seed, d), step, index, distribution)
            gs, lps, lms = [], [], []
            for batch in batches[k * micro_batches : (k + 1) * micro_batches]:
                lp = perturbed_loss(model, batch, loss_fn, z, eps).item()
                if one_sided:
                    lm = loss_fn(model, batch).item()
                    gs.append((lp - lm) / eps)
                else:
                    lm = perturbed_loss(model, batch, loss_fn, z, -eps).item()
                    gs.append((lp - lm) / (2 * eps))
                lps.append(lp)
                lms.append(lm)
            g = sum(gs) / len(gs)
            if clip is not None:
                g = max(-clip, min(clip, g))
            used = float((g > 0) - (g < 0)) if sign else g
            updates.append((used / q if q > 1 else used, z))
            seeds_of[id(z)] = direction_seed(seed, d)
            history.append((sum(lps) / len(lps), sum(lms) / len(lms), g))
        sign_of_lr = 1
        if conservative:  # q = 1: one update (g, z)
            (g, z), step_batch = updates[0], batches[(k + 1) * micro_batches - 1]
            losses = []
            for s in (+1, 0, -1):
                cand = {n: _sgd(params[n], z, g, s * (lr_of[n] if lr_of else step_lr), weight_decay, n)
                        for n in index} if s else {}
                losses.append(loss_fn(_Call(model, {**dict(model.named_parameters()), **cand}), step_batch).item())
            choice = min(zip(losses, (1, 0, -1)), key=lambda lc: lc[0])[1]
            choices.append(choice)
            updates, sign_of_lr = (updates if choice else []), choice or 1
        for g, z in updates:
            if opt is not None:
                for n in index:
                    params[n].grad = torch.mul(z[n], g)
                opt.step()
                continue
            for n in index:
                r = sign_of_lr * (lr_of[n] if lr_of is not None else step_lr)
                if params[n].dtype in HALF_DTYPES:
                    params[n].data = _sgd_half(params[n], z[n], g, r, weight_decay, seeds_of[id(z)], step, index[n])
                else:
                    params[n].data = _sgd(params[n], z, g, r, weight_decay, n)
    return history


def _sgd_half(p, z, g, r, weight_decay, seed, step, unit_tensor):
    """A 16-bit parameter's update: in fp32, chunk by chunk, each stochastically rounded back with the seed the
    engine's specification gives (zo2_lightning.engine.spsa.HALF_CHUNK / HALF_TAG)."""
    unit, j = unit_tensor
    flat, zf = p.detach().reshape(-1), z.reshape(-1)
    out = torch.empty_like(flat)
    chunk = engine_spsa.HALF_CHUNK  # read at call time: tests shrink it to exercise several chunks
    for i, start in enumerate(range(0, flat.numel(), chunk)):
        part = slice(start, start + chunk)
        theta, zz = flat[part].float(), zf[part].float()
        new = theta - r * (g * zz + weight_decay * theta) if weight_decay else theta - r * (g * zz)
        gen = torch.Generator().manual_seed(derive_seed(seed, step, unit, HALF_TAG + (j << 20) + i))
        out[part] = stochastic_round(new, p.dtype, gen)
    return out.view_as(p)


def _sgd(p: torch.Tensor, z: dict[str, torch.Tensor], g: float, r: float, weight_decay: float, n: str) -> torch.Tensor:
    return p - r * (g * z[n] + weight_decay * p) if weight_decay else p - r * (g * z[n])
