"""The device operations of the copy path: streams, events, asynchronous copies and device buffers, behind one
small interface.

The engine picks one for its working device (``ZOEngine.ops``); the streamer does every transfer through it:
``up = ops.new_stream()``, ``ops.copy(dsts, srcs, up)``, ``ready = ops.record(up)``, then
``ops.wait(ops.compute_stream(), ready, "upload->compute")`` before the compute reads;
``ops.synchronize(off, "write-back->host")`` outside the step loop; buffers that live on the working device come from ``ops.empty(numel, dtype)``.

Three implementations:

- :class:`CudaOps`: CUDA streams and events, ``non_blocking`` copies; what runs on a GPU.
- :class:`DeviceOps` itself: host and working device are one memory, or copies are synchronous (CPU training,
  ``force_copies``): a copy happens when issued, there are no streams and no events.
- :class:`zo2_lightning.engine.simulated.SimulatedDevice`: a CPU device that behaves like an asynchronous one at
  its worst (``EngineOptions(simulated_device=seed)``), so the CUDA schedule can be tested without a GPU; on the
  meta device it computes nothing and counts the memory a step would take (a dry run of any size).

Every wait is named (``"upload->compute"``...) so that a test can remove one at a time and show the simulated
device catches the race it guards (:data:`WAITS`). The names cost nothing on CUDA.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

#: the waits of the copy schedule, each named by the race it prevents
WAITS = {
    "upload->compute": "the compute reads a block only after its upload finished",
    "write-back->upload:slot": "an upload overwrites a device slot only after the write-back that reads it",
    "write-back->upload:host": "a block is uploaded again only after its host copy was written back",
    "compute->write-back": "a write-back reads a slot only after the compute that updated it",
    "write-back->host": "the host copies are read (flush, checkpoint) only after every write-back finished",
    "write-back->free": "a device buffer is freed (and may be reused at once) only after the write-back reading it",
}


class DeviceOps:
    """Synchronous copies and no streams: the working buffers are plain tensors on ``device``.

    Args:
        device: the working device.
    """

    #: whether copies on a side stream may finish after they are issued
    asynchronous = False

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def new_stream(self) -> Any:
        """A side stream for copies (``None``: copies run where they are issued)."""
        return None

    def compute_stream(self) -> Any:
        """The stream the forwards and the updates run on."""
        return None

    def copy(self, dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor], stream: Any) -> None:
        """``dst.copy_(src)`` for each pair, on ``stream`` (here: now)."""
        for d, s in zip(dsts, srcs):
            d.copy_(s)

    def record(self, stream: Any) -> Any:
        """An event that completes when everything issued on ``stream`` so far has finished (``None``: already)."""
        return None

    def wait(self, stream: Any, event: Any, name: str) -> None:
        """Work issued on ``stream`` after this call starts only after ``event`` completed; ``name``: one of
        :data:`WAITS`."""

    def synchronize(self, stream: Any, name: str) -> None:
        """Block the host until everything issued on ``stream`` has finished; ``name``: one of :data:`WAITS`."""

    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A new 1-D buffer on the working device."""
        return torch.empty(numel, dtype=dtype, device=self.device)

    def release(self, buffers: Sequence[torch.Tensor]) -> None:
        """The engine drops ``buffers`` (device memory the allocator may hand out again at once)."""

    def track(self, tensor: torch.Tensor) -> None:
        """``tensor`` was placed on the working device by the engine (counted where the device counts memory)."""

    def compute_scope(self) -> Any:
        """A context around the forwards (where the device counts the memory they allocate)."""
        return _NoScope()

    def peak_memory(self) -> int | None:
        """Peak bytes allocated on the device so far (``None``: the device does not count)."""
        return None

    def total_memory(self) -> int | None:
        """The device's capacity in bytes (``None``: unknown)."""
        return None


class CudaOps(DeviceOps):
    """The CUDA implementation: side streams, events, ``non_blocking`` copies from pinned host memory."""

    asynchronous = True

    def new_stream(self) -> torch.cuda.Stream:
        return torch.cuda.Stream(self.device)

    def compute_stream(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def copy(self, dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor], stream: Any) -> None:
        with torch.cuda.stream(stream):
            for d, s in zip(dsts, srcs):
                d.copy_(s, non_blocking=True)

    def record(self, stream: Any) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def wait(self, stream: Any, event: Any, name: str) -> None:
        if event is not None:
            stream.wait_event(event)

    def synchronize(self, stream: Any, name: str) -> None:
        stream.synchronize()

    def peak_memory(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.device))

    def total_memory(self) -> int:
        return int(torch.cuda.get_device_properties(self.device).total_memory)


class _NoScope:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
