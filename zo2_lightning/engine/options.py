"""What the engine is asked to do: every option of the offload engine, declared, validated and described once.

``options = EngineOptions(offload_device="cpu", prefetch=2, storage_dtype="bf16")``, then
``ZOEngine(model, blocks, device, options)``. ``ZO2OffloadStrategy(prefetch=2, ...)`` builds one from its keyword
arguments (Hydra's ``offload`` group passes them), and the engine hands the same object to its parts (the block
streamer, the SPSA arithmetic), so no option is renamed, re-validated or documented anywhere else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

#: accepted spellings of ``storage_dtype``; ``None`` (and fp32) keeps the parameters' own dtype
STORAGE_DTYPES: dict[Any, torch.dtype | None] = {
    None: None, "fp32": None, "float32": None, torch.float32: None,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, torch.bfloat16: torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, torch.float16: torch.float16,
}
OFFLOAD_DEVICES = ("cpu", "disk", None)


@dataclass(frozen=True)
class EngineOptions:
    """The offload engine's options, validated when built.

    Attributes:
        offload_device: where block parameters live between uses: ``"cpu"`` (host memory, streamed to the working
            device a block at a time), ``"disk"`` (safetensors files under ``offload_dir``, for models larger than
            host RAM), or ``None`` (the whole model stays on the working device: in-device MeZO).
        offload_dir: with ``offload_device="disk"``, the directory on a local drive that holds one file per block.
        disk_flush_every: disk offload rewrites a block's file only every this many updates (and at a flush,
            atomically); in between, the pending ``(seed, g, lr)`` updates are replayed on each read, so the drive
            is mostly read.
        pin_memory: page-lock the host copies so uploads and write-backs run asynchronously at the link's rate;
            each buffer is pinned at its exact size (see :mod:`.pinned`). ``None``: pin when the working device is
            CUDA.
        split_blocks: stream each block in parts (:func:`.blocks.split_blocks`: a decoder layer's attention and MLP
            layers, each uploaded, perturbed and written back on its own), so the device slots and the block-sized
            scratch hold a part instead of a layer (OPT: a third): the same bytes on the bus, a third of their
            buffers on the device. The parts are numbered as units of their own, so z is drawn per part: resume a
            run with the setting it started with.
        prefetch: blocks uploaded ahead of the one computing, on a side stream (CUDA; CPU copies are synchronous).
        device_slots: device buffers for streamed blocks. ``None``: ``prefetch + 2`` (the block in use, the one
            being written back, the prefetched ones); ``prefetch + 1`` saves one block of device memory, each upload
            into a just-released buffer then waiting for its write-back (off the compute stream, but the two
            directions of the bus no longer overlap).
        resident_blocks: the first N blocks stay on the working device for the whole run; ``"auto"``: after the
            first (fully streamed) step, as many as fit under ``max_gpu_memory``.
        max_gpu_memory: the budget of ``resident_blocks="auto"`` in bytes; ``None``: 90% of the device's memory.
        storage_dtype: dtype of the blocks' host copies, ``"bf16"`` / ``"fp16"`` (or the torch dtype): half the
            bytes stored and moved, compute in the parameters' dtype; updated values are narrowed with seeded
            stochastic rounding, so MeZO-size updates are not rounded away. ``None``: the parameters' dtype.
        stochastic_rounding: narrow updated 16-bit values with seeded stochastic rounding (``False``:
            round-to-nearest, which loses MeZO-size updates; for comparisons only).
        keep_directions: keep each block's z from its perturbation until its deferred update instead of drawing it
            again: one draw per parameter per step saved, one extra copy of the trainable parameters held on the
            working device. For models that fit (CPU training, in-device MeZO), where drawing z dominates.
        regenerate_directions: keep no z on the working device: each run's perturbed copy of a block and of the
            resident parameters is drawn afresh as the run takes its turn, into one buffer each. The least device
            memory (the largest models), for 2q draws per block per step instead of q. Excludes
            ``keep_directions``.
        force_copies: copy between separate host and working buffers even when both are on the CPU, so the
            transfer path runs without a GPU (tests).
        simulated_device: run the transfer path on a simulated asynchronous device (:mod:`.simulated`) whose
            scheduler has this seed: the CUDA schedule of streams, events and slot reuse, on the CPU, with every
            copy as late as the schedule allows (tests). ``None``: the real device.

    Raises:
        ValueError: an unknown ``offload_device`` or ``storage_dtype``; ``"disk"`` without ``offload_dir`` (or the
            other way round); a negative ``prefetch`` or ``resident_blocks``; ``device_slots`` below
            ``prefetch + 1``; ``disk_flush_every`` below 1; both ``keep_directions`` and
            ``regenerate_directions``; a number given as text that is not one (a Hydra override such as
            ``offload.prefetch=abc``).
    """

    offload_device: str | None = "cpu"
    offload_dir: str | None = None
    disk_flush_every: int = 16
    pin_memory: bool | None = None
    split_blocks: bool = False
    prefetch: int = 1
    device_slots: int | None = None
    resident_blocks: int | str = 0
    max_gpu_memory: int | None = None
    storage_dtype: torch.dtype | str | None = None
    stochastic_rounding: bool = True
    keep_directions: bool = False
    regenerate_directions: bool = False
    force_copies: bool = False
    simulated_device: int | None = None

    def __post_init__(self) -> None:
        if self.offload_device not in OFFLOAD_DEVICES:
            raise ValueError(
                f"offload_device={self.offload_device!r} is not supported: use 'cpu' (stream blocks from host"
                " memory), 'disk' (from files under offload_dir) or None (keep the whole model on the working device)"
            )
        if (self.offload_device == "disk") != (self.offload_dir is not None):
            raise ValueError(
                "disk offload needs both `offload_device='disk'` and `offload_dir='/path/on/a/local/drive'`"
            )
        prefetch = _integer("prefetch", self.prefetch)
        resident = self.resident_blocks if self.resident_blocks == "auto" else _integer(
            "resident_blocks", self.resident_blocks, hint="an integer >= 0 or 'auto'")
        if prefetch < 0 or (resident != "auto" and resident < 0):
            raise ValueError(f"prefetch ({prefetch}) and resident_blocks ({resident}) must be >= 0")
        slots = None if self.device_slots is None else _integer("device_slots", self.device_slots)
        if slots is not None and slots < prefetch + 1:
            raise ValueError(
                f"device_slots={slots} cannot hold the block in use and {prefetch} prefetched ones: use at least"
                f" prefetch + 1 = {prefetch + 1}, or None for prefetch + 2"
            )
        flush_every = _integer("disk_flush_every", self.disk_flush_every)
        if flush_every < 1:
            raise ValueError(f"disk_flush_every must be >= 1, got {flush_every}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ValueError(
                f"storage_dtype={self.storage_dtype!r}: choose 'bf16', 'fp16' or None (the parameters' dtype)"
            )
        if self.keep_directions and self.regenerate_directions:
            raise ValueError(
                "keep_directions (keep z until the update) and regenerate_directions (keep no z) exclude each"
                " other: choose one"
            )
        budget = None if self.max_gpu_memory is None else _integer("max_gpu_memory", self.max_gpu_memory)
        simulated = None if self.simulated_device is None else _integer("simulated_device", self.simulated_device)
        for name, value in (("prefetch", prefetch), ("resident_blocks", resident), ("device_slots", slots),
                            ("disk_flush_every", flush_every), ("max_gpu_memory", budget),
                            ("simulated_device", simulated),
                            ("storage_dtype", STORAGE_DTYPES[self.storage_dtype])):
            object.__setattr__(self, name, value)  # frozen: the normalised values replace the given spellings
        for name in ("split_blocks", "stochastic_rounding", "keep_directions", "regenerate_directions",
                     "force_copies"):
            object.__setattr__(self, name, bool(getattr(self, name)))

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @property
    def offload(self) -> bool:
        """Whether block parameters live away from the working device (host memory or disk)."""
        return self.offload_device is not None

    @property
    def slot_count(self) -> int:
        """The device buffers for streamed blocks (``device_slots``, or ``prefetch + 2``)."""
        return self.prefetch + 2 if self.device_slots is None else self.device_slots

    def pins(self, device: torch.device) -> bool:
        """Whether host copies serving ``device`` are page-locked (``pin_memory``, or CUDA when it is None)."""
        return self.offload and device.type == "cuda" and (self.pin_memory is None or bool(self.pin_memory))


def _integer(name: str, value: Any, hint: str = "an integer") -> int:
    """``int(value)``, or an error that names the option (a Hydra override like ``offload.prefetch=abc``)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be {hint}, got {value!r} (on the command line: offload.{name}=2)")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {hint}, got {value!r} (on the command line: offload.{name}=2)") from None
