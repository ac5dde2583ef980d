"""The parameters outside the blocks (embeddings, final norm, head): always on the device, perturbed per run.

``res = ResidentParams(params, trainable, device, spsa, regenerate)``; per step ``res.prepare(step, eps, seeds,
signs, keys)`` (or ``res.prepare_trial(commits)``), ``res.activate(key)`` whenever a run takes its turn,
``res.bind_plain()`` after the runs, ``res.commit(c)`` at once for every commit; ``res.restore()`` at detach.

Every run may read them between any two blocks (an encoder-decoder's shared embeddings are read mid-forward),
so each run's copy must be in place for the whole of its turn. By default all 2q copies are built once per
step, each direction's z drawn into its +eps copy and turned into it in place (no z buffer: the commit draws z
again, into a copy the runs no longer need, as the blocks' deferred updates do); with ``keep_directions`` a z
buffer keeps the last direction's z for its commit (one draw fewer, one buffer more); with ``regenerate`` there
is one copy, rebuilt from a fresh draw of z whenever the run changes (2q per block: for the largest models,
whose embeddings are gigabytes).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from zo2_lightning.engine.seeds import RESIDENT_UNIT
from zo2_lightning.engine.spsa import Commit, RunKey, UnitSPSA
from zo2_lightning.engine.units import Unit


class ResidentParams:
    def __init__(self, params: Iterable[nn.Parameter], trainable: set[int], device: torch.device, spsa: UnitSPSA,
                 regenerate: bool = False) -> None:
        self.unit = Unit.build(RESIDENT_UNIT, [p for p in params if id(p) in trainable], trainable)
        self.w = self.unit.pack(device)
        self.unit.bind(self.w)
        self.spsa = spsa
        self.regenerate = regenerate
        # z scratch (with regenerate also the one copy), only where it is kept between uses; else see _scratch
        self.z = [torch.empty_like(w) for w in self.w] if regenerate or spsa.keep_directions else None
        self._spare: list[torch.Tensor] | None = None  # scratch allocated on demand (a trial's z)
        self._z_key: tuple[int, int] | None = None  # (step, seed) of the z held in self.z
        self.copies: dict[RunKey, list[torch.Tensor]] = {}  # (direction, sign) -> perturbed copy
        self._copy_of: RunKey | None = None  # regenerate: the run key self.z holds
        self._step, self._eps, self._seeds = 0, 0.0, [0]
        self._trial = False

    @property
    def trainable(self) -> bool:
        return self.unit.trainable

    # ------------------------------------------------------------------ the runs of a step
    def _reserve(self, keys: Sequence[RunKey]) -> None:
        for key in keys:
            if key[1] != 0 and key not in self.copies:
                self.copies[key] = [torch.empty_like(w) for w in self.w]

    def prepare(self, step: int, eps: float, seeds: Sequence[int], signs: Sequence[int],
                keys: Sequence[RunKey]) -> None:
        """Before the runs of a step: every run's copy (default) or none yet (regenerate)."""
        self._step, self._eps, self._seeds, self._trial = step, eps, list(seeds), False
        if not self.trainable:
            return
        if self.regenerate:
            self._copy_of, self._z_key = None, None  # self.z becomes each run's copy in turn
            return
        self._reserve(keys)
        self.spsa.perturb(self.unit, self.w, step, eps, seeds, self.copies, self.z, signs=signs)
        self._z_key = (step, seeds[-1]) if self.z is not None else None  # self.z holds the last direction's z

    def prepare_trial(self, commits: Sequence[Commit]) -> None:
        """Before a conservative step's trial runs: the step and the step reversed, as the commits would apply."""
        self._trial = True
        if not self.trainable:
            return
        self._reserve([(0, +1), (0, -1)])
        self.spsa.trial(self.unit, self.w, commits, self.copies, self._scratch(besides_copies=True))
        self._z_key = None  # the scratch was spent on the trial

    def activate(self, key: RunKey) -> None:
        """The run ``key`` is about to execute: bind its copy (sign 0: the parameters themselves)."""
        if key[1] == 0 or not self.trainable:
            self.bind_plain()
        elif self.regenerate and not self._trial:
            if self._copy_of != key:
                self.spsa.regenerate_into(self.unit, self.w, self._step, self._seeds[key[0]], key[1] * self._eps,
                                          self.z)
                self._copy_of = key
            self.unit.bind_signed(self.w, self.z)
        else:
            self.unit.bind_signed(self.w, self.copies[key])

    def bind_plain(self) -> None:
        self.unit.bind(self.w)

    # ------------------------------------------------------------------ updates
    def commit(self, c: Commit) -> None:
        """Apply ``c`` now (the resident parameters never wait for an arrival)."""
        if not self.trainable:
            return
        if self._z_key == (c.step, c.seed):
            z = self.z
        else:
            z = self._scratch()
            self.spsa.draw(self.unit, c.step, c.seed, z)
        self.spsa.apply(self.unit, self.w, z, c)
        self._z_key = None  # consumed as scratch by the update

    def _scratch(self, besides_copies: bool = False) -> list[torch.Tensor]:
        """A resident-sized buffer to draw z into: the z buffer where there is one, else (outside the runs) a
        run's copy, else one allocated for the purpose (and kept)."""
        if self.z is not None:
            return self.z
        if not besides_copies and self.copies:
            return next(iter(self.copies.values()))
        if self._spare is None:
            self._spare = [torch.empty_like(w) for w in self.w]
        return self._spare

    def restore(self) -> None:
        """Give each parameter its own storage again (detach)."""
        for seg, flat in zip(self.unit.segments, self.w):
            for slot in seg.slots:
                slot.param.data = slot.view(flat).clone()
