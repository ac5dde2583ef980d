"""ZO methods published after MeZO, on the streaming engine: each an optimizer returned from
``configure_optimizers`` like :class:`~zo2_lightning.ZOSGD`, with its update rule in plain torch.

========================  =============================  ==============================================
optimizer                 paper                          what it changes
========================  =============================  ==============================================
:class:`HiZOO`            arXiv 2402.15173               z scaled by a diagonal Hessian estimate
:class:`LOZO`             arXiv 2410.07698               low-rank z = U V^T for matrices
:class:`LOZOM`            arXiv 2410.07698 (LOZO-M)      LOZO with momentum kept in the low-rank factor
:class:`SparseMeZO`       arXiv 2402.15751               perturb/update only the small-magnitude weights
:class:`FZOO`             arXiv 2506.09034               N one-sided Rademacher probes, step / std(losses)
========================  =============================  ==============================================

Each rule lives next to its optimizer; the engine knows them only through the hooks of
:class:`zo2_lightning.engine.rules.UpdateRule` (draw, shape, initialise state, update one tensor).
"""

from zo2_lightning.methods.fzoo import FZOO
from zo2_lightning.methods.hizoo import HiZOO, HiZOORule
from zo2_lightning.methods.lozo import LOZO, LOZOM, LOZOMRule, LOZORule, low_rank_factors
from zo2_lightning.methods.sparse import SparseMeZO, SparseMeZORule, magnitude_threshold

__all__ = ["FZOO", "HiZOO", "HiZOORule", "LOZO", "LOZOM", "LOZOMRule", "LOZORule", "SparseMeZO", "SparseMeZORule",
           "low_rank_factors", "magnitude_threshold"]
