"""Names of the perturbed runs of a step: which direction, which sign, which micro-batch.

``for key in run_keys(q=2, chunks=1): fn(key)`` with ``key.direction``, ``key.sign``, ``key.chunk``;
``key.perturbation`` is the ``(direction, sign)`` whose perturbed parameters the run reads.

Sign ``+1`` / ``-1`` is theta + eps*z / theta - eps*z; sign ``0`` is theta itself (the unperturbed run of a
one-sided estimate, or the "no step" candidate of a conservative trial).
"""

from __future__ import annotations

from typing import NamedTuple


class Perturbation(NamedTuple):
    """What a run's parameters hold: ``theta + sign * eps * z_direction`` (sign 0: theta)."""

    direction: int
    sign: int


class RunKey(NamedTuple):
    """One perturbed run of a step: its :class:`Perturbation` on micro-batch ``chunk``."""

    direction: int
    sign: int
    chunk: int = 0

    @property
    def perturbation(self) -> Perturbation:
        return Perturbation(self.direction, self.sign)


def step_perturbations(q: int, one_sided: bool = False, center: bool = False) -> list[Perturbation]:
    """The perturbations of a step, direction 0's +eps first: 2q of them (central), or the q at +eps and one
    unperturbed ``(0, 0)`` that every direction shares (``one_sided``); ``center``: the 2q central ones and the
    unperturbed one as well (a method that also needs L(theta), e.g. HiZOO's curvature estimate)."""
    if one_sided:
        return [Perturbation(d, +1) for d in range(q)] + [Perturbation(0, 0)]
    central = [Perturbation(d, s) for d in range(q) for s in (+1, -1)]
    return central + [Perturbation(0, 0)] if center else central


def loss_tuple(direction: int, one_sided: bool = False, center: bool = False) -> tuple[Perturbation, ...]:
    """The runs whose outputs form ``direction``'s tuple, in its order: ``(+, -)``; ``(+, 0)`` one-sided;
    ``(+, -, 0)`` with the center run. The engine returns outputs and the optimizer reads losses in this order."""
    if one_sided:
        return Perturbation(direction, +1), Perturbation(0, 0)
    if center:
        return Perturbation(direction, +1), Perturbation(direction, -1), Perturbation(0, 0)
    return Perturbation(direction, +1), Perturbation(direction, -1)


#: the runs of a conservative step's trial: the step taken, no step, the step reversed
TRIAL_PERTURBATIONS = [Perturbation(0, +1), Perturbation(0, 0), Perturbation(0, -1)]


def run_keys(perturbations: list[Perturbation], chunks: int) -> list[RunKey]:
    """Every perturbation on every micro-batch; a perturbation's chunks run one after another (so a block's
    perturbed copy is built once per perturbation, not once per run)."""
    return [RunKey(p.direction, p.sign, m) for p in perturbations for m in range(chunks)]
