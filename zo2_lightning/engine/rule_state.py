"""The buffers of a stateful update rule (momentum, Adam moments), one set per unit, and where they live.

``state = RuleState(rule, device, home=torch.device("cpu"))``; ``bufs = state.borrow(unit)`` (per segment, on
``device``), the update, ``state.give_back(unit, bufs)``; ``state.state_dict(units)`` / ``load_state_dict``.

A streamed block's buffers live at ``home`` (host memory, pinned when ``device`` is CUDA), next to the block's
host copy: they travel to the device with the block for its update and come back after it, so the device never
holds more than one block's state. The resident unit's (everything outside the blocks) live on ``device``.
Buffers are created, zeroed, at a unit's first update, in the parameters' dtype (fp32 for 16-bit ones).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from zo2_lightning.engine.pinned import serving
from zo2_lightning.engine.rules import UpdateRule
from zo2_lightning.engine.seeds import RESIDENT_UNIT
from zo2_lightning.engine.units import Segment, Unit

Buffers = list[list[torch.Tensor]]  # per segment of a unit, one flat per name in rule.state_names


class RuleState:
    def __init__(self, rule: UpdateRule, device: torch.device, home: torch.device | None = None) -> None:
        self.rule = rule
        self.device = device
        self.home = device if home is None else home
        self.buffers: dict[int, Buffers] = {}  # unit index -> buffers where they live
        self.fresh: set[int] = set()  # units whose buffers were created and await the rule's init_state_

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers so far (host and device together)."""
        return sum(b.numel() * b.element_size() for segs in self.buffers.values() for bufs in segs for b in bufs)

    def _home_of(self, unit: Unit) -> torch.device:
        return self.device if unit.index == RESIDENT_UNIT else self.home

    def of(self, unit: Unit) -> Buffers:
        """The unit's buffers where they live (zeros at first use)."""
        if unit.index not in self.buffers:
            home = self._home_of(unit)
            pin = home.type == "cpu" and self.device.type == "cuda"
            with serving(self.device):
                self.buffers[unit.index] = [  # 16-bit parameters keep fp32 state (their update runs in fp32)
                    self.rule.new_state(self._numel(seg), _state_dtype(seg.dtype), home, pin)
                    for seg in unit.segments
                ]
            self.fresh.add(unit.index)
        return self.buffers[unit.index]

    def _numel(self, seg: Segment) -> int:
        """State elements of a segment: each trainable tensor's ``rule.state_shape``, in seed order."""
        return sum(self.rule.state_shape(span.shape).numel() for span in seg.spans[: seg.trainable_spans])

    def tensor_views(self, unit: Unit, buffers: Buffers) -> list[list[torch.Tensor]]:
        """Per trainable tensor of ``unit`` (seed order), its view of each state buffer, shaped by
        ``rule.state_shape``."""
        out = []
        for seg, bufs in zip(unit.segments, buffers):
            offset = 0
            for span in seg.spans[: seg.trainable_spans]:
                shape = self.rule.state_shape(span.shape)
                out.append([b[offset : offset + shape.numel()].view(shape) for b in bufs])
                offset += shape.numel()
        return out

    def borrow(self, unit: Unit) -> Buffers:
        """The unit's buffers on ``device`` for an update (the same tensors when they live there)."""
        if not self.rule.stateful:
            return [[] for _ in unit.segments]
        home = self.of(unit)
        if self._home_of(unit) == self.device:
            return home
        return [[b.to(self.device, non_blocking=True) for b in bufs] for bufs in home]

    def give_back(self, unit: Unit, borrowed: Buffers) -> None:
        """Copy updated buffers home (blocking: the host copy is current before anything reads it)."""
        home = self.buffers.get(unit.index)
        if home is None or home is borrowed:
            return
        for bufs_home, bufs in zip(home, borrowed):
            for h, b in zip(bufs_home, bufs):
                h.copy_(b)

    def state_dict(self, units: Sequence[Unit]) -> dict[int, Buffers]:
        indices = {u.index for u in units}
        return {i: bufs for i, bufs in self.buffers.items() if i in indices}

    def load_state_dict(self, units: Sequence[Unit], saved: dict[Any, Buffers]) -> None:
        """Copy saved buffers into this run's (shapes must match unit by unit).

        Raises:
            ValueError: a saved unit is missing here or its buffers have other shapes (another model).
        """
        by_index = {u.index: u for u in units}
        for i, bufs_saved in saved.items():
            unit = by_index.get(int(i))
            own = self.of(unit) if unit is not None else None
            shapes = [[tuple(b.shape) for b in bufs] for bufs in bufs_saved]
            if own is None or shapes != [[tuple(b.shape) for b in bufs] for bufs in own]:
                raise ValueError(f"the checkpoint's optimizer state for unit {i} does not fit this model ({shapes})")
            for bufs_own, bufs in zip(own, bufs_saved):
                for b, v in zip(bufs_own, bufs):
                    b.copy_(v)
            self.fresh.discard(unit.index)  # the saved state was initialised by the run that wrote it


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
