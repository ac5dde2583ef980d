"""SPSA on units: directions drawn per tensor, perturbed copies, and commits applied to flat buffers.

``spsa = UnitSPSA(ops, group_of, options, rule=AdamRule())``; ``spsa.size_for(units)``;
``spsa.reserve(perturbations)``; ``zs = spsa.directions_of(unit, step, seeds)``, then per run
``spsa.perturb_one(unit, flats, zs[d], s * eps, spsa.views("P", unit))``; ``spsa.catch_up(unit, flats, commits)``;
``spsa.trial(unit, flats, commits, out)``; ``spsa.perturb(unit, flats, step, eps, seeds, out)`` (all copies at once)

A block's scratch is one z per direction and one perturbed copy ``"P"``, rebuilt for each run as it takes its
turn at the block (same values every time, so the runs stay bitwise what they were); a conservative trial
adds a second copy ``"P2"``. With ``regenerate_directions`` there is no z: each run's copy is drawn afresh into
``"P"`` (:meth:`UnitSPSA.regenerate_into`), which also serves as the catch-up scratch. With ``keep_directions``
each block's z waits in its own buffer from the perturbation to the block's deferred update.

The engine decides *when* (block arrivals, flushes) and *where* (device slots); this module does the
arithmetic on one unit at a time with the formulas of :mod:`.perturb` and the update rule of :mod:`.rules`,
the seeds of :mod:`.seeds` and the rounding of :mod:`.rounding`, using scratch buffers sized once for the
largest block. A stateful rule's buffers (momentum, Adam moments) are kept by :mod:`.rule_state`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from zo2_lightning.engine.device import DeviceOps
from zo2_lightning.engine.keys import Perturbation
from zo2_lightning.engine.ledger import Commit
from zo2_lightning.engine.options import EngineOptions
from zo2_lightning.engine.perturb import perturb_into
from zo2_lightning.engine.rounding import round_to_nearest, stochastic_round
from zo2_lightning.engine.rules import TensorKey, UpdateRule
from zo2_lightning.engine.rule_state import RuleState
from zo2_lightning.engine.seeds import derive_seed
from zo2_lightning.engine.units import Unit

_ROUNDING_TAG = 1 << 40  # keeps rounding seeds apart from direction seeds (tensor indices are small)
#: 16-bit working tensors: the update runs in fp32 over chunks of this many elements (bounding its temporaries),
#: each chunk stochastically rounded back with the seed derive_seed(seed, step, unit, HALF_TAG + (j << 20) + chunk)
#: for trainable tensor j of the unit (the reference in tests/reference.py follows this specification)
HALF_CHUNK = 1 << 22
HALF_TAG = 1 << 41
HALF_DTYPES = (torch.bfloat16, torch.float16)


def z_name(d: int) -> object:
    """The scratch name of direction ``d``'s z ("z", which catch-up also draws into before the perturbation)."""
    return "z" if d == 0 else ("z", d)


