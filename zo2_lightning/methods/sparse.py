"""Sparse MeZO (Liu et al., "Sparse MeZO: Less Parameters for Better Performance in Zeroth-Order LLM
Fine-Tuning", arXiv 2402.15751, Algorithm 1 with its GetMask rule): perturb and update only the small weights.

Each trainable tensor gets a threshold ``h``, the ``(1 - sparsity)`` quantile of ``|theta|`` over the tensor, set
once from its values at its first use (the pretrained weights: the paper fixes the thresholds before training).
At every step the mask is recomputed from the current values, ``m = |theta| <= h``, and both the perturbation
and the update use ``m * z``::

    L+, L- = L(theta + eps * m * z), L(theta - eps * m * z)
    theta <- theta - lr * m * (g * z + weight_decay * theta)

The mask of a step is a function of theta at that step, which the deferred update sees again unchanged (the
block's values before the update are those the runs were perturbed around), so nothing is stored for it. The
state is one threshold per tensor, saved in checkpoints. The threshold is the k-th smallest ``|theta|`` with
``k = max(1, round((1 - sparsity) * numel))`` (``torch.kthvalue``), so about ``1 - sparsity`` of each tensor
is tuned; the paper finds sparsity 0.8 best on most tasks (which tunes the smallest 20%).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from zo2_lightning.engine.perturb import sgd_update_
from zo2_lightning.engine.rules import UpdateRule
from zo2_lightning.optim import ZOOptimizer


def magnitude_threshold(theta: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The ``(1 - sparsity)`` quantile of ``|theta|`` (a one-element fp32 tensor): the k-th smallest magnitude,
    ``k = max(1, round((1 - sparsity) * numel))``."""
    magnitudes = theta.detach().abs().reshape(-1).float()
    k = max(1, round((1.0 - sparsity) * magnitudes.numel()))
    return magnitudes.kthvalue(k).values.reshape(1)


class SparseMeZORule(UpdateRule):
    """Sparse MeZO: MeZO-SGD along ``(|theta| <= h) * z``; state: the threshold ``h`` of each tensor."""

    name = "sparse_mezo"
    state_names = ("threshold",)
    shapes_direction = True
    per_tensor = True  # the threshold is a statistic of the whole tensor

    def __init__(self, sparsity: float) -> None:
        self.sparsity = float(sparsity)

    def state_shape(self, shape: torch.Size) -> torch.Size:
        return torch.Size([1])

    def init_state_(self, theta: torch.Tensor, state: Sequence[torch.Tensor]) -> None:
        state[0].copy_(magnitude_threshold(theta, self.sparsity))

    def perturbation_(self, z: torch.Tensor, theta: torch.Tensor, state: Sequence[torch.Tensor]) -> None:
        z.mul_(theta.abs() <= state[0])

    def update_(self, theta, z, state, c, lr, weight_decay, key, generator) -> None:  # type: ignore[override]
        mask = theta.abs() <= state[0]  # before the update: the mask the runs were perturbed with
        z.mul_(c.g)
        if weight_decay != 0.0:
            z.add_(theta * weight_decay)
        z.mul_(mask)
        sgd_update_(theta, z, 1.0, lr, 0.0)


class SparseMeZO(ZOOptimizer):
    """Sparse MeZO: MeZO on each tensor's smallest-magnitude weights only (a per-tensor threshold fixed at the first
    step, the mask recomputed every step from the current weights).

    One threshold per trainable tensor of extra state (saved in checkpoints); otherwise MeZO's memory.

    Args:
        sparsity: the fraction of each tensor left untouched, in ``[0, 1)``: 0 is MeZO, the paper's best 0.8 tunes
            the 20% smallest weights of every tensor.
        others: as :class:`~zo2_lightning.ZOOptimizer`.

    Raises:
        ValueError: ``sparsity`` outside ``[0, 1)``.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 sparsity: float = 0.8, **kwargs: Any) -> None:
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
            raise ValueError(f"SparseMeZO sparsity must be in [0, 1), got {sparsity!r}; the paper uses 0.8")
        self.sparsity = float(sparsity)
        super().__init__(params, lr, eps, weight_decay, **kwargs)

    def update_rule(self) -> UpdateRule:
        return SparseMeZORule(self.sparsity)
