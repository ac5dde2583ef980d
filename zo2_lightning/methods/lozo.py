"""LOZO and LOZO-M (Chen et al., "Enhancing Zeroth-order Fine-tuning for Language Models with Low-rank
Structures", arXiv 2410.07698, Algorithm 1 and its momentum variant; the authors' ``lowrank_zo_step`` /
``lowrank_zo_update`` and ``lowrank_zo_update_momentum``): low-rank perturbations of the matrices.

For every trainable tensor of two or more dimensions (m rows, n = the rest), z is ``U @ V.T`` with ``U`` (m x r) and
``V`` (n x r) standard Gaussian; ``U`` is new every step, ``V`` is kept for ``interval`` (the paper's nu) steps.
Vectors (biases, norms) get MeZO's full z. Both are functions of seeds, as every z here (drawn in fp32 for a
16-bit tensor, whose z is the product rounded to its dtype)::

    U = N(0, 1) from derive_seed(seed, step, unit, tensor)
    V = N(0, 1) from derive_seed(seed, step // interval, unit, LOZO_V_TAG + tensor)

so nothing is stored for them and a resumed run draws the same. (The authors' code draws V from the step's seed
before U on the steps it resamples V, and so updates along another U than it perturbed on those steps; drawing V
from its own seed keeps the perturbation and the update on one direction.) The update is MeZO's with that z,
``theta <- theta - lr * (g * U V^T + weight_decay * theta)``, without a 1/r factor (the code's; the paper's 1/r
is absorbed into lr).

LOZO-M keeps the momentum of the U factor, m x r per matrix (a vector's momentum is its own size)::

    M <- g * U                                                     at the first update
    M <- beta * M @ (V_old^T V) / n + (1 - beta) * g * U           when V is resampled (V_old: the last interval's)
    M <- beta * M + (1 - beta) * g * U                             otherwise
    theta <- theta - lr * (M @ V^T + weight_decay * theta)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from zo2_lightning.engine.perturb import sgd_update_
from zo2_lightning.engine.rules import TensorKey, UpdateRule
from zo2_lightning.engine.seeds import derive_seed, draw_direction
from zo2_lightning.optim import ZOOptimizer

#: keeps V's seeds apart from U's and from the rounding seeds of the engine (tensor indices are small)
LOZO_V_TAG = 1 << 42


#: a 16-bit matrix's z is computed in fp32 over row blocks of about this many elements (bounding the temporary)
ROWS_ELEMENTS = 1 << 22


def factor_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype U and V are drawn in for a tensor of ``dtype``: fp32 for 16-bit tensors (as their update runs)."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def low_rank_factors(key: TensorKey, shape: torch.Size, rank: int, interval: int, generator: torch.Generator,
                     dtype: torch.dtype, device: torch.device, period: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, V)`` of one matrix's direction at ``key`` in ``dtype`` (``period``: V of another interval than
    ``key.step``'s)."""
    m = shape[0]
    n = shape.numel() // m
    u = draw_direction(torch.empty(m, rank, dtype=dtype, device=device), derive_seed(*key), generator)
    period = key.step // interval if period is None else period
    v_seed = derive_seed(key.seed, period, key.unit, LOZO_V_TAG + key.tensor)
    v = draw_direction(torch.empty(n, rank, dtype=dtype, device=device), v_seed, generator)
    return u, v


