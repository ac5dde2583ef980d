"""Units: the parameters of one block (or of everything resident), packed into flat buffers.

``unit = Unit.build(index, params, trainable)``; ``unit.bind(flats)`` points every parameter at its slice.

A unit keeps one flat buffer per dtype (a *segment*). Inside a segment the trainable tensors come first,
so the perturbation and the update are one elementwise op over ``flat[:segment.trainable_numel]``; frozen
tensors (``requires_grad=False``, or not given to the optimizer) follow and are only ever read. A
parameter's index among the unit's trainable tensors is the ``tensor`` part of its seed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from zo2_lightning.engine.pinned import flat_empty


@dataclass(frozen=True)
class Slot:
    """Where one parameter lives inside its segment's flat buffer."""

    param: nn.Parameter
    offset: int
    shape: torch.Size

    @property
    def trainable_params(self) -> list[nn.Parameter]:
        """Trainable parameters in seed order."""
        return [s.param for seg in self.segments for s in seg.slots[: seg.trainable_slots]]

    @property
    def numel(self) -> int:
        return self.shape.numel()

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        return flat[self.offset : self.offset + self.numel].view(self.shape)


@dataclass(frozen=True)
class Segment:
    """All of a unit's parameters of one dtype: trainable slots first, then frozen ones."""

    dtype: torch.dtype
    slots: tuple[Slot, ...]
    trainable_slots: int  # the first ``trainable_slots`` slots are trainable
    trainable_numel: int
    numel: int


@dataclass
class Unit:
    """The parameters of one block, or the resident rest of the model.

    Attributes:
        index: the block index, or ``seeds.RESIDENT_UNIT``.
        segments: one per dtype, in first-seen order.
        trainable: number of trainable tensors (the ``tensor`` seed index runs over them, segment by segment).
    """

    index: int
    segments: tuple[Segment, ...]
    trainable: int

    @classmethod
    def build(cls, index: int, params: Iterable[nn.Parameter], trainable: set[int]) -> Unit:
        """Pack ``params`` (deduplicated, in order); ``trainable`` holds the ``id`` of each trainable one."""
        by_dtype: dict[torch.dtype, tuple[list[nn.Parameter], list[nn.Parameter]]] = {}
        seen: set[int] = set()
        for p in params:
            if id(p) in seen:
                continue  # tied within the unit: one slot
            seen.add(id(p))
            train, frozen = by_dtype.setdefault(p.dtype, ([], []))
            (train if id(p) in trainable else frozen).append(p)
        segments = []
        n_train = 0
        for dtype, (train, frozen) in by_dtype.items():
            slots, offset = [], 0
            for p in [*train, *frozen]:
                slots.append(Slot(p, offset, p.shape))
                offset += p.numel()
            t_numel = sum(p.numel() for p in train)
            segments.append(Segment(dtype, tuple(slots), len(train), t_numel, offset))
            n_train += len(train)
        return cls(index, tuple(segments), n_train)

    @property
    def params(self) -> list[nn.Parameter]:
        return [s.param for seg in self.segments for s in seg.slots]

    @property
    def trainable_params(self) -> list[nn.Parameter]:
        """Trainable parameters in seed order."""
        return [s.param for seg in self.segments for s in seg.slots[: seg.trainable_slots]]

    @property
    def numel(self) -> int:
        return sum(seg.numel for seg in self.segments)

    @property
    def nbytes(self) -> int:
        return sum(seg.numel * seg.dtype.itemsize for seg in self.segments)

    def pack(self, device: torch.device, pin: bool = False, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """Copy the parameters' current values into new flat buffers on ``device`` (cast to ``dtype`` if given)."""
        flats = []
        for seg in self.segments:
            flat = flat_empty(seg.numel, dtype or seg.dtype, device, pin)  # host: pinned at its exact size
            for slot in seg.slots:
                slot.view(flat).copy_(slot.param.data)
            flats.append(flat)
        return flats

    def bind(self, flats: Sequence[torch.Tensor]) -> None:
        """Point every parameter at its view of ``flats`` (one per segment)."""
        for seg, flat in zip(self.segments, flats):
            for slot in seg.slots:
                slot.param.data = slot.view(flat)

    def bind_signed(self, flats: Sequence[torch.Tensor], perturbed: Sequence[torch.Tensor]) -> None:
        """Trainable parameters read ``perturbed``; frozen ones read the pristine ``flats``."""
        for seg, flat, pert in zip(self.segments, flats, perturbed):
            for i, slot in enumerate(seg.slots):
                slot.param.data = slot.view(pert if i < seg.trainable_slots else flat)

    def trainable_views(self, flats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The trainable tensors' views of ``flats``, in seed order."""
        return [
            slot.view(flat) for seg, flat in zip(self.segments, flats) for slot in seg.slots[: seg.trainable_slots]
        ]
