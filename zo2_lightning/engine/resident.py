"""The parameters outside the blocks (embeddings, final norm, head): always on the device, perturbed per run.

``resident = ResidentParams(params, trainable, spsa)``; per step ``resident.prepare(step, eps, seeds, signs,
perturbations)`` (or ``resident.prepare_trial(commits)``), ``resident.activate(perturbation)`` whenever a run takes
its turn, ``resident.bind_plain()`` after the runs, ``resident.commit(c)`` at once for every commit;
``resident.restore()`` at detach.

Every run may read them between any two blocks (an encoder-decoder's shared embeddings are read mid-forward),
so each run's copy must be in place for the whole of its turn. By default all 2q copies are built once per
step, each direction's z drawn into its +eps copy and turned into it in place (no z buffer: the commit draws z
again, into a copy the runs no longer need, as the blocks' deferred updates do); with ``keep_directions`` a z
buffer keeps the last direction's z for its commit (one draw fewer, one buffer more); with
``regenerate_directions`` there is one copy, rebuilt from a fresh draw of z whenever the run changes (2q per block:
for the largest models, whose embeddings are gigabytes).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from zo2_lightning.engine.keys import TRIAL_PERTURBATIONS, Perturbation
from zo2_lightning.engine.ledger import Commit
from zo2_lightning.engine.seeds import RESIDENT_UNIT
from zo2_lightning.engine.spsa import UnitSPSA
from zo2_lightning.engine.units import Unit


class ResidentParams:
    """The trainable parameters outside the blocks, packed on the working device, with each run's perturbed copy.

    Args:
        params: the parameters outside the blocks (only the trainable ones are packed; the rest stay as they are).
        trainable: the ``id`` of every trainable parameter.
        spsa: the arithmetic on the working device (its buffers come from ``spsa.ops``; its ``keep_directions`` /
            ``regenerate_directions`` choice).
    """

    def __init__(self, params: Iterable[nn.Parameter], trainable: set[int], spsa: UnitSPSA) -> None:
        self.unit = Unit.build(RESIDENT_UNIT, [p for p in params if id(p) in trainable], trainable)
        self._new = lambda: [spsa.ops.empty(w.numel(), w.dtype) for w in self.flats]  # noqa: E731
        self.flats = self.unit.pack(spsa.device, allocate=spsa.ops.empty)
        self.unit.bind(self.flats)
        self.spsa = spsa
        self.regenerate = spsa.regenerate
        # z scratch (with regenerate also the one copy), only where it is kept between uses; else see _scratch
        self.z = self._new() if self.regenerate or spsa.keep_directions else None
        self._spare: list[torch.Tensor] | None = None  # scratch allocated on demand (a trial's z)
        self._z_key: tuple[int, int] | None = None  # (step, seed) of the z held in self.z
        self.copies: dict[Perturbation, list[torch.Tensor]] = {}  # each perturbed run's copy
        self._copy_of: Perturbation | None = None  # regenerate: the perturbation self.z holds
        self._step, self._eps, self._seeds = 0, 0.0, [0]
        self._trial = False

    @property
    def is_trainable(self) -> bool:
        return self.unit.is_trainable

    def device_bytes(self) -> dict[str, int]:
        """Bytes on the working device: the parameters themselves, the runs' copies, the z buffer and a trial's
        spare scratch."""
        size = lambda bufs: sum(t.numel() * t.element_size() for t in bufs)  # noqa: E731
        return {"resident/params": size(self.flats),
                "resident/copies": sum(size(c) for c in self.copies.values()),
                "resident/z": size(self.z or []),
                "resident/spare": size(self._spare or [])}

    # ------------------------------------------------------------------ the runs of a step
    def _reserve(self, perturbations: Sequence[Perturbation]) -> None:
        for p in perturbations:
            if p.sign != 0 and p not in self.copies:
                self.copies[p] = self._new()

    def prepare(self, step: int, eps: float, seeds: Sequence[int], perturbations: Sequence[Perturbation]) -> None:
        """Before the runs of a step: the copy of every run in ``perturbations`` (default) or none yet (regenerate).

        ``perturbations`` may be a share of the step's (another process runs the rest): only the directions in it
        are drawn. Without a z buffer each direction's z is drawn into its +eps copy, so that copy is reserved
        (as scratch) even when only the -eps run is this process's.
        """
        self._step, self._eps, self._seeds, self._trial = step, eps, list(seeds), False
        if not self.is_trainable:
            return
        if self.regenerate:
            self._copy_of, self._z_key = None, None  # self.z becomes each run's copy in turn
            return
        signs_of: dict[int, list[int]] = {}
        for p in perturbations:
            if p.sign != 0:
                signs_of.setdefault(p.direction, []).append(p.sign)
        self._reserve([*perturbations, *(Perturbation(d, +1) for d in signs_of if self.z is None)])
        for d, signs in sorted(signs_of.items()):
            out = {Perturbation(0, s): self.copies[Perturbation(d, s)] for s in (+1, *signs)
                   if Perturbation(d, s) in self.copies}
            self.spsa.perturb(self.unit, self.flats, step, eps, [seeds[d]], out, self.z, signs=signs)
        last = max(signs_of, default=None)  # self.z holds the last direction's z
        self._z_key = (step, seeds[last]) if self.z is not None and last is not None else None

    def prepare_trial(self, commits: Sequence[Commit]) -> None:
        """Before a conservative step's trial runs: the step and the step reversed, as the commits would apply."""
        self._trial = True
        if not self.is_trainable:
            return
        self._reserve(TRIAL_PERTURBATIONS)
        self.spsa.trial(self.unit, self.flats, commits, self.copies, self._scratch(besides_copies=True))
        self._z_key = None  # the scratch was spent on the trial

    def activate(self, p: Perturbation) -> None:
        """A run reading ``p`` is about to execute: bind its copy (sign 0: the parameters themselves)."""
        if p.sign == 0 or not self.is_trainable:
            self.bind_plain()
        elif self.regenerate and not self._trial:
            if self._copy_of != p:
                self.spsa.regenerate_into(self.unit, self.flats, self._step, self._seeds[p.direction],
                                          p.sign * self._eps, self.z)
                self._copy_of = p
            self.unit.bind_signed(self.flats, self.z)
        else:
            self.unit.bind_signed(self.flats, self.copies[p])

    def bind_plain(self) -> None:
        self.unit.bind(self.flats)

    # ------------------------------------------------------------------ updates
    def commit(self, c: Commit) -> None:
        """Apply ``c`` now (the resident parameters never wait for an arrival)."""
        if not self.is_trainable:
            return
        if self._z_key == (c.step, c.seed) and not self.spsa.rule.shapes_direction:  # a shaped z is not z
            z = self.z
        else:
            z = self._scratch()
            self.spsa.draw(self.unit, c.step, c.seed, z)
        self.spsa.apply(self.unit, self.flats, z, c)
        self._z_key = None  # consumed as scratch by the update

    def _scratch(self, besides_copies: bool = False) -> list[torch.Tensor]:
        """A resident-sized buffer to draw z into: the z buffer where there is one, else (outside the runs) a
        run's copy, else one allocated for the purpose (and kept)."""
        if self.z is not None:
            return self.z
        if not besides_copies and self.copies:
            return next(iter(self.copies.values()))
        if self._spare is None:
            self._spare = self._new()
        return self._spare

    def restore(self) -> None:
        """Give each parameter its own storage again (detach)."""
        for seg, flat in zip(self.unit.segments, self.flats):
            for span in seg.spans:
                span.param.data = span.view(flat).clone()