class LOZORule(UpdateRule):
    """LOZO: MeZO-SGD along ``z = U V^T`` for matrices (see the module); stateless."""

    name = "lozo"

    def __init__(self, rank: int, interval: int) -> None:
        self.rank, self.interval = int(rank), int(interval)

    def draw_(self, out: torch.Tensor, key: TensorKey, generator: torch.Generator, distribution: str) -> None:
        if out.dim() < 2:
            super().draw_(out, key, generator, distribution)
            return
        u, v = low_rank_factors(key, out.shape, self.rank, self.interval, generator, factor_dtype(out.dtype),
                                out.device)
        rows = out.view(out.shape[0], -1)
        if u.dtype == out.dtype:
            torch.mm(u, v.t(), out=rows)
            return
        step = max(1, ROWS_ELEMENTS // rows.shape[1])  # a 16-bit tensor: the product in fp32, a few rows at a time
        for start in range(0, rows.shape[0], step):
            rows[start : start + step].copy_(u[start : start + step] @ v.t())


class LOZOMRule(LOZORule):
    """LOZO-M: ``hyper = (beta,)``; state: the momentum, ``m x rank`` per matrix, its own shape per vector."""

    name = "lozo_m"
    state_names = ("momentum",)
    per_tensor = True

    def state_shape(self, shape: torch.Size) -> torch.Size:
        return torch.Size([shape[0], self.rank]) if len(shape) >= 2 else shape

    def update_(self, theta, z, state, c, lr, weight_decay, key, generator) -> None:  # type: ignore[override]
        (beta,) = c.hyper
        (momentum,) = state
        if theta.dim() < 2:  # a vector: momentum SGD on g * z
            factor, basis, fresh = z.mul_(c.g), None, False
        else:
            factor, basis = low_rank_factors(key, theta.shape, self.rank, self.interval, generator, momentum.dtype,
                                             momentum.device)
            factor.mul_(c.g)
            fresh = key.step % self.interval == 0 and key.step > 0
        if c.t == 1:
            momentum.copy_(factor)
        elif fresh:  # V was resampled: carry the momentum over onto the new V
            _, old = low_rank_factors(key, theta.shape, self.rank, self.interval, generator, momentum.dtype,
                                      momentum.device, period=key.step // self.interval - 1)
            n = basis.shape[0]
            carried = momentum @ (old.t() @ basis)
            momentum.copy_(carried.mul_(beta / n).add_(factor.mul_(1.0 - beta)))
        else:
            momentum.mul_(beta).add_(factor.mul_(1.0 - beta))
        step = momentum.clone() if basis is None else (momentum @ basis.t()).view_as(theta)
        sgd_update_(theta, step, 1.0, lr, weight_decay)


class LOZO(ZOOptimizer):
    """LOZO: low-rank perturbations ``U V^T`` of the matrices, V resampled every ``interval`` steps.

    No memory beyond MeZO's (the factors are drawn from seeds); stateless, so q-SPSA works as for ``ZOSGD``.

    Args:
        rank: r, the rank of the perturbations (the authors use 1 .. 4).
        interval: nu, steps between resamplings of V (the authors use 50 .. 100).
        others: as :class:`~zo2_lightning.ZOOptimizer`; the authors use lr 1e-7 .. 1e-6, eps 1e-3 on OPT-13B.

    Raises:
        ValueError: ``rank`` or ``interval`` below 1.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 rank: int = 2, interval: int = 50, **kwargs: Any) -> None:
        for name, value in (("rank", rank), ("interval", interval)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{type(self).__name__} {name} must be an integer >= 1, got {value!r}")
        self.rank, self.interval = rank, interval
        super().__init__(params, lr, eps, weight_decay, **kwargs)

    def update_rule(self) -> UpdateRule:
        return LOZORule(self.rank, self.interval)


class LOZOM(LOZO):
    """LOZO-M: LOZO with momentum kept in the low-rank factor (m x r per m x n matrix; a vector's is its size),
    carried over to the new V when V is resampled. Saved in checkpoints; ``q`` must be 1.

    Args:
        momentum: beta, in ``[0, 1)``; a param-group key (the authors use 0.7 .. 0.9).
        others: as :class:`LOZO`.
    """

    one_direction = True

    def __init__(self, params: Iterable[Any], lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 rank: int = 2, interval: int = 50, momentum: float = 0.9, **kwargs: Any) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"LOZOM momentum must be in [0, 1), got {momentum}")
        super().__init__(params, lr, eps, weight_decay, rank, interval,
                         _rule_defaults={"momentum": float(momentum)}, **kwargs)

    def update_rule(self) -> UpdateRule:
        return LOZOMRule(self.rank, self.interval)

    def rule_hyper(self) -> tuple[float, ...]:
        return (float(self._same_in_all_groups("momentum")),)


