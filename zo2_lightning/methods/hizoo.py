"""HiZOO (Zhao et al., "Second-Order Fine-Tuning without Pain for LLMs: A Hessian Informed Zeroth-Order
Optimizer", arXiv 2402.15173, Algorithm 1; the authors' ``zo_Hessian_step_update``): MeZO along a direction scaled
by a diagonal Hessian estimate.

Per step, with ``H`` the diagonal estimate (``Sigma^-1`` in the paper; ones at the start), ``z ~ N(0, I)`` and
``alpha`` the smoothing factor::

    L+, L-, L0 = L(theta + eps * z / sqrt(H)), L(theta - eps * z / sqrt(H)), L(theta)     (3 forwards)
    H     <- (1 - alpha) * H + alpha * |L+ + L- - 2 L0| / (2 eps^2) * H * z^2             (the old H's z)
    theta <- theta - lr * ((L+ - L-) / (2 eps) * z / sqrt(H) + weight_decay * theta)     (the new H)

as the authors' code orders it (the Hessian first, then the step with it). The state is one value per trainable
parameter (fp32 for 16-bit ones): for a streamed block it lives with the block's host copy and travels with it
for the perturbation and the update, as ZO-Adam's moments do. The released code's fourth forward (the loss after
the update, for logging only) is not run: the logged ``train_loss`` is the +eps run's, as for every optimizer here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from zo2_lightning.engine.perturb import sgd_update_
from zo2_lightning.engine.rules import UpdateRule
from zo2_lightning.optim import ZOOptimizer


class HiZOORule(UpdateRule):
    """The HiZOO update of a run of parameters; ``hyper = (alpha, curvature)`` with ``curvature = |L+ + L- - 2 L0|
    / (2 eps^2)`` of the step; state: the diagonal Hessian estimate ``H`` (ones before the first use).

    Elementwise, so it runs over whole segments (and over chunks of 16-bit tensors) like MeZO-SGD.
    """

    name = "hizoo"
    state_names = ("hessian",)
    shapes_direction = True

    def init_state_(self, theta: torch.Tensor, state: Sequence[torch.Tensor]) -> None:
        state[0].fill_(1.0)

    def perturbation_(self, z: torch.Tensor, theta: torch.Tensor, state: Sequence[torch.Tensor]) -> None:
        z.div_(torch.sqrt(state[0]))  # Sigma^(1/2) z

    def apply_(self, theta, z, state, g, lr, weight_decay, hyper=(), t=0) -> None:  # type: ignore[override]
        alpha, curvature = hyper
        (hessian,) = state
        estimate = hessian * z  # diag(Sigma^-1/2 z z^T Sigma^-1/2) = H z^2, scaled
        estimate.mul_(z).mul_(alpha * curvature)
        hessian.mul_(1.0 - alpha).add_(estimate)
        z.div_(torch.sqrt(hessian, out=estimate))  # the new H's Sigma^(1/2) z
        sgd_update_(theta, z, g, lr, weight_decay)


class HiZOO(ZOOptimizer):
    """HiZOO: the MeZO step preconditioned by a diagonal Hessian estimate from the same losses plus L(theta).

    Three forwards per step (L+, L-, L0); one extra value per trainable parameter of host memory (the Hessian
    estimate, saved in checkpoints). ``q`` must be 1.

    Args:
        hessian_smooth: the smoothing factor alpha of the Hessian's moving average, in ``[0, 1)``; a param-group
            key (schedulable). 0 keeps ``H = 1`` (MeZO plus one forward); the authors' example uses 1e-8, larger
            values adapt faster.
        others: as :class:`~zo2_lightning.ZOOptimizer` (``one_sided`` is not available: the estimate is central).

    Raises:
        ValueError: ``hessian_smooth`` outside ``[0, 1)``, ``q != 1`` or ``one_sided=True``.
    """

    center = True
    one_direction = True

    def __init__(self, params: Iterable[Any], lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 hessian_smooth: float = 1e-8, **kwargs: Any) -> None:
        if not 0.0 <= hessian_smooth < 1.0:
            raise ValueError(f"HiZOO hessian_smooth must be in [0, 1), got {hessian_smooth} (the paper: 1e-8 .. 1e-6)")
        if kwargs.get("one_sided"):
            raise ValueError("HiZOO needs the central estimate (L+, L- and L0): drop one_sided=True")
        super().__init__(params, lr, eps, weight_decay, _rule_defaults={"hessian_smooth": float(hessian_smooth)},
                         **kwargs)

    def update_rule(self) -> UpdateRule:
        return HiZOORule()

    def step_hyper(self, losses: dict[int, list[tuple[float, ...]]]) -> tuple[float, ...]:
        """``(alpha, |L+ + L- - 2 L0| / (2 eps^2))`` with the losses averaged over the step's micro-batches."""
        (per_batch,) = losses.values()
        plus, minus, center = (sum(t[k] for t in per_batch) / len(per_batch) for k in range(3))
        eps = self.eps
        return float(self._same_in_all_groups("hessian_smooth")), abs(plus + minus - 2.0 * center) / (2.0 * eps * eps)
