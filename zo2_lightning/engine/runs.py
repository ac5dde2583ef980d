"""The perturbed runs of one ZO step, in lockstep: what each run reads at each block, and when it is built.

``results = StepRuns(spsa, res, units, arrive, regenerate).run(fn, keys, chunks, step, eps, seeds, one_sided,
trial)``, with each block's forward pre-hook calling ``runs.barrier(i)`` while ``runs.active``.

The runs (one per (direction, sign, micro-batch)) take turns at every block: when the last reaches block i,
:meth:`_transition` brings it in (``arrive``: upload and deferred updates) and draws its z; as each run takes its
turn, :meth:`_activate` binds the parameters it may read: the block's one shared perturbed copy, rebuilt for
the run's (direction, sign) (a key's micro-batches run consecutively, so once per key), and the resident
parameters' copy (:class:`.resident.ResidentParams`). A conservative trial binds its two precomputed candidates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from zo2_lightning.engine.lockstep import Lockstep
from zo2_lightning.engine.resident import ResidentParams
from zo2_lightning.engine.spsa import Commit, RunKey, UnitSPSA
from zo2_lightning.engine.units import Unit


class StepRuns:
    def __init__(self, spsa: UnitSPSA, res: ResidentParams, units: Sequence[Unit],
                 arrive: Callable[[int], list[torch.Tensor]], regenerate: bool) -> None:
        self.spsa, self.res, self.units, self._arrive, self._regenerate = spsa, res, units, arrive, regenerate
        self.pair = Lockstep(self._activate, self._transition)
        self._step, self._eps, self._seeds = 0, 0.0, [0]
        self._trial: list[Commit] | None = None
        self._block: int | None = None  # the block the runs are at
        self._flats: list[torch.Tensor] = []  # its working-device flats
        self._block_z: list[list[torch.Tensor]] = []  # its z per direction
        self._copy_of: RunKey | None = None  # the run key its perturbed copy holds

    @property
    def key(self) -> tuple[int, int, int] | None:
        """``(direction, sign, chunk)`` of the run executing now, else None."""
        return self.pair.key  # type: ignore[return-value]

    @property
    def active(self) -> bool:
        return self.pair.active

    def barrier(self, block: int) -> None:
        self.pair.barrier(block)

    def run(self, fn: Callable[[Any], Any], keys: list[RunKey], chunks: int, step: int, eps: float,
            seeds: Sequence[int], one_sided: bool = False, trial: Sequence[Commit] | None = None) -> dict[Any, Any]:
        """``fn((d, s, m))`` for every key and chunk, in lockstep; ``{(d, s, m): result}``."""
        if int(chunks) < 1:
            raise ValueError(f"chunks must be >= 1, got {chunks}")
        self._step, self._eps, self._seeds = int(step), float(eps), [int(s) for s in seeds]
        self._trial = list(trial) if trial is not None else None
        self.spsa.reserve(keys, copies=2 if self._trial is not None else 1)
        if self._trial is not None:
            self.res.prepare_trial(self._trial)
        else:
            self.res.prepare(self._step, self._eps, self._seeds, (+1,) if one_sided else (+1, -1), keys)
        # autocast caches the cast of a leaf Parameter, but the runs rebind one Parameter to different data:
        # a cached cast would give one run another's weights (Lightning's own autocast keeps the cache off too)
        cache = torch.is_autocast_cache_enabled()
        torch.set_autocast_cache_enabled(False)
        try:  # a key's chunks run one after another, so a block's perturbed copy is built once per key
            return self.pair.run(fn, [(*k, m) for k in keys for m in range(int(chunks))])
        finally:
            torch.set_autocast_cache_enabled(cache)
            self._block, self._flats, self._block_z, self._copy_of = None, [], [], None

    def _transition(self, i: int) -> None:
        """Every run reached block ``i``: bring it in and draw its z (or build a trial's two candidates)."""
        self._flats = self._arrive(i)
        unit = self.units[i]
        if unit.trainable and self._trial is not None:
            self.spsa.trial(unit, self._flats, self._trial)
        elif unit.trainable and not self._regenerate:  # each run's copy is built as it takes its turn
            self._block_z = self.spsa.directions_of(unit, self._step, self._seeds)
        self._copy_of = None
        self._block = i

    def _activate(self, run: tuple[int, int, int]) -> None:
        """The run ``(direction, sign, chunk)`` is about to execute: every parameter it may read holds its
        perturbation (sign 0: none)."""
        torch.clear_autocast_cache()  # a user's own autocast may cache casts of the previous run's weights
        key = run[:2]
        self.res.activate(key)
        i = self._block
        if i is None:
            return
        unit, flats = self.units[i], self._flats
        if key[1] == 0:
            unit.bind(flats)
        elif self._trial is not None:
            unit.bind_signed(flats, self.spsa.views("P" if key[1] > 0 else "P2", unit))
        else:
            copy = self.spsa.views("P", unit)
            if unit.trainable and self._copy_of != key:
                d, scale = key[0], key[1] * self._eps
                if self._regenerate:
                    self.spsa.regenerate_into(unit, flats, self._step, self._seeds[d], scale, copy)
                else:
                    self.spsa.perturb_one(unit, flats, self._block_z[d], scale, copy)
                self._copy_of = key
            unit.bind_signed(flats, copy)
