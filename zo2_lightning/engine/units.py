"""Units: the parameters of one block (or of everything resident), packed into flat buffers.

``unit = Unit.build(index, params, trainable)``; ``unit.bind(flats)`` points every parameter at its slice.

A unit keeps one flat buffer per dtype (a *segment*). Inside a segment the trainable tensors come first,
so the perturbation and the update are one elementwise op over ``flat[:segment.trainable_numel]``; frozen
tensors (``requires_grad=False``, or not given to the optimizer) follow and are only ever read. A
parameter's index among the unit's trainable tensors is the ``tensor`` part of its seed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from zo2_lightning.engine.pinned import flat_empty


@dataclass(frozen=True)
class ParamSpan:
    """Where one parameter lives inside its segment's flat buffer: ``flat[offset : offset + numel]``."""

    param: nn.Parameter
    offset: int
    shape: torch.Size

    @property
    def numel(self) -> int:
        return self.shape.numel()

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        return flat[self.offset : self.offset + self.numel].view(self.shape)


@dataclass(frozen=True)
class Segment:
    """All of a unit's parameters of one dtype: trainable spans first, then frozen ones."""

    dtype: torch.dtype
    spans: tuple[ParamSpan, ...]
    trainable_spans: int  # the first ``trainable_spans`` spans are trainable
    trainable_numel: int
    numel: int


@dataclass
class Unit:
    """The parameters of one block, or the resident rest of the model.

    Attributes:
        index: the block index, or ``seeds.RESIDENT_UNIT``.
        segments: one per dtype, in first-seen order.
        trainable_count: number of trainable tensors (the ``tensor`` seed index runs over them, segment by
            segment).
    """

    index: int
    segments: tuple[Segment, ...]
    trainable_count: int

    @classmethod
    def build(cls, index: int, params: Iterable[nn.Parameter], trainable: set[int]) -> Unit:
        """Pack ``params`` (deduplicated, in order); ``trainable`` holds the ``id`` of each trainable one."""
        by_dtype: dict[torch.dtype, tuple[list[nn.Parameter], list[nn.Parameter]]] = {}
        seen: set[int] = set()
        for p in params:
            if id(p) in seen:
                continue  # tied within the unit: one span
            seen.add(id(p))
            train, frozen = by_dtype.setdefault(p.dtype, ([], []))
            (train if id(p) in trainable else frozen).append(p)
        segments = []
        n_train = 0
        for dtype, (train, frozen) in by_dtype.items():
            spans, offset = [], 0
            for p in [*train, *frozen]:
                spans.append(ParamSpan(p, offset, p.shape))
                offset += p.numel()
            t_numel = sum(p.numel() for p in train)
            segments.append(Segment(dtype, tuple(spans), len(train), t_numel, offset))
            n_train += len(train)
        return cls(index, tuple(segments), n_train)

    @property
    def is_trainable(self) -> bool:
        """Whether any of the unit's tensors is perturbed and updated."""
        return self.trainable_count > 0

    @property
    def params(self) -> list[nn.Parameter]:
        return [s.param for seg in self.segments for s in seg.spans]

    @property
    def trainable_params(self) -> list[nn.Parameter]:
        """Trainable parameters in seed order."""
        return [s.param for seg in self.segments for s in seg.spans[: seg.trainable_spans]]

    @property
    def numel(self) -> int:
        return sum(seg.numel for seg in self.segments)

    @property
    def nbytes(self) -> int:
        return sum(seg.numel * seg.dtype.itemsize for seg in self.segments)

    def pack(self, device: torch.device, pin: bool = False, dtype: torch.dtype | None = None,
             allocate: Callable[[int, torch.dtype], torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Copy the parameters' current values into new flat buffers on ``device`` (cast to ``dtype`` if given;
        ``allocate(numel, dtype)`` makes the buffers where given, e.g. the working device's ``ops.empty``)."""
        flats = []
        for seg in self.segments:
            n, dt = seg.numel, dtype or seg.dtype
            flat = allocate(n, dt) if allocate is not None else flat_empty(n, dt, device, pin)  # host: exact size
            for span in seg.spans:
                span.view(flat).copy_(span.param.data)
            flats.append(flat)
        return flats

    def bind(self, flats: Sequence[torch.Tensor]) -> None:
        """Point every parameter at its view of ``flats`` (one per segment)."""
        for seg, flat in zip(self.segments, flats):
            for span in seg.spans:
                span.param.data = span.view(flat)

    def bind_signed(self, flats: Sequence[torch.Tensor], perturbed: Sequence[torch.Tensor]) -> None:
        """Trainable parameters read ``perturbed``; frozen ones read the pristine ``flats``."""
        for seg, flat, pert in zip(self.segments, flats, perturbed):
            for i, span in enumerate(seg.spans):
                span.param.data = span.view(pert if i < seg.trainable_spans else flat)

    def trainable_views(self, flats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The trainable tensors' views of ``flats``, in seed order."""
        return [
            span.view(flat) for seg, flat in zip(self.segments, flats) for span in seg.spans[: seg.trainable_spans]
        ]
