"""The SPSA arithmetic: perturbed copies, the projected gradient and the SGD update.

Written once so every path (lockstep step, deferred update, flush) rounds identically; the formulas are those of
docs/architecture.md ("What the project does"), and the tests recompute them independently in plain torch:

    theta_s = theta + (s * eps) * z                       (s = +1 / -1, never written into theta)
    g       = (L+ - L-) / (2 * eps)                       (in float64, from the two losses)
    g       = (L+ - L0) / eps                             (one-sided: L0 at theta itself)
    theta  <- theta - lr * (g * z + wd * theta)
"""

from __future__ import annotations

import math

import torch


def perturb_into(out: torch.Tensor, theta: torch.Tensor, z: torch.Tensor, scale: float) -> torch.Tensor:
    """``out = theta + scale * z`` without touching ``theta`` (bitwise equal to that expression)."""
    torch.mul(z, scale, out=out)
    return out.add_(theta)


def sgd_update_(theta: torch.Tensor, z: torch.Tensor, g: float, lr: float, weight_decay: float) -> None:
    """``theta <- theta - lr * (g * z + weight_decay * theta)`` in place; ``z`` is consumed as scratch."""
    z.mul_(g)
    if weight_decay != 0.0:
        z.add_(theta * weight_decay)
    z.mul_(lr)
    theta.sub_(z)


def projected_grad(loss_plus: float, loss_minus: float, eps: float, one_sided: bool = False) -> float:
    """The two-point SPSA estimate of the directional derivative along z: central, or forward-difference
    (``one_sided``: ``loss_minus`` is the loss at theta itself)."""
    if one_sided:
        return (loss_plus - loss_minus) / eps
    return (loss_plus - loss_minus) / (2.0 * eps)


def all_finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)
