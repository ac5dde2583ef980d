"""The perturbed runs of one ZO step, in lockstep: what each run reads at each block, and when it is built.

``results = StepRuns(spsa, resident, units, arrive).run(fn, perturbations, chunks, step, eps, seeds, trial)``,
with each block's forward pre-hook calling ``runs.barrier(i)`` while ``runs.active``.

The runs (one :class:`.keys.RunKey` per perturbation and micro-batch) take turns at every block: when the last
reaches block i, :meth:`StepRuns._transition` brings it in (``arrive``: upload and deferred updates) and draws its
z; as each run takes its turn, :meth:`StepRuns._activate` binds the parameters it may read: the block's one shared
perturbed copy, rebuilt for the run's perturbation (a perturbation's micro-batches run consecutively, so once per
perturbation), and the resident parameters' copy (:class:`.resident.ResidentParams`). A conservative trial binds
its two precomputed candidates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from zo2_lightning.engine.keys import Perturbation, RunKey, run_keys
from zo2_lightning.engine.ledger import Commit
from zo2_lightning.engine.lockstep import Lockstep
from zo2_lightning.engine.resident import ResidentParams
from zo2_lightning.engine.spsa import UnitSPSA
from zo2_lightning.engine.units import Unit


class StepRuns:
    """The runs of one step (or one conservative trial) over the blocks of ``units``.

    Args:
        spsa: the arithmetic (its ``regenerate`` choice decides whether a block's z is drawn once or per run).
        resident: the parameters outside the blocks.
        units: one per block.
        arrive: ``arrive(i)`` makes block ``i`` current on the working device and returns its flats.
    """

    def __init__(self, spsa: UnitSPSA, resident: ResidentParams, units: Sequence[Unit],
                 arrive: Callable[[int], list[torch.Tensor]]) -> None:
        self.spsa, self.resident, self.units, self._arrive = spsa, resident, units, arrive
        self.scheduler = Lockstep(self._activate, self._transition)
        self._step, self._eps, self._seeds = 0, 0.0, [0]
        self._trial: list[Commit] | None = None
        self._block: int | None = None  # the block the runs are at
        self._flats: list[torch.Tensor] = []  # its working-device flats
        self._directions: list[int] = []  # the directions the runs read (a share of the step's, or all)
        self._block_z: dict[int, list[torch.Tensor]] = {}  # the block's z per direction
        self._copy_of: Perturbation | None = None  # the perturbation its perturbed copy holds

    @property
    def key(self) -> RunKey | None:
        """The run executing now, else None."""
        return self.scheduler.key  # type: ignore[return-value]

    @property
    def active(self) -> bool:
        return self.scheduler.active

    def barrier(self, block: int) -> None:
        self.scheduler.barrier(block)

    def run(self, fn: Callable[[RunKey], Any], perturbations: list[Perturbation], chunks: int, step: int, eps: float,
            seeds: Sequence[int], trial: Sequence[Commit] | None = None) -> dict[RunKey, Any]:
        """``fn(key)`` for every perturbation and chunk, in lockstep; ``{key: result}``."""
        if int(chunks) < 1:
            raise ValueError(f"chunks must be >= 1, got {chunks}")
        self._step, self._eps, self._seeds = int(step), float(eps), [int(s) for s in seeds]
        self._trial = list(trial) if trial is not None else None
        self._directions = sorted({p.direction for p in perturbations if p.sign != 0})
        # one z buffer per direction run, numbered as they are drawn (directions_of takes their seeds in order)
        drawn = [Perturbation(k, +1) for k in range(len(self._directions))]
        self.spsa.reserve(drawn, copies=2 if self._trial is not None else 1)
        if self._trial is not None:
            self.resident.prepare_trial(self._trial)
        else:
            self.resident.prepare(self._step, self._eps, self._seeds, perturbations)
        # autocast caches the cast of a leaf Parameter, but the runs rebind one Parameter to different data:
        # a cached cast would give one run another's weights (Lightning's own autocast keeps the cache off too)
        cache = torch.is_autocast_cache_enabled()
        torch.set_autocast_cache_enabled(False)
        try:
            return self.scheduler.run(fn, run_keys(perturbations, int(chunks)))
        finally:
            torch.set_autocast_cache_enabled(cache)
            self._block, self._flats, self._block_z, self._copy_of = None, [], {}, None

    def _transition(self, i: int) -> None:
        """Every run reached block ``i``: bring it in and draw its z (or build a trial's two candidates)."""
        self._flats = self._arrive(i)
        unit = self.units[i]
        if unit.is_trainable and self._trial is not None:
            self.spsa.trial(unit, self._flats, self._trial)
        elif unit.is_trainable and not self.spsa.regenerate:  # each run's copy is built as it takes its turn
            zs = self.spsa.directions_of(unit, self._step, [self._seeds[d] for d in self._directions], self._flats)
            self._block_z = dict(zip(self._directions, zs))
        self._copy_of = None
        self._block = i

    def _activate(self, run: RunKey) -> None:
        """The run is about to execute: every parameter it may read holds its perturbation (sign 0: none)."""
        torch.clear_autocast_cache()  # a user's own autocast may cache casts of the previous run's weights
        p = run.perturbation
        self.resident.activate(p)
        i = self._block
        if i is None:
            return
        unit, flats = self.units[i], self._flats
        if p.sign == 0:
            unit.bind(flats)
        elif self._trial is not None:
            unit.bind_signed(flats, self.spsa.views("P" if p.sign > 0 else "P2", unit))
        else:
            copy = self.spsa.views("P", unit)
            if unit.is_trainable and self._copy_of != p:
                scale = p.sign * self._eps
                if self.spsa.regenerate:
                    self.spsa.regenerate_into(unit, flats, self._step, self._seeds[p.direction], scale, copy)
                else:
                    self.spsa.perturb_one(unit, flats, self._block_z[p.direction], scale, copy)
                self._copy_of = p
            unit.bind_signed(flats, copy)
