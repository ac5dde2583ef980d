"""A simulated asynchronous device on the CPU: the CUDA copy schedule, tested without a GPU.

``ZOEngine(model, blocks, torch.device("cpu"), EngineOptions(simulated_device=seed))`` (or
``ZO2OffloadStrategy(simulated_device=seed)``) runs the engine's copy path (streams, events, slot reuse, write-back
ordering, prefetch) on this device instead of synchronous copies.

It behaves like an asynchronous device at its worst:

- a copy issued on a side stream does not happen when issued: from the moment it could start (it is first in its
  stream and the events its stream waits for are complete) its destination holds poison (NaN for floating
  tensors, the byte pattern ``0xA5`` otherwise) until the copy completes, and it reads its source when it
  completes, not when it was issued;
- a copy completes when something waits for an event recorded after it on its stream (the compute stream waiting,
  or its stream synchronized), or earlier, at a point a seeded scheduler picks at random; copies on one stream
  complete in order, and after the events their stream was told to wait for;
- work on the compute stream (the forwards, the updates) is immediate, as a CPU forward is.

So a read before its upload is waited for sees NaN, and a buffer overwritten while a pending copy still reads it, or
read while a pending copy still writes it, gives wrong bits: the equivalence tests fail. ``dropped`` (a test
switch) skips the waits of the named kinds (:data:`.device.WAITS`), to show each one is needed.

It also counts what a GPU would: bytes moved host->device and device->host, and bytes allocated on the device
(current and peak), from the engine's own buffers (:meth:`SimulatedDevice.empty`, :meth:`SimulatedDevice.track`)
and from every tensor the forwards create (:meth:`SimulatedDevice.compute_scope`).
"""

from __future__ import annotations

import random
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from zo2_lightning.engine.device import WAITS, DeviceOps

POISON_BYTE = 0xA5


@dataclass(eq=False)
class _Stream:
    name: str
    issued: int = 0  # copies issued on this stream so far
    done: int = 0  # copies completed (always a prefix: a stream runs in order)
    queue: deque = field(default_factory=deque)  # pending copies, in order
    waits: list = field(default_factory=list)  # events later copies must follow


@dataclass(eq=False)
class _Event:
    stream: _Stream | None  # None: recorded on the compute stream, complete at once
    upto: int = 0  # complete once stream.done >= upto

    @property
    def complete(self) -> bool:
        return self.stream is None or self.stream.done >= self.upto


@dataclass(eq=False)
class _Copy:
    dsts: Sequence[torch.Tensor]
    srcs: Sequence[torch.Tensor]
    after: list[_Event]  # what the stream waited for before this copy was issued
    started: bool = False  # its destination holds poison from here until it completes


