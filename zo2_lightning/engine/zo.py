"""The ZO engine: one MeZO step on a model whose blocks stream through the working device.

```python
engine = ZOEngine(model, blocks, torch.device("cuda"), seed=0)
engine.attach(trainable_groups)                      # offload blocks, hooks on
loss_plus, loss_minus = engine.run_pair(lambda key: loss_fn(model, batch), step=t, eps=1e-3)
engine.commit(step=t, g=(loss_plus - loss_minus) / 2e-3, lrs=[1e-6], weight_decays=[0.0])
engine.detach()                                      # flushed, hooks off, parameters back where they were
```

Plain torch: nothing here knows about Lightning or Hydra (DESIGN.md decision 9). The engine owns *what*
happens to the parameters (perturbed copies, deferred update, flush); :mod:`.streaming` owns *where* they
are; :mod:`.lockstep` owns the interleaving of the two forwards; :mod:`.perturb` owns the arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from zo2_lightning.engine.lockstep import Lockstep
from zo2_lightning.engine.perturb import perturb_into, sgd_update_
from zo2_lightning.engine.residency import blocks_that_fit
from zo2_lightning.engine.rounding import round_to_nearest, stochastic_round
from zo2_lightning.engine.seeds import RESIDENT_UNIT, derive_seed, draw_direction
from zo2_lightning.engine.streaming import BlockStreamer
from zo2_lightning.engine.units import Unit


_ROUNDING_TAG = 1 << 40  # keeps rounding seeds apart from direction seeds (tensor indices are small)


@dataclass(frozen=True)
class Commit:
    """The update of one step, applied to each block when it next arrives (or at a flush)."""

    step: int
    g: float
    lrs: tuple[float, ...]  # per optimizer param group
    weight_decays: tuple[float, ...]
    seed: int  # the run seed z was drawn with (see seeds.direction_seed)


@dataclass
class _Acquired:
    flats: list[torch.Tensor]  # the block's working-device flats
    dirty: bool  # values changed since upload
    applied: int  # commits the working copy reflects


class ZOEngine:
    """Streaming MeZO on any ``nn.Module`` with a list of blocks.

    Args:
        model: the root module (everything that is not inside a block stays on ``device``).
        blocks: the modules streamed one at a time, in their usual forward order.
        device: the working device.
        seed: run seed; z for (step, block, tensor) is a pure function of it.
        offload: keep block parameters in host memory (False: everything on ``device``, in-device MeZO).
        pin_memory: pin host buffers when ``device`` is CUDA (``None``: yes when it is).
        prefetch: blocks uploaded ahead of the one computing.
        resident_blocks: the first N blocks stay on ``device`` for the whole run; ``"auto"``: after the first
            step, as many as fit under ``max_device_memory`` (measured peak of a fully streamed step).
        max_device_memory: the budget for ``"auto"`` in bytes; ``None`` takes 90% of the device's memory.
        memory_probe: returns the peak device memory so far (default: ``torch.cuda.max_memory_allocated``);
            injectable for tests.
        offload_dir: keep the blocks' host copies in safetensors files under this directory (models larger
            than host RAM). A block's file is rewritten only every ``disk_flush_every`` updates and at a flush;
            in between, the pending (seed, g, lr) updates are replayed on each read, so the drive is mostly read.
        disk_flush_every: see ``offload_dir``.
        materialize: ``materialize(block)`` is called on a block whose parameters are on the meta device just
            before it is packed, so a model larger than RAM can be built one block at a time. It must keep the
            Parameter objects (fill them with ``torch.utils.swap_tensors``): the optimizer holds them.
        force_copies: exercise the host<->device copy path even on CPU (tests).
        storage_dtype: dtype of the blocks' host copies (``torch.bfloat16`` / ``torch.float16`` halve the bytes
            moved and stored); compute stays in the parameters' dtype.
        stochastic_rounding: narrow updated blocks to ``storage_dtype`` with seeded stochastic rounding (True)
            or round-to-nearest (False: loses MeZO-size updates; for comparison only).
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: Sequence[nn.Module],
        device: torch.device,
        *,
        seed: int = 0,
        offload: bool = True,
        pin_memory: bool | None = None,
        prefetch: int = 1,
        resident_blocks: int | str = 0,
        force_copies: bool = False,
        max_device_memory: int | None = None,
        memory_probe: Callable[[], int] | None = None,
        offload_dir: str | None = None,
        disk_flush_every: int = 16,
        materialize: Callable[[nn.Module], None] | None = None,
        storage_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = True,
    ) -> None:
        self.model = model
        self.blocks = list(blocks)
        self.device = torch.device(device)
        self.seed = int(seed)
        self._stream_args = dict(
            offload=offload,
            pin_memory=self.device.type == "cuda" if pin_memory is None else pin_memory,
            prefetch=prefetch,
            resident=0 if resident_blocks == "auto" else resident_blocks,
            force_copies=force_copies,
            storage_dtype=storage_dtype,
            offload_dir=offload_dir,
        )
        if int(disk_flush_every) < 1:
            raise ValueError(f"disk_flush_every must be >= 1, got {disk_flush_every}")
        self.disk_flush_every = int(disk_flush_every)
        self._materialize = materialize
        self._flushing = False
        self._round = stochastic_round if stochastic_rounding else round_to_nearest
        if resident_blocks not in ("auto",) and not isinstance(resident_blocks, int):
            raise ValueError(f"resident_blocks must be an int >= 0 or 'auto', got {resident_blocks!r}")
        self._auto_residency = resident_blocks == "auto"
        self._budget = max_device_memory
        self._probe = memory_probe
        self.streamer: BlockStreamer | None = None
        self.units: list[Unit] = []
        self.resident: Unit | None = None
        self._res_w: list[torch.Tensor] = []
        self._res_z: list[torch.Tensor] = []
        self._res_z_key: tuple[int, int] | None = None  # (step, seed) of the z held in _res_z
        self._seeds: list[int] = [self.seed]  # one run seed per direction of the current step
        self._res_pert: dict[tuple[int, int], list[torch.Tensor]] = {}  # (direction, sign) -> resident copies
        self._scratch_sizes: dict[torch.dtype, int] = {}
        self._scratch: dict[object, dict[torch.dtype, torch.Tensor]] = {}  # "z" or (direction, sign)
        self._group_of: dict[int, int] = {}  # id(param) -> optimizer param group
        self._commits: list[Commit] = []
        self._applied: list[int] = []  # per block: how many commits it has absorbed
        self._active: dict[int, _Acquired] = {}  # blocks acquired from the streamer
        self._pair: Lockstep | None = None
        self._step = 0
        self._eps = 0.0
        self._signed_block: int | None = None
        self._orig_devices: dict[int, torch.device] = {}
        self._handles: list[RemovableHandle] = []
        self._generator: torch.Generator | None = None
        self.attached = False

    # ================================================================== attach / detach
    def attach(self, trainable_groups: Sequence[Sequence[nn.Parameter]] = ()) -> None:
        """Offload the blocks, place the rest on the device, and install the hooks.

        Args:
            trainable_groups: the optimizer's param groups; parameters in them with ``requires_grad`` are
                perturbed and updated, all others are only read.
        """
        if self.attached:
            raise RuntimeError("ZOEngine.attach() called twice")
        self._group_of = {
            id(p): gi for gi, group in enumerate(trainable_groups) for p in group if p.requires_grad
        }
        trainable = set(self._group_of)
        for p in self.model.parameters():
            self._orig_devices[id(p)] = p.device
        for b in self.model.buffers():
            self._orig_devices[id(b)] = b.device
        block_param_ids: set[int] = set()
        for i, block in enumerate(self.blocks):
            unit = Unit.build(i, block.parameters(), trainable)
            block_param_ids.update(id(p) for p in unit.params)
            self.units.append(unit)
        self._applied = [0] * len(self.units)
        self.streamer = BlockStreamer(self.units, self.device, **self._stream_args)
        self.streamer.offload(before_pack=self._materialize_block)
        # everything outside the blocks lives on the working device
        res_params = [p for p in self.model.parameters() if id(p) not in block_param_ids]
        for p in res_params:
            p.data = p.data.to(self.device)
        for module in self.model.modules():
            for name, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[name] = buf.to(self.device)
        self.resident = Unit.build(RESIDENT_UNIT, [p for p in res_params if id(p) in trainable], trainable)
        self._res_w = self.resident.pack(self.device)
        self.resident.bind(self._res_w)
        self._allocate_scratch()
        self._generator = torch.Generator(device=self.device)
        for i, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(self._block_hook(i)))
        for module in self.model.modules():
            self._handles.append(module.register_state_dict_pre_hook(self._state_dict_hook))
        self.attached = True

    def detach(self) -> None:
        """Flush, remove every hook and give each parameter its own storage on its original device."""
        if not self.attached:
            return
        self.flush()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        assert self.streamer is not None and self.resident is not None
        self.streamer.restore()
        for seg, flat in zip(self.resident.segments, self._res_w):
            for slot in seg.slots:
                slot.param.data = slot.view(flat).clone()
        for p in self.model.parameters():
            dev = self._orig_devices.get(id(p))
            if dev is not None and dev.type != "meta" and p.device != dev:  # materialized blocks stay on host
                p.data = p.data.to(dev)
        for module in self.model.modules():
            for name, buf in module._buffers.items():
                dev = self._orig_devices.get(id(buf)) if buf is not None else None
                if dev is not None and dev.type != "meta" and buf.device != dev:
                    module._buffers[name] = buf.to(dev)
        self._res_w, self._res_z, self._res_pert, self._scratch = [], [], {}, {}
        self.units, self.resident, self.streamer = [], None, None
        self._commits, self._applied, self._active = [], [], {}
        self.attached = False

    def _allocate_scratch(self) -> None:
        for unit in self.units:
            for seg in unit.segments:
                self._scratch_sizes[seg.dtype] = max(self._scratch_sizes.get(seg.dtype, 0), seg.trainable_numel)
        # the resident unit holds trainable parameters only, so its flats are all "trainable head"
        self._res_z = [torch.empty_like(w) for w in self._res_w]
        self._ensure_scratch(1)

    def _ensure_scratch(self, q: int) -> None:
        """z plus one perturbed copy per (direction, sign), for blocks (max block size) and resident."""
        for key in ["z", *_run_keys(q)]:
            if key not in self._scratch:
                self._scratch[key] = {
                    dt: torch.empty(n, dtype=dt, device=self.device) for dt, n in self._scratch_sizes.items() if n
                }
            if key != "z" and key not in self._res_pert:
                self._res_pert[key] = [torch.empty_like(w) for w in self._res_w]

    # ================================================================== the step
    def run_pair(self, fn: Callable[[Any], Any], step: int, eps: float, seed: int | None = None) -> tuple[Any, Any]:
        """Run ``fn(key)`` at theta + eps * z(step) and theta - eps * z(step) in lockstep; return both results.

        ``fn`` must run the model forward (all blocks through their modules) and return its result; the
        caller decides what the result is (usually the scalar loss). ``seed`` overrides the run seed of the
        direction; ``None`` uses the engine's.
        """
        return self.run_directions(fn, step, eps, [self.seed if seed is None else seed])[0]

    def run_directions(
        self, fn: Callable[[Any], Any], step: int, eps: float, seeds: Sequence[int]
    ) -> list[tuple[Any, Any]]:
        """q-SPSA: the 2q runs ``fn((d, +1))``, ``fn((d, -1))`` for each direction seed, all in lockstep, so
        each block is brought in once and every run uses it before it leaves. Returns ``[(out+, out-)]`` per
        direction. Scratch memory grows with q: 2q perturbed copies of the largest block and of the resident
        parameters.
        """
        self._release_all()
        self._step, self._eps = int(step), float(eps)
        self._seeds = [int(s) for s in seeds]
        self._ensure_scratch(len(self._seeds))
        self._prepare_resident()
        self._pair = Lockstep(self._activate, self._transition)
        keys = _run_keys(len(self._seeds))
        try:
            results = self._pair.run(fn, keys)
        finally:
            self._pair = None
            self._signed_block = None
            self._release_all()
            assert self.resident is not None
            self.resident.bind(self._res_w)
        return [(results[(d, +1)], results[(d, -1)]) for d in range(len(self._seeds))]

    def commit(
        self, step: int, g: float, lrs: Sequence[float], weight_decays: Sequence[float], seed: int | None = None
    ) -> None:
        """Record the update of ``step`` along the direction of ``seed`` (default: the engine's run seed):
        resident parameters now, blocks when they next arrive."""
        seed = self.seed if seed is None else int(seed)
        c = Commit(int(step), float(g), tuple(map(float, lrs)), tuple(map(float, weight_decays)), seed)
        self._commits.append(c)
        if self._auto_residency:
            self._plan_residency()
        assert self.resident is not None
        if self.resident.trainable:
            if self._res_z_key != (c.step, c.seed):
                self._draw(self.resident, c.step, self._res_z, c.seed)
            self._apply(self.resident, self._res_w, self._res_z, c)
            self._res_z_key = None  # consumed as scratch by the update

    def _plan_residency(self) -> None:
        """Once, after the first (fully streamed) step: keep as many blocks resident as the budget allows."""
        self._auto_residency = False
        assert self.streamer is not None
        if not self.streamer.copies or not self.units:
            return  # nothing is copied: every block is already where it computes
        probe = self._probe
        if probe is None:
            if self.device.type != "cuda":
                return
            probe = lambda: torch.cuda.max_memory_allocated(self.device)  # noqa: E731
        budget = self._budget
        if budget is None:
            budget = int(0.9 * torch.cuda.get_device_properties(self.device).total_memory)
        block_bytes = max(u.nbytes for u in self.units)  # working dtype, on the device
        n = blocks_that_fit(budget, probe(), block_bytes, len(self.units))
        self._release_all()
        self.streamer.set_resident(n)

    def flush(self) -> None:
        """Apply every pending update and make the host copies current. Idempotent."""
        if self._pair is not None:
            return  # parameters are perturbed mid-step; nothing outside the step may read them now
        if self.streamer is None:
            return
        self._flushing = True  # every release writes back, disk included
        try:
            self._release_all()
            for i in range(len(self.units)):
                if self._applied[i] < len(self._commits):
                    self._arrive(i)
                    self._release(i)
        finally:
            self._flushing = False
        self.streamer.sync_host()
        self._commits.clear()
        self._applied = [0] * len(self.units)

    @property
    def sign(self) -> int | None:
        """+1 / -1 while one of the perturbed runs executes, else None."""
        key = self._pair.key if self._pair is not None else None
        return key[1] if key is not None else None

    @property
    def direction(self) -> int | None:
        """The direction index of the perturbed run executing now, else None."""
        key = self._pair.key if self._pair is not None else None
        return key[0] if key is not None else None

    def release_blocks(self) -> None:
        """Let go of the blocks an evaluation forward left on the device."""
        if self.streamer is not None and self._pair is None:
            self._release_all()

    @property
    def pending(self) -> int:
        """Number of block updates not yet applied."""
        return sum(len(self._commits) - a for a in self._applied)

    # ================================================================== block arrivals
    def _block_hook(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            if self._pair is not None and self._pair.active:
                self._pair.barrier(i)  # lockstep: _transition / _activate do the binding
            else:
                self.units[i].bind(self._arrive(i))

        return hook

    def _arrive(self, i: int) -> list[torch.Tensor]:
        """Make block ``i`` current on the device (deferred updates applied) and release the others."""
        for j in [j for j in self._active if j != i]:
            self._release(j)
        if i not in self._active:
            flats = self.streamer.acquire(i)
            self._active[i] = _Acquired(flats, self._catch_up(i, flats), len(self._commits))
        for k in range(1, self.streamer.prefetch_depth + 1):
            self.streamer.prefetch(i + k)
        return self._active[i].flats

    def _transition(self, i: int) -> None:
        """Every run reached block ``i``: bring it in and build its perturbed copies, two per direction."""
        flats = self._arrive(i)
        unit = self.units[i]
        if unit.trainable:
            z = self._scratch_views("z", unit)
            for d, seed in enumerate(self._seeds):
                self._draw(unit, self._step, z, seed)
                for seg, w, zz, pp, pm in zip(unit.segments, flats, z, self._scratch_views((d, +1), unit),
                                              self._scratch_views((d, -1), unit)):
                    n = seg.trainable_numel
                    perturb_into(pp, w[:n], zz, self._eps)
                    perturb_into(pm, w[:n], zz, -self._eps)
        self._signed_block = i

    def _activate(self, key: tuple[int, int]) -> None:
        """The run ``(direction, sign)`` is about to execute: every parameter it may read holds its perturbation."""
        assert self.resident is not None
        self.resident.bind_signed(self._res_w, self._res_pert[key])
        i = self._signed_block
        if i is not None:
            unit, flats = self.units[i], self._active[i].flats
            unit.bind_signed(flats, self._scratch_views(key, unit))

    def _release(self, j: int) -> None:
        acquired = self._active.pop(j)
        lazy = self.streamer.disk is not None and j not in self.streamer.resident and not self._flushing
        lag = acquired.applied - self._applied[j]  # updates the host copy has not absorbed
        write = acquired.dirty and not (lazy and lag < self.disk_flush_every)
        self.streamer.release(j, acquired.dirty, write_back=write)
        if write or not acquired.dirty:
            self._applied[j] = acquired.applied
        self._trim_commits()

    def _trim_commits(self) -> None:
        """Forget commits every host copy has absorbed (disk offload keeps up to disk_flush_every per block)."""
        done = min(self._applied, default=0)
        if done >= 64:
            del self._commits[:done]
            self._applied = [a - done for a in self._applied]
            for acq in self._active.values():
                acq.applied -= done

    def _materialize_block(self, i: int) -> None:
        block = self.blocks[i]
        if self._materialize is not None and any(p.is_meta for p in block.parameters()):
            self._materialize(block)

    def _release_all(self) -> None:
        for j in list(self._active):
            self._release(j)

    # ================================================================== arithmetic on units
    def _prepare_resident(self) -> None:
        assert self.resident is not None
        if not self.resident.trainable:
            return
        for d, seed in enumerate(self._seeds):
            self._draw(self.resident, self._step, self._res_z, seed)
            self._res_z_key = (self._step, seed)
            for w, z, pp, pm in zip(self._res_w, self._res_z, self._res_pert[(d, +1)], self._res_pert[(d, -1)]):
                perturb_into(pp, w, z, self._eps)
                perturb_into(pm, w, z, -self._eps)

    def _catch_up(self, i: int, flats: list[torch.Tensor]) -> bool:
        """Apply the commits block ``i`` has not seen yet; True if its values changed."""
        unit = self.units[i]
        todo = self._commits[self._applied[i] :]
        if not todo or not unit.trainable:
            return False
        z = self._scratch_views("z", unit)
        for c in todo:  # one commit at a time, rounded after each: catching up k steps late changes nothing
            self._draw(unit, c.step, z, c.seed)
            self._apply(unit, flats, z, c)
            self._round_to_storage(i, flats, c)
        return True

    def _round_to_storage(self, i: int, flats: list[torch.Tensor], c: Commit) -> None:
        """With 16-bit storage, make the updated working values representable in it right away, so the
        forwards see what the host will hold and the write-back is an exact cast. The rounding noise is seeded
        by the newest commit applied: a resumed or early-flushed run stores the same bits."""
        dtype = self.streamer.storage_dtype
        if dtype is None:
            return
        assert self._generator is not None
        for k, (seg, w) in enumerate(zip(self.units[i].segments, flats)):
            n = seg.trainable_numel
            if n and seg.dtype != dtype:
                self._generator.manual_seed(derive_seed(c.seed, c.step, i, _ROUNDING_TAG + k))
                w[:n].copy_(self._round(w[:n], dtype, self._generator))

    def _apply(self, unit: Unit, flats: list[torch.Tensor], z: list[torch.Tensor], c: Commit) -> None:
        """theta <- theta - lr * (g * z + wd * theta) on the unit's trainable tensors; z is consumed."""
        groups = [self._group_of[id(p)] for p in unit.trainable_params]
        hyper = {(c.lrs[g], c.weight_decays[g]) for g in groups}
        if len(hyper) == 1:  # one op over each segment's trainable head
            lr, wd = hyper.pop()
            for seg, w, zz in zip(unit.segments, flats, z):
                if seg.trainable_numel:
                    sgd_update_(w[: seg.trainable_numel], zz, c.g, lr, wd)
            return
        for w, zz, g in zip(unit.trainable_views(flats), unit.trainable_views(z), groups):
            sgd_update_(w, zz, c.g, c.lrs[g], c.weight_decays[g])

    def _draw(self, unit: Unit, step: int, z: list[torch.Tensor], seed: int) -> None:
        assert self._generator is not None
        for j, zz in enumerate(unit.trainable_views(z)):
            draw_direction(zz, derive_seed(seed, step, unit.index, j), self._generator)

    def _scratch_views(self, name: object, unit: Unit) -> list[torch.Tensor]:
        """Per segment, the first ``trainable_numel`` elements of the shared scratch buffer ``name``."""
        bufs = self._scratch[name]
        return [
            bufs[seg.dtype][: seg.trainable_numel] if seg.trainable_numel else self._empty(seg.dtype)
            for seg in unit.segments
        ]

    def _empty(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(0, dtype=dtype, device=self.device)

    # ================================================================== state_dict
    def _state_dict_hook(self, module: nn.Module, prefix: str, keep_vars: bool) -> None:
        if not self.attached or self._pair is not None:
            return
        if self.pending:
            self.flush()
        self.streamer.expose()  # disk offload: parked parameters read through file maps


def _run_keys(q: int) -> list[tuple[int, int]]:
    """(direction, sign) of the 2q perturbed runs; direction 0's +eps run first."""
    return [(d, s) for d in range(q) for s in (+1, -1)]