class UnitSPSA:
    """Draws, perturbs and updates units on one device.

    Args:
        ops: the working device's operations (z is drawn there; scratch comes from ``ops.empty``).
        group_of: ``id(param) -> optimizer param group`` for every trainable parameter.
        options: the engine's options; this class reads ``storage_dtype`` (updated values are rounded to it at
            once), ``stochastic_rounding``, ``keep_directions``, ``regenerate_directions``, and where the rule's
            buffers of the blocks live (host memory when blocks are offloaded, pinned for a CUDA device; the
            resident unit's always on ``device``).
        rule: the update rule (default MeZO-SGD); a stateful one keeps its buffers per unit.
        distribution: of z, ``"gaussian"`` (MeZO) or ``"rademacher"`` (see :func:`.seeds.draw_direction`).
    """

    def __init__(self, ops: DeviceOps, group_of: dict[int, int], options: EngineOptions,
                 rule: UpdateRule | None = None, distribution: str = "gaussian") -> None:
        self.ops = ops
        self.device = device = ops.device
        self.regenerate = options.regenerate_directions
        self._catch_up_scratch = "P" if self.regenerate else "z"
        self.distribution = distribution
        self.rule = rule if rule is not None else UpdateRule()
        # a shaped z (HiZOO, Sparse MeZO) is not what the update consumes: nothing kept from the runs serves it
        self.keep_directions = options.keep_directions and not self.rule.shapes_direction
        self._kept: dict[tuple[int, int, int], list[torch.Tensor]] = {}  # (unit, step, seed) -> z
        self._spare: list[list[torch.Tensor]] = []  # kept-z buffers given back by updates, reused
        self.group_of = group_of
        self.storage_dtype = options.storage_dtype
        self._round = stochastic_round if options.stochastic_rounding else round_to_nearest
        self.state = RuleState(self.rule, device, torch.device("cpu") if options.offload else device)
        self.generator = torch.Generator(device="cpu" if device.type == "meta" else device)  # meta: a dry run
        self._sizes: dict[torch.dtype, int] = {}
        self._scratch: dict[object, dict[torch.dtype, torch.Tensor]] = {}  # z_name(d), "P", "P2" -> per dtype

    def device_bytes(self) -> dict[str, int]:
        """Bytes of scratch on the working device, by name (``"scratch/P"``, ``"scratch/z"``, ``"scratch/z1"``...),
        and of directions kept for their deferred update (``"kept_directions"``)."""
        out = {f"scratch/{_label(name)}": sum(b.numel() * b.element_size() for b in bufs.values())
               for name, bufs in self._scratch.items()}
        out["kept_directions"] = sum(b.numel() * b.element_size() for bufs in self._kept.values() for b in bufs)
        return out

    # ------------------------------------------------------------------ scratch
    def size_for(self, units: Sequence[Unit]) -> None:
        """Size the scratch for the largest trainable part of any of ``units`` (once, at attach)."""
        for unit in units:
            for seg in unit.segments:
                self._sizes[seg.dtype] = max(self._sizes.get(seg.dtype, 0), seg.trainable_numel)

    def reserve(self, perturbations: Sequence[Perturbation], copies: int = 1) -> None:
        """Scratch for a z per direction of ``perturbations`` and ``copies`` perturbed copies (allocated once; a
        no-op after)."""
        directions = sorted({p.direction for p in perturbations if p.sign != 0} | {0})
        names = [] if self.regenerate else [z_name(d) for d in directions]
        if copies > 1 and "z" not in names:
            names.append("z")  # a conservative trial's scratch
        for name in [*names, *["P", "P2"][:copies]]:
            bufs = self._scratch.setdefault(name, {})
            for dt, n in self._sizes.items():
                if n and (dt not in bufs or bufs[dt].numel() < n):
                    bufs[dt] = self.ops.empty(n, dt)

    def views(self, name: object, unit: Unit) -> list[torch.Tensor]:
        """Per segment, the first ``trainable_numel`` elements of scratch buffer ``name``."""
        bufs = self._scratch[name]
        return [
            bufs[seg.dtype][: seg.trainable_numel] if seg.trainable_numel
            else torch.empty(0, dtype=seg.dtype, device=self.device)
            for seg in unit.segments
        ]

    # ------------------------------------------------------------------ arithmetic
    def draw(self, unit: Unit, step: int, seed: int, z: list[torch.Tensor]) -> None:
        """z of every trainable tensor of ``unit`` for (seed, step), into ``z`` (one flat per segment), by the
        rule's :meth:`~.rules.UpdateRule.draw_`."""
        for j, zz in enumerate(unit.trainable_views(z)):
            self.rule.draw_(zz, TensorKey(seed, step, unit.index, j), self.generator, self.distribution)

    def shape(self, unit: Unit, flats: list[torch.Tensor], z: list[torch.Tensor]) -> None:
        """z -> the direction the perturbed runs read (the rule's :meth:`~.rules.UpdateRule.perturbation_`, tensor
        by tensor, from the unit's current values and its state); nothing for rules that perturb along z."""
        if not self.rule.shapes_direction:
            return
        states = self.tensor_states(unit, flats)
        for zz, w, st in zip(unit.trainable_views(z), unit.trainable_views(flats), states):
            self.rule.perturbation_(zz, w, st)

    def tensor_states(self, unit: Unit, flats: list[torch.Tensor], borrowed=None) -> list[list[torch.Tensor]]:
        """Per trainable tensor, its views of the rule's state on the working device (``borrowed``: the unit's
        buffers already there); state created now is set by the rule's ``init_state_`` from ``flats`` first."""
        state = self.state
        if not self.rule.stateful:
            return [[] for _ in range(unit.trainable_count)]
        bufs = state.borrow(unit) if borrowed is None else borrowed
        views = state.tensor_views(unit, bufs)
        if unit.index in state.fresh:
            for w, st in zip(unit.trainable_views(flats), views):
                self.rule.init_state_(w, st)
            state.give_back(unit, bufs)
            state.fresh.discard(unit.index)
        return views

    def directions_of(self, unit: Unit, step: int, seeds: Sequence[int],
                      flats: list[torch.Tensor] | None = None) -> list[list[torch.Tensor]]:
        """z of every direction for ``unit`` at ``step``, drawn once: into buffers that wait for the update
        (``keep_directions``) or into the block scratch; shaped for the runs where the rule shapes it (from the
        unit's ``flats``)."""
        out = []
        for d, seed in enumerate(seeds):
            if self.keep_directions:
                key = (unit.index, step, seed)
                if key not in self._kept:
                    self._kept[key] = self._buffers(unit)
                z = self._kept[key]
            else:
                z = self.views(z_name(d), unit)
            self.draw(unit, step, seed, z)
            if flats is not None:
                self.shape(unit, flats, z)
            out.append(z)
        return out

    def perturb_one(self, unit: Unit, flats: list[torch.Tensor], z: list[torch.Tensor], scale: float,
                    out: list[torch.Tensor]) -> None:
        """``out = theta + scale * z`` on the unit's trainable head, segment by segment."""
        for seg, w, zz, pc in zip(unit.segments, flats, z, out):
            n = seg.trainable_numel
            perturb_into(pc[:n], w[:n], zz[:n], scale)

    def regenerate_into(self, unit: Unit, flats: list[torch.Tensor], step: int, seed: int, scale: float,
                        out: list[torch.Tensor]) -> None:
        """``out = theta + scale * z`` with z drawn into ``out`` itself (no z buffer); the same bits as
        :meth:`perturb_one` with a stored z."""
        self.draw(unit, step, seed, out)
        self.shape(unit, flats, out)
        self._perturb_in_place(unit, flats, out, scale)

    @staticmethod
    def _perturb_in_place(unit: Unit, flats: list[torch.Tensor], z: list[torch.Tensor], scale: float) -> None:
        """``z <- theta + scale * z`` on the trainable head: :meth:`perturb_one`'s ops (multiply, then add), in the
        z buffer itself, so the same bits."""
        for seg, w, zz in zip(unit.segments, flats, z):
            n = seg.trainable_numel
            zz[:n].mul_(scale).add_(w[:n])

    def perturb(
        self,
        unit: Unit,
        flats: list[torch.Tensor],
        step: int,
        eps: float,
        seeds: Sequence[int],
        out: dict[Perturbation, list[torch.Tensor]],
        z: list[torch.Tensor] | None = None,
        signs: Sequence[int] = (+1, -1),
    ) -> None:
        """theta + s * eps * z_d for every direction d and sign s, into ``out[(d, s)]``, all at once (the
        resident unit, read by every run between blocks). ``z``: scratch that keeps the last direction's z; None:
        each z is drawn into ``out[(d, +1)]``, the other signs' copies made from it, and it then becomes the
        +eps copy in place (the same bits). ``signs=(+1,)``: one-sided."""
        for d, seed in enumerate(seeds):
            zd = out[Perturbation(d, +1)] if z is None else z
            self.draw(unit, step, seed, zd)
            self.shape(unit, flats, zd)
            for s in signs:
                if z is None and s == +1:
                    continue
                self.perturb_one(unit, flats, zd, s * eps, out[Perturbation(d, s)])
            if z is None:
                self._perturb_in_place(unit, flats, zd, eps)

    def trial(
        self,
        unit: Unit,
        flats: list[torch.Tensor],
        commits: Sequence[Commit],
        out: dict[Perturbation, list[torch.Tensor]] | None = None,
        z: list[torch.Tensor] | None = None,
    ) -> None:
        """The candidates of a conservative step: ``out[(0, +1)]`` = theta after ``commits``, ``out[(0, -1)]`` =
        theta after the commits reversed, each computed exactly as :meth:`catch_up` would compute it (``out`` and
        the z scratch ``z`` default to the block scratch)."""
        if self.rule.stateful:
            raise ValueError(f"a conservative step needs a stateless update rule, not {self.rule.name!r}")
        z = self.views("z", unit) if z is None else z
        for sign in (+1, -1):
            copies = out[Perturbation(0, sign)] if out is not None else self.views("P" if sign > 0 else "P2", unit)
            for seg, w, c in zip(unit.segments, flats, copies):
                c[: seg.trainable_numel].copy_(w[: seg.trainable_numel])
            for commit in commits:
                self.draw(unit, commit.step, commit.seed, z)
                self.apply(unit, copies, z, commit if sign > 0 else commit.reversed())
                self.round_to_storage(unit, copies, commit)

    def catch_up(self, unit: Unit, flats: list[torch.Tensor], commits: Sequence[Commit]) -> bool:
        """Apply ``commits`` in order (rounded to storage after each); True if anything changed."""
        if not commits or not unit.is_trainable:
            return False
        scratch = self.views(self._catch_up_scratch, unit)
        for c in commits:  # one at a time, rounded after each: catching up k steps late changes nothing
            z = self._kept.pop((unit.index, c.step, c.seed), None)
            if z is None:
                z = scratch
                self.draw(unit, c.step, c.seed, z)
            self.apply(unit, flats, z, c)
            if z is not scratch:
                self._spare.append(z)
            self.round_to_storage(unit, flats, c)
        return True

    def prune_kept(self, before_step: int, pending: set[tuple[int, int]]) -> None:
        """Drop kept directions of earlier steps that no pending commit will use (a skipped update)."""
        for key in [k for k in self._kept if k[1] < before_step and k[1:] not in pending]:
            self._spare.append(self._kept.pop(key))

    def _buffers(self, unit: Unit) -> list[torch.Tensor]:
        """A kept-z buffer per segment of ``unit`` (reused from finished updates when the sizes match)."""
        shape = [(seg.dtype, seg.trainable_numel) for seg in unit.segments]
        for k, bufs in enumerate(self._spare):
            if [(b.dtype, b.numel()) for b in bufs] == shape:
                return self._spare.pop(k)
        return [self.ops.empty(n, dt) for dt, n in shape]

    def apply(self, unit: Unit, flats: list[torch.Tensor], z: list[torch.Tensor], c: Commit) -> None:
        """The rule's update of the unit's trainable tensors with ``grad = c.g * z``; z is consumed.

        16-bit working tensors (bf16 / fp16 parameters) are updated in fp32 and stochastically rounded back, so
        MeZO-size updates are not lost (:meth:`_apply_half`); the rule's state for them is fp32.
        """
        rule = self.rule
        state = self.state.borrow(unit)  # per segment, the rule's buffers where the update runs
        groups = [self.group_of[id(p)] for p in unit.trainable_params]
        hyper = {(c.lrs[g], c.weight_decays[g]) for g in groups}
        half = any(seg.trainable_numel and seg.dtype in HALF_DTYPES for seg in unit.segments)
        states = self.tensor_states(unit, flats, state)  # (state created now is initialised first)
        if len(hyper) == 1 and not half and not rule.per_tensor:  # one op over each segment's trainable head
            lr, wd = hyper.pop()
            for seg, w, zz, st in zip(unit.segments, flats, z, state):
                n = seg.trainable_numel
                if n:
                    rule.apply_(w[:n], zz[:n], st, c.g, lr, wd, c.hyper, c.t)
        else:  # tensor by tensor, in seed order
            for j, (w, zz, g, st) in enumerate(zip(unit.trainable_views(flats), unit.trainable_views(z), groups,
                                                  states)):
                key = TensorKey(c.seed, c.step, unit.index, j)
                if w.dtype in HALF_DTYPES:
                    self._apply_half(key, w, zz, st, c, c.lrs[g], c.weight_decays[g])
                elif rule.per_tensor:
                    rule.update_(w, zz, st, c, c.lrs[g], c.weight_decays[g], key, self.generator)
                else:
                    rule.apply_(w, zz, st, c.g, c.lrs[g], c.weight_decays[g], c.hyper, c.t)
        self.state.give_back(unit, state)

    def _apply_half(self, key: TensorKey, w: torch.Tensor, z: torch.Tensor, state: list[torch.Tensor],
                    c: Commit, lr: float, wd: float) -> None:
        """Tensor ``key.tensor`` of unit ``key.unit`` in 16 bit: the rule in fp32 on chunks, each rounded back (see
        HALF_CHUNK); a ``per_tensor`` rule's update takes the whole tensor as one chunk."""
        rule, j = self.rule, key.tensor
        if rule.per_tensor:
            theta = w.float()
            rule.update_(theta, z.float(), state, c, lr, wd, key, self.generator)
            self.generator.manual_seed(derive_seed(c.seed, c.step, key.unit, HALF_TAG + (j << 20)))
            w.copy_(self._round(theta, w.dtype, self.generator))
            return
        wf, zf, sf = w.view(-1), z.view(-1), [s.view(-1) for s in state]
        for i, start in enumerate(range(0, wf.numel(), HALF_CHUNK)):
            part = slice(start, start + HALF_CHUNK)
            theta = wf[part].float()
            rule.apply_(theta, zf[part].float(), [s[part] for s in sf], c.g, lr, wd, c.hyper, c.t)
            self.generator.manual_seed(derive_seed(c.seed, c.step, key.unit, HALF_TAG + (j << 20) + i))
            wf[part].copy_(self._round(theta, w.dtype, self.generator))

    def round_to_storage(self, unit: Unit, flats: list[torch.Tensor], c: Commit) -> None:
        """With 16-bit storage, make the updated working values representable in it right away, so the
        forwards see what the host will hold and the write-back is an exact cast. The rounding noise is seeded
        by the commit just applied: a resumed or early-flushed run stores the same bits."""
        dtype = self.storage_dtype
        if dtype is None:
            return
        for k, (seg, w) in enumerate(zip(unit.segments, flats)):
            n = seg.trainable_numel
            if n and seg.dtype != dtype:
                self.generator.manual_seed(derive_seed(c.seed, c.step, unit.index, _ROUNDING_TAG + k))
                w[:n].copy_(self._round(w[:n], dtype, self.generator))


def _label(name: object) -> str:
    """``"z"``, ``("z", 2)`` -> ``"z2"``, ``"P"``: the scratch names as they are reported."""
    return "".join(str(part) for part in name) if isinstance(name, tuple) else str(name)