class SimulatedDevice(DeviceOps):
    """A CPU stand-in for an asynchronous accelerator (see the module docstring).

    Args:
        device: the CPU.
        seed: seed of the scheduler that completes pending copies early.
        early: probability that, at each operation, one more pending copy completes early.
    """

    asynchronous = True
    #: names of waits to skip (tests only; see ``device.WAITS``)
    dropped: frozenset[str] = frozenset()

    def __init__(self, device: torch.device, seed: int = 0, early: float = 0.35) -> None:
        super().__init__(device)
        self.rng = random.Random(seed)
        self.early = early
        self._streams: list[_Stream] = []
        self._compute = _Stream("compute")
        self._device_storages: dict[int, int] = {}  # storage key -> bytes, for what lives "on the device"
        self._temporaries: dict[int, int] = {}  # of those, the ones the forwards made
        self.bytes_h2d = 0
        self.bytes_d2h = 0
        self.allocated = 0
        self.peak_allocated = 0
        self.peak_temporaries = 0
        self._engine_allocating = False

    # ------------------------------------------------------------------ streams and events
    def new_stream(self) -> _Stream:
        stream = _Stream(f"side{len(self._streams)}")
        self._streams.append(stream)
        return stream

    def compute_stream(self) -> _Stream:
        return self._compute

    def copy(self, dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor], stream: Any) -> None:
        if stream is None or stream is self._compute:
            self._perform(dsts, srcs)
            return
        stream.queue.append(_Copy(list(dsts), list(srcs), list(stream.waits)))
        stream.issued += 1
        self._start_ready()
        self._progress()

    def record(self, stream: Any) -> _Event | None:
        self._progress()
        if stream is None or stream is self._compute:
            return None  # the compute stream's work is already done
        return _Event(stream, stream.issued)

    def wait(self, stream: Any, event: Any, name: str) -> None:
        if name not in WAITS:
            raise ValueError(f"unknown wait {name!r}: name it in device.WAITS")
        if event is None or name in self.dropped:
            return
        if stream is None or stream is self._compute:
            self._complete(event)  # the compute runs now, so what it waits for must be done now
        else:
            stream.waits.append(event)
        self._progress()

    def synchronize(self, stream: Any, name: str) -> None:
        if name not in WAITS:
            raise ValueError(f"unknown wait {name!r}: name it in device.WAITS")
        if stream is not None and stream is not self._compute and name not in self.dropped:
            self._complete(_Event(stream, stream.issued))

    def pending(self) -> int:
        """Copies issued and not yet completed."""
        return sum(len(s.queue) for s in self._streams)

    def _complete(self, event: _Event) -> None:
        stream = event.stream
        while stream is not None and stream.done < event.upto:
            head: _Copy = stream.queue[0]
            for before in head.after:  # the events this stream was told to wait for come first
                self._complete(before)
            self._start(head)
            stream.queue.popleft()
            self._perform(head.dsts, head.srcs)
            stream.done += 1
            self._start_ready()

    def _start_ready(self) -> None:
        """Every copy that could start now (first in its stream, its waits complete) starts: its destination is
        poisoned until it completes."""
        for stream in self._streams:
            if stream.queue and not stream.queue[0].started and all(e.complete for e in stream.queue[0].after):
                self._start(stream.queue[0])

    @staticmethod
    def _start(copy: _Copy) -> None:
        if copy.started:
            return
        copy.started = True
        for d in copy.dsts:
            _poison(d)

    def _progress(self) -> None:
        """The scheduler's random early completions: while a coin lands, one more copy at the head of a random
        stream completes (with what it depends on)."""
        while self.rng.random() < self.early:
            busy = [s for s in self._streams if s.queue]
            if not busy:
                return
            stream = self.rng.choice(busy)
            self._complete(_Event(stream, stream.done + 1))

    def _perform(self, dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor]) -> None:
        for d, s in zip(dsts, srcs):
            d.copy_(s)
            nbytes = d.numel() * d.element_size()
            to_device, from_device = self._on_device(d), self._on_device(s)
            if to_device and not from_device:
                self.bytes_h2d += nbytes
            elif from_device and not to_device:
                self.bytes_d2h += s.numel() * s.element_size()

    # ------------------------------------------------------------------ memory
    def release(self, buffers: Sequence[torch.Tensor]) -> None:
        """A freed buffer is reused at once, at worst: a copy still reading it reads poison."""
        for b in buffers:
            _poison(b)

    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        self._engine_allocating = True  # made by the engine, for the engine: not one of the forwards' temporaries
        try:
            t = torch.empty(numel, dtype=dtype, device=self.device)
        finally:
            self._engine_allocating = False
        self._count(t, temporary=False)
        return t

    def track(self, tensor: torch.Tensor) -> None:
        self._count(tensor, temporary=False)

    @contextmanager
    def compute_scope(self) -> Iterator[None]:
        with _CountAllocations(self):
            yield

    def _on_device(self, t: torch.Tensor) -> bool:
        return _key(t) in self._device_storages

    def _count(self, t: torch.Tensor, temporary: bool) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._device_storages:
            return
        nbytes = storage.nbytes()
        self._device_storages[key] = nbytes
        if temporary:
            self._temporaries[key] = nbytes
            self.peak_temporaries = max(self.peak_temporaries, sum(self._temporaries.values()))
        self.allocated += nbytes
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.allocated -= self._device_storages.pop(key, 0)
        self._temporaries.pop(key, None)

    def peak_memory(self) -> int:
        return self.peak_allocated

    def reset_peak(self) -> None:
        """Start the peaks again from what is allocated now."""
        self.peak_allocated = self.allocated
        self.peak_temporaries = sum(self._temporaries.values())

    def engine_bytes(self) -> int:
        """Bytes allocated now by the engine's own buffers (not the forwards' temporaries)."""
        return self.allocated - sum(self._temporaries.values())


class _CountAllocations(TorchDispatchMode):
    """Every tensor an operation creates while the forwards run lives on the device: count its storage."""

    def __init__(self, device: SimulatedDevice) -> None:
        super().__init__()
        self.sim = device

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.sim._engine_allocating:
            return out
        inputs = {_key(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):  # in-place, out= and view results share an input's storage: not new memory
            if isinstance(t, torch.Tensor) and _key(t) not in inputs and t.untyped_storage().nbytes():
                self.sim._count(t, temporary=True)
        return out


def _poison(t: torch.Tensor) -> None:
    if t.is_floating_point():
        t.fill_(float("nan"))
    else:
        t.view(torch.uint8).fill_(POISON_BYTE)


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata
