"""Where each block's parameters live, and the copies between host memory and the working device.

``streamer = BlockStreamer(units, device, options)``; ``streamer.offload()`` once, then
``flats = streamer.acquire(i)`` / ``streamer.release(i, dirty)`` per use.

Each block owns one flat host buffer per dtype (pinned at its exact size when the working device is CUDA, see
:mod:`.pinned`), allocated once.
When host and working device differ, a block is uploaded into one of a few reusable device slots on a
dedicated upload stream and, if its values changed, written back on an offload stream; streams are ordered
by events, never by a device-wide synchronize. The streams, events and copies go through :mod:`.device` (CUDA on a
GPU, or the simulated asynchronous device of the tests); each wait is named after the race it prevents. When host
and working device are the same (CPU training, or offloading switched off) the host buffer *is* the working buffer
and every copy is skipped: the same code path runs.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from zo2_lightning.engine.device import DeviceOps
from zo2_lightning.engine.disk import DiskStore
from zo2_lightning.engine.options import EngineOptions
from zo2_lightning.engine.pinned import host_empty, serving
from zo2_lightning.engine.units import Unit


@dataclass
class _DeviceSlot:
    buffers: dict[torch.dtype, torch.Tensor]
    block: int | None = None
    ready: Any = None  # event: upload finished (recorded on the upload stream)
    free: Any = None  # event: last reader / write-back finished; safe to overwrite

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())


class BlockStreamer:
    """Host copies of the blocks and their transfers to the working device.

    Args:
        units: one per block, in block order.
        ops: the working device's operations (:mod:`.device`): where forwards run, and how copies reach it.
        options: the engine's options; this class reads where blocks live (``offload_device``, ``offload_dir``),
            ``pin_memory``, ``prefetch``, ``device_slots``, a fixed ``resident_blocks`` count (``"auto"`` starts at
            none, see :meth:`set_resident`), ``storage_dtype`` and ``force_copies``. With a ``storage_dtype``,
            blocks are widened to their working dtype on upload and cast back on write-back, so the caller must
            keep the working values representable (the engine rounds them stochastically after updates). With disk
            offload, blocks are read for every use and rewritten only when the caller asks
            (``release(i, write_back=True)``).
    """

    def __init__(self, units: Sequence[Unit], ops: DeviceOps, options: EngineOptions) -> None:
        self.units = list(units)
        self.disk = DiskStore(options.offload_dir, len(self.units)) if options.offload_dir is not None else None
        self.ops = ops
        self.device = device = ops.device
        self.host_device = torch.device("cpu") if options.offload else device
        self.storage_dtype = options.storage_dtype
        narrows = self.storage_dtype is not None and any(
            seg.dtype != self.storage_dtype for u in self.units for seg in u.segments
        )
        self.copies = (options.offload and device.type != "cpu") or options.force_copies or narrows \
            or self.disk is not None or options.simulated_device is not None
        self.pin = options.pins(device)
        self.prefetch_depth = options.prefetch
        self._n_slots = options.slot_count
        fixed = 0 if options.resident_blocks == "auto" else options.resident_blocks
        self.resident = set(range(min(fixed, len(self.units)))) if self.copies else set()
        self.host: list[list[torch.Tensor]] = []
        self._slots: list[_DeviceSlot] = []
        self._resident_slots: dict[int, _DeviceSlot] = {}
        self._on_device: OrderedDict[int, _DeviceSlot] = OrderedDict()  # LRU order, streamed blocks only
        self._active: set[int] = set()
        self._prefetched: set[int] = set()  # uploaded ahead, not yet acquired
        self._stale: set[int] = set()  # resident blocks whose host copy lags the device copy
        self._upload_stream = ops.new_stream() if self.copies else None
        self._offload_stream = ops.new_stream() if self.copies else None
        self._host_ready: dict[int, Any] = {}  # block -> event: its write-back finished
        self._staging: dict[torch.dtype, torch.Tensor] = {}  # disk reads into a CUDA device pass through these
        self.bytes_uploaded = 0
        self.bytes_offloaded = 0

    @property
    def slot_count(self) -> int:
        """Device buffers allocated for streamed blocks (none where blocks compute in their host copies)."""
        return len(self._slots)

    def device_bytes(self) -> dict[str, int]:
        """Bytes the streamer holds on the working device: the streamed blocks' buffers (``"slots"``) and the
        resident blocks' own (``"resident_blocks"``); both 0 where blocks compute in their host copies."""
        return {"slots": sum(s.nbytes for s in self._slots),
                "resident_blocks": sum(s.nbytes for s in self._resident_slots.values())}

    # ------------------------------------------------------------------ set-up / tear-down
    def offload(self, before_pack: Callable[[int], None] | None = None) -> None:
        """Move every block's parameters into its host copy (flat buffers, or a file) and park them there.

        Args:
            before_pack: called with each block index just before it is packed (e.g. to materialize it).
        """
        if self.disk is not None:
            self.disk.check_space(sum(self._host_nbytes(u) for u in self.units))
        for i, unit in enumerate(self.units):
            if before_pack is not None:
                before_pack(i)
            with serving(self.device):
                flats = unit.pack(self.host_device, pin=self.pin and self.disk is None, dtype=self.storage_dtype)
            if self.disk is not None:
                self.disk.write(i, flats)  # one block in memory at a time
                flats = None
            self.host.append(flats)
            self.park(i)  # the old per-parameter storage is freed here
        if not self.copies:
            return
        sizes: dict[torch.dtype, int] = {}
        for unit in self.units:
            for seg in unit.segments:
                sizes[seg.dtype] = max(sizes.get(seg.dtype, 0), seg.numel)
        self._slots = [self._new_slot(sizes) for _ in range(self._n_slots)]
        for i in sorted(self.resident):
            slot = self._own_slot(i)
            self._upload(i, slot)
            self._resident_slots[i] = slot

    def _host_nbytes(self, unit: Unit) -> int:
        return sum(seg.numel * (self.storage_dtype or seg.dtype).itemsize for seg in unit.segments)

    def _host_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return self.storage_dtype or dtype

    def park(self, i: int) -> None:
        """Point block ``i``'s parameters at its host copy (RAM), or at shape-only placeholders (disk: a
        single element expanded to the parameter's shape, so nothing model-sized stays in memory)."""
        unit = self.units[i]
        if self.disk is None:
            unit.bind(self.host[i])
            return
        for seg in unit.segments:
            placeholder = torch.empty((), dtype=seg.dtype, device=self.host_device)  # one element, no copy
            for span in seg.spans:
                span.param.data = placeholder.expand(span.shape)

    def expose(self) -> None:
        """Disk offload: point parked parameters at copy-on-write maps of their files, so ``state_dict`` and
        checkpoints can read them without loading the model (the pages are file-backed and reclaimable)."""
        if self.disk is None:
            return
        for i, unit in enumerate(self.units):
            if i in self._active or i in self.resident:
                continue
            unit.bind(self._map(i))

    def _map(self, i: int) -> list[torch.Tensor]:
        """Copy-on-write maps of block ``i``'s file, one per segment (disk offload)."""
        segs = self.units[i].segments
        return self.disk.map(i, [self._host_dtype(s.dtype) for s in segs], [s.numel for s in segs])

    def _own_slot(self, i: int) -> _DeviceSlot:
        """A device slot sized for block ``i`` alone (a resident block)."""
        return self._new_slot({seg.dtype: seg.numel for seg in self.units[i].segments})

    def _new_slot(self, sizes: dict[torch.dtype, int]) -> _DeviceSlot:
        return _DeviceSlot({dt: self.ops.empty(n, dt) for dt, n in sizes.items()})

    def restore(self) -> None:
        """Give every parameter its own storage again, on the host device, in its own dtype, holding the host values."""
        self.sync_host()
        for i, (unit, flats) in enumerate(zip(self.units, self.host)):
            if flats is None:  # disk: file-backed maps, copied only where the dtype widens
                flats = self._map(i)
            for seg, flat in zip(unit.segments, flats):
                for span in seg.spans:
                    view = span.view(flat)
                    span.param.data = view.to(seg.dtype, copy=True) if self.disk is None or view.dtype != seg.dtype else view
        self.host.clear()
        self._staging.clear()
        self._slots.clear()
        self._resident_slots.clear()
        self._on_device.clear()
        self._active.clear()
        self._prefetched.clear()

    # ------------------------------------------------------------------ per use
    def acquire(self, i: int) -> list[torch.Tensor]:
        """The working-device flats of block ``i`` (uploading it if needed), ready for the compute stream."""
        self._active.add(i)
        if not self.copies:
            return self.host[i]
        self._prefetched.discard(i)
        slot = self._resident_slots.get(i) or self._on_device.get(i)
        if slot is None:
            slot = self._upload(i, self._free_slot(evict_prefetched=True))
        elif i in self._on_device:
            self._on_device.move_to_end(i)
        self.ops.wait(self.ops.compute_stream(), slot.ready, "upload->compute")
        return self._views(i, slot)

    def prefetch(self, i: int) -> None:
        """Start uploading block ``i`` if a slot is free; a hint, never required for correctness."""
        if not self.copies or i < 0 or i >= len(self.units) or i in self.resident or i in self._on_device:
            return
        slot = self._free_slot(evict_prefetched=False)
        if slot is not None:
            self._upload(i, slot)
            self._prefetched.add(i)

    def release(self, i: int, dirty: bool, write_back: bool = True) -> None:
        """Block ``i`` is no longer read; if ``dirty`` its values changed. They go back to the host copy unless
        ``write_back`` is False, in which case the working copy is dropped (the caller replays the changes)."""
        self._active.discard(i)
        self.park(i)
        if not self.copies:
            return
        if i in self.resident:
            if dirty:
                self._stale.add(i)
            return
        slot = self._on_device[i]
        if dirty and write_back:
            self._write_back(i, slot)
        else:
            slot.free = self.ops.record(self.ops.compute_stream())  # compute done reading
        if dirty and not write_back:  # the slot holds values the host copy does not: never reuse them
            del self._on_device[i]
            slot.block = None

    def set_resident(self, n: int) -> None:
        """Keep the first ``n`` blocks on the working device from now on (call between steps, nothing acquired)."""
        if not self.copies:
            return
        assert not self._active, "set_resident() while blocks are in use"
        want = set(range(min(max(0, int(n)), len(self.units))))
        demoted = sorted(self.resident - want)
        for i in demoted:  # demote: host copy made current, then the slot is freed
            if i in self._stale:
                self._write_back(i, self._resident_slots[i])
                self._stale.discard(i)
        if demoted and self._offload_stream is not None:  # a freed buffer may be reused at once: no copy may
            self.ops.synchronize(self._offload_stream, "write-back->free")  # still be reading it
        for i in demoted:
            self.ops.release(list(self._resident_slots.pop(i).buffers.values()))
        for i in sorted(want - self.resident):  # promote: its own slot, filled from the (current) host copy
            if i in self._on_device:
                cached = self._on_device.pop(i)
                cached.block = None
                self._prefetched.discard(i)
            slot = self._own_slot(i)
            self.resident.add(i)
            self._upload(i, slot)
            self._resident_slots[i] = slot
        self.resident = want

    def sync_host(self) -> None:
        """Make every host copy current (write back stale resident blocks and wait for pending write-backs)."""
        for i in sorted(self._stale):
            self._write_back(i, self._resident_slots[i])
        self._stale.clear()
        if self._offload_stream is not None:  # outside the step loop: flush, checkpoint, teardown
            self.ops.synchronize(self._offload_stream, "write-back->host")

    # ------------------------------------------------------------------ transfers
    def _views(self, i: int, slot: _DeviceSlot) -> list[torch.Tensor]:
        return [slot.buffers[seg.dtype][: seg.numel] for seg in self.units[i].segments]

    def _free_slot(self, evict_prefetched: bool) -> _DeviceSlot | None:
        """An empty slot, else the least recently used released block's, else (if allowed) a prefetched one's."""
        for slot in self._slots:
            if slot.block is None:
                return slot
        for keep_prefetched in (True, False) if evict_prefetched else (True,):
            for i, slot in self._on_device.items():  # least recently used first
                if i in self._active or (keep_prefetched and i in self._prefetched):
                    continue
                del self._on_device[i]
                self._prefetched.discard(i)
                slot.block = None
                return slot
        if evict_prefetched:
            raise RuntimeError(f"all {len(self._slots)} device slots hold blocks in use; raise `prefetch`")
        return None

    def _upload(self, i: int, slot: _DeviceSlot) -> _DeviceSlot:
        slot.block = i
        if i not in self.resident:
            self._on_device[i] = slot
        dst = self._views(i, slot)
        if self.disk is not None:
            self._read_block(i, dst)
        else:
            ops, up = self.ops, self._upload_stream
            # the slot's previous block is no longer read or written back, and our host copy is fully written back
            ops.wait(up, slot.free, "write-back->upload:slot")
            ops.wait(up, self._host_ready.pop(i, None), "write-back->upload:host")
            ops.copy(dst, self.host[i], up)
            slot.ready, slot.free = ops.record(up), None
        self.bytes_uploaded += self._host_nbytes(self.units[i])
        return slot

    def _read_block(self, i: int, dst: list[torch.Tensor]) -> None:
        """Disk -> working buffers, through a CPU staging buffer where dtype or device differ (synchronous: the
        drive, not the bus, sets the pace of disk offload)."""
        direct = all(d.device.type == "cpu" and d.dtype == self._host_dtype(d.dtype) for d in dst)
        if direct:
            self.disk.read_into(i, dst)
            return
        staging = self._staging_views(dst)
        self.disk.read_into(i, staging)
        for d, h in zip(dst, staging):
            d.copy_(h)

    def _staging_views(self, dst: list[torch.Tensor]) -> list[torch.Tensor]:
        """Host buffers for one block's read (one view per segment), carved from buffers allocated once, sized
        for the largest block and pinned when the working device is CUDA. Reuse is safe: the copies out of
        them are synchronous."""
        need: dict[torch.dtype, int] = {}
        for d in dst:
            hd = self._host_dtype(d.dtype)
            need[hd] = need.get(hd, 0) + d.numel()
        for hd, n in need.items():
            if hd not in self._staging or self._staging[hd].numel() < n:
                most = max(sum(s.numel for s in u.segments if self._host_dtype(s.dtype) == hd) for u in self.units)
                with serving(self.device):
                    self._staging[hd] = host_empty(max(n, most), hd, pin=self.device.type == "cuda")
        views, used = [], dict.fromkeys(need, 0)
        for d in dst:
            hd = self._host_dtype(d.dtype)
            views.append(self._staging[hd][used[hd]: used[hd] + d.numel()])
            used[hd] += d.numel()
        return views

    def _write_back(self, i: int, slot: _DeviceSlot) -> None:
        src = self._views(i, slot)
        if self.disk is not None:  # a file is rewritten whole
            self.disk.write(i, [d.to("cpu", self._host_dtype(d.dtype)) for d in src])
            self.bytes_offloaded += self._host_nbytes(self.units[i])
            return
        # only the trainable head of each segment can have changed: frozen tensors never go back
        ops, off = self.ops, self._offload_stream
        heads = [seg.trainable_numel for seg in self.units[i].segments]
        ops.wait(off, ops.record(ops.compute_stream()), "compute->write-back")  # the update is written
        ops.copy([h[:n] for h, n in zip(self.host[i], heads)], [d[:n] for d, n in zip(src, heads)], off)
        done = ops.record(off)
        slot.free = done  # the slot may be refilled only after the copy out
        if done is not None:
            self._host_ready[i] = done  # a re-upload of block i must wait for it
        self.bytes_offloaded += sum(seg.trainable_numel * self._host_dtype(seg.dtype).itemsize
                                    for seg in self.units[i].segments)
