"""FZOO (Dang et al., "FZOO: Fast Zeroth-Order Optimizer for Fine-Tuning Large Language Models towards Adam-Scale
Speed", arXiv 2506.09034, its batched one-sided estimate g_t normalised by sigma_t; the authors' ``zo_step`` /
``zo_update``): a batch of one-sided Rademacher estimates, the step normalised by their spread.

Per step, with N Rademacher directions ``u_i`` (one residency of each block serves all N + 1 forwards)::

    L_i = L(theta + eps * u_i),  L0 = L(theta),  sigma = std(L_1 .. L_N)          (N + 1 forwards)
    theta <- theta - lr / (N * sigma) * sum_i (L_i - L0) * u_i

as the authors' released code computes it: sigma is the population standard deviation of the N perturbed losses
(L0 not among them) and there is no 1/eps (the paper writes the step with 1/eps and the sample deviation, which
rescales lr by eps * sqrt((N - 1) / N)). The normalisation makes the step length independent of the loss scale,
like Adam's. Stateless: no memory beyond MeZO's, and q-SPSA's scratch for the N directions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from zo2_lightning.optim import ZOOptimizer


class FZOO(ZOOptimizer):
    """FZOO: ``q`` one-sided Rademacher estimates per step, the update divided by the spread of their losses.

    Args:
        q: the batch N of directions per step (the paper's default 8), each with its own +eps run, sharing one
            unperturbed run; at least 2 (the spread of one loss is 0).
        direction: of the probes, ``"rademacher"`` (the paper's) or ``"gaussian"``.
        others: as :class:`~zo2_lightning.ZOOptimizer`; the authors use lr 1e-5 .. 5e-5 with eps 1e-3 .. 1e-4.
            ``one_sided`` is always on.

    A step whose N losses are all equal carries no direction (sigma = 0): it commits a zero step instead of
    the division by zero of the released code.

    Raises:
        ValueError: ``q < 2``, or ``one_sided=False`` asked for.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-5, eps: float = 1e-3, weight_decay: float = 0.0,
                 q: int = 8, direction: str = "rademacher", **kwargs: Any) -> None:
        if kwargs.pop("one_sided", True) is not True:
            raise ValueError("FZOO's estimates are one-sided (N perturbed runs and one at theta): drop one_sided")
        if isinstance(q, bool) or not isinstance(q, int) or q < 2:
            raise ValueError(f"FZOO q (the batch N of directions per step) must be an integer >= 2, got {q}; the"
                             " paper uses 8")
        super().__init__(params, lr, eps, weight_decay, q=q, direction=direction, one_sided=True, **kwargs)

    def estimate(self, losses: dict[int, list[tuple[float, ...]]]) -> dict[int, float]:
        """``(L_i - L0) / sigma`` per direction (the step divides by N), the losses averaged over micro-batches."""
        means = {seed: (sum(t[0] for t in per_batch) / len(per_batch), sum(t[1] for t in per_batch) / len(per_batch))
                 for seed, per_batch in losses.items()}
        perturbed = [plus for plus, _ in means.values()]
        mean = sum(perturbed) / len(perturbed)
        sigma = math.sqrt(sum((x - mean) ** 2 for x in perturbed) / len(perturbed))
        if sigma == 0.0:
            return {seed: 0.0 for seed in means}
        return {seed: (plus - center) / sigma for seed, (plus, center) in means.items()}
