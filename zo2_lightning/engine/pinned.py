"""Page-locked host buffers of exactly the size asked for.

``with serving(device): flat = host_empty(numel, dtype, pin=True)``: a CPU tensor whose pages are locked, so copies
to and from ``device`` run asynchronously at the link's full rate. ``pin=False`` is a plain ``torch.empty``.
``flat_empty(numel, dtype, device, pin)`` picks: ``host_empty`` on the CPU, ``torch.empty`` on another device.

Why not ``torch.empty(..., pin_memory=True)``: torch's pinned allocator (``CachingHostAllocator``) rounds every
allocation up to the next power of two. An OPT-13B block in bf16 (629 MB) then pins 1 GiB, 1.7x its bytes, and
the host RAM, not the GPU, caps the largest model. Here each buffer is its own anonymous memory map, registered
with the CUDA driver (``cudaHostRegister``, the route torch's own checkpoint stager takes) and unregistered when
its storage is freed, i.e. when the last tensor viewing it is gone. What is locked is the buffer rounded up to
whole pages (4 KiB), and no page is shared with another allocation. Buffers under :data:`MIN_REGISTER_BYTES`
still come from torch's allocator (rounding them wastes little; registering each costs a driver call).

``ZO2_PINNED=torch`` in the environment sends every buffer through torch's allocator instead.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
import weakref

import torch

MIN_REGISTER_BYTES = 1 << 20
PAGE = mmap.PAGESIZE
_CHOICES = ("exact", "torch")
_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context, not only the current one

_lock = threading.Lock()
_registered_bytes = 0


class _CudaDriver:
    """The two driver calls, through torch's bindings of the CUDA runtime (tests substitute a fake)."""

    def device(self) -> int:
        return torch.cuda.current_device()

    def register(self, ptr: int, nbytes: int) -> int:
        return int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, _PORTABLE))

    def unregister(self, ptr: int, device: int) -> int:
        # On the registering device: the last reference may drop in another thread, whose current device is 0
        # (a context there would cost every rank GPU memory on GPU 0). A copy may still be reading or writing
        # these pages (teardown after a failed step): let it finish before the memory is unmapped; torch's own
        # pinned buffers get this from recorded events.
        with torch.cuda.device(device):
            torch.cuda.synchronize()
            return int(torch.cuda.cudart().cudaHostUnregister(ptr))


_driver = _CudaDriver()


def allocator() -> str:
    """``"exact"`` (default) or ``"torch"``, from ``ZO2_PINNED``.

    Raises:
        ValueError: ``ZO2_PINNED`` is set to something else.
    """
    choice = os.environ.get("ZO2_PINNED", "exact").strip().lower()
    if choice not in _CHOICES:
        raise ValueError(f"ZO2_PINNED={choice!r}: use one of {', '.join(_CHOICES)}")
    return choice


def registered_bytes() -> int:
    """Host bytes this module holds page-locked right now (buffers from torch's allocator not included)."""
    return _registered_bytes


def host_empty(numel: int, dtype: torch.dtype, pin: bool = False) -> torch.Tensor:
    """An uninitialised 1-D CPU tensor of ``numel`` elements, page-locked when ``pin``.

    Raises:
        RuntimeError: the driver refused to lock the pages (the message names the ways around it).
    """
    nbytes = numel * dtype.itemsize
    if not pin:
        return torch.empty(numel, dtype=dtype)
    if nbytes == 0 or nbytes < MIN_REGISTER_BYTES or allocator() == "torch":
        return torch.empty(numel, dtype=dtype, pin_memory=True)
    # The driver locks whole pages and refuses overlapping ranges, and a heap allocation may share its first and
    # last page with a neighbour. So each buffer gets pages of its own: an anonymous memory map (page-aligned,
    # returned to the OS when freed), which the tensor's storage keeps alive.
    locked = -(-nbytes // PAGE) * PAGE
    pages = mmap.mmap(-1, locked, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # private: what malloc would map
    flat = torch.frombuffer(pages, dtype=dtype, count=numel)
    storage = flat.untyped_storage()
    ptr = storage.data_ptr()
    err = _driver.register(ptr, locked)
    if err != 0:
        raise RuntimeError(
            f"cudaHostRegister of {nbytes / 2**20:.1f} MiB of host memory failed (cudaError {err}). Host memory may"
            " be short, or locked-memory limits may forbid it: free host memory, set ZO2_PINNED=torch to use"
            " torch's pinned allocator, or pass pin_memory=False (slower, synchronous copies)."
        )
    _count(locked)
    # Unlock when the storage dies. Its Python object lives exactly as long as the storage (torch preserves it),
    # so this fires after the last view, parameter or slice is gone, and before the map is unmapped.
    done = weakref.finalize(storage, _unregister, ptr, locked, _driver.device())
    done.atexit = False  # at exit the CUDA context may already be gone; the OS unlocks the pages anyway
    return flat


def flat_empty(numel: int, dtype: torch.dtype, device: torch.device, pin: bool = False) -> torch.Tensor:
    """An uninitialised 1-D tensor on ``device``: :func:`host_empty` on the CPU (page-locked when ``pin``), a plain
    ``torch.empty`` elsewhere."""
    if device.type == "cpu":
        return host_empty(numel, dtype, pin)
    return torch.empty(numel, dtype=dtype, device=device)


def serving(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` current while host buffers for it are pinned (its context registers them), if CUDA."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def host_zeros(numel: int, dtype: torch.dtype, pin: bool = False) -> torch.Tensor:
    """:func:`host_empty`, zero-filled."""
    return host_empty(numel, dtype, pin).zero_()


def _count(nbytes: int) -> None:
    global _registered_bytes
    with _lock:
        _registered_bytes += nbytes


def _unregister(ptr: int, nbytes: int, device: int) -> None:
    _driver.unregister(ptr, device)  # an error here leaves the pages locked until exit; nothing to do about it
    _count(-nbytes)
