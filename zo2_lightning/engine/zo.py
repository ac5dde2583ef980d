"""The ZO engine: one MeZO step on a model whose blocks stream through the working device.

```python
engine = ZOEngine(model, blocks, torch.device("cuda"), EngineOptions(prefetch=2), seed=0)
engine.attach(trainable_groups)                      # offload blocks, hooks on
loss_plus, loss_minus = engine.run_pair(lambda key: loss_fn(model, batch), step=t, eps=1e-3)
engine.commit(step=t, g=(loss_plus - loss_minus) / 2e-3, lrs=[1e-6], weight_decays=[0.0])
engine.detach()                                      # flushed, hooks off, parameters back where they were
```

Plain torch: nothing here knows about Lightning or Hydra (docs/architecture.md, "Layers"). The engine owns *when*
things happen to the parameters (deferred updates at a block's arrival, write-back, flush, commits);
:mod:`.streaming` owns *where* they are; :mod:`.runs` (over :mod:`.lockstep`) what each perturbed run reads;
:mod:`.resident` the parameters outside the blocks (placed by :mod:`.placement`); :mod:`.spsa` the arithmetic on a
unit; :mod:`.ledger` the pending updates; :mod:`.device` the streams and copies; :mod:`.options` what it was asked.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from zo2_lightning.engine.blocks import split_blocks
from zo2_lightning.engine.device import CudaOps, DeviceOps
from zo2_lightning.engine.keys import TRIAL_PERTURBATIONS, Perturbation, RunKey, loss_tuple, step_perturbations
from zo2_lightning.engine.ledger import Commit, CommitLedger
from zo2_lightning.engine.options import EngineOptions
from zo2_lightning.engine.placement import Placement
from zo2_lightning.engine.resident import ResidentParams
from zo2_lightning.engine.residency import blocks_that_fit
from zo2_lightning.engine.rules import UpdateRule
from zo2_lightning.engine.runs import StepRuns
from zo2_lightning.engine.simulated import SimulatedDevice
from zo2_lightning.engine.spsa import UnitSPSA
from zo2_lightning.engine.streaming import BlockStreamer
from zo2_lightning.engine.units import Unit


@dataclass
class _Acquired:
    flats: list[torch.Tensor]  # the block's working-device flats
    dirty: bool  # values changed since upload
    applied: int  # absolute position in the commit ledger up to which the working copy is updated


class ZOEngine:
    """Streaming MeZO on any ``nn.Module`` with a list of blocks.

    Args:
        model: the root module (everything that is not inside a block stays on ``device``).
        blocks: the modules streamed one at a time, in their usual forward order (each cut into its parts first with
            ``split_blocks``).
        device: the working device.
        options: what to offload, where, and at what memory cost (:class:`.options.EngineOptions`, documented
            field by field there); ``None``: the defaults.
        seed: run seed; z for (step, block, tensor) is a pure function of it.
        rule: the update rule of a commit (:mod:`.rules`; default MeZO-SGD). A stateful rule's buffers live in
            host memory with the blocks' host copies (on ``device`` without offload) and travel to the device
            with the block for its update; with disk offload every updated block is written back at once.
        distribution: of the directions z: ``"gaussian"`` (MeZO) or ``"rademacher"`` (+1/-1).
        memory_probe: returns the peak device memory so far, for ``resident_blocks="auto"`` (default: the device's
            own count, ``torch.cuda.max_memory_allocated`` on CUDA); injectable for tests.
        materialize: ``materialize(block)`` is called on a block whose parameters are on the meta device just
            before it is packed, so a model larger than RAM can be built one block at a time. It must keep the
            Parameter objects (fill them with ``torch.utils.swap_tensors``): the optimizer holds them.
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: Sequence[nn.Module],
        device: torch.device,
        options: EngineOptions | None = None,
        *,
        seed: int = 0,
        rule: UpdateRule | None = None,
        distribution: str = "gaussian",
        memory_probe: Callable[[], int] | None = None,
        materialize: Callable[[nn.Module], None] | None = None,
    ) -> None:
        self.options = options if options is not None else EngineOptions()
        self.model = model
        self.blocks = split_blocks(list(blocks)) if self.options.split_blocks else list(blocks)
        self.device = torch.device(device)
        self.ops = _device_ops(self.device, self.options)  # streams, events, copies, device buffers
        self.seed = int(seed)
        self.rule = rule if rule is not None else UpdateRule()
        self.distribution = distribution
        self._probe = memory_probe
        self._materialize = materialize
        self._auto_residency = self.options.resident_blocks == "auto"
        self._flushing = False
        self.updates = 0  # commits made so far (the t of the next one is updates + 1)
        self.streamer: BlockStreamer | None = None
        self.units: list[Unit] = []
        self.resident_params: ResidentParams | None = None  # everything outside the blocks
        self.spsa: UnitSPSA | None = None
        self.ledger = CommitLedger(0)
        self._active: dict[int, _Acquired] = {}  # blocks acquired from the streamer
        self._runs: StepRuns | None = None  # the perturbed runs of the step in progress
        self._placement: Placement | None = None  # where the model's tensors were before attach
        self._handles: list[RemovableHandle] = []
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
        group_of = {id(p): gi for gi, group in enumerate(trainable_groups) for p in group if p.requires_grad}
        trainable = set(group_of)
        self.spsa = UnitSPSA(self.ops, group_of, self.options, self.rule, self.distribution)
        self._placement = Placement(self.model)
        block_param_ids: set[int] = set()
        for i, block in enumerate(self.blocks):
            unit = Unit.build(i, block.parameters(), trainable)
            block_param_ids.update(id(p) for p in unit.params)
            self.units.append(unit)
        self.ledger = CommitLedger(len(self.units))
        self.streamer = BlockStreamer(self.units, self.ops, self.options)
        self.streamer.offload(before_pack=self._materialize_block)
        rest = self._placement.place_rest(self.device, block_param_ids, trainable, self.ops)
        self.resident_params = ResidentParams(rest, trainable, self.spsa)
        self.spsa.size_for(self.units)
        self.spsa.reserve(step_perturbations(1))
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
        assert self.streamer is not None and self.resident_params is not None
        self.streamer.restore()
        self.resident_params.restore()
        self._placement.restore()
        self.resident_params, self.spsa = None, None
        self.units, self.streamer = [], None
        self.ledger, self._active = CommitLedger(0), {}
        self.attached = False

    # ================================================================== the step
    def run_pair(self, fn: Callable[[Any], Any], step: int, eps: float, seed: int | None = None) -> tuple[Any, Any]:
        """Run ``fn(key)`` at theta + eps * z(step) and theta - eps * z(step) in lockstep; return both results.

        ``fn`` must run the model forward (all blocks through their modules) and return its result; the
        caller decides what the result is (usually the scalar loss). ``seed`` overrides the run seed of the
        direction; ``None`` uses the engine's.
        """
        return self.run_directions(fn, step, eps, [self.seed if seed is None else seed])[0]

    def run_directions(
        self, fn: Callable[[Any], Any], step: int, eps: float, seeds: Sequence[int], one_sided: bool = False
    ) -> list[tuple[Any, Any]]:
        """q-SPSA: the 2q runs ``fn(key)`` (``key.direction`` d, ``key.sign`` +1 / -1) for each direction seed, all
        in lockstep, so each block is brought in once and every run uses it before it leaves. Returns
        ``[(out+, out-)]`` per direction. Scratch memory grows with q: a z per direction for the largest block (plus
        one perturbed copy that the runs share, rebuilt as each takes its turn), and 2q perturbed copies of the
        resident parameters.

        ``one_sided``: the forward-difference estimate; the q runs at +eps and one run (direction 0, sign 0) at
        theta itself (q + 1 forwards); returns ``[(out+, out0)]`` per direction, ``out0`` the same object for all.
        """
        return self.run_chunks(fn, step, eps, seeds, 1, one_sided)[0]

    def run_chunks(
        self,
        fn: Callable[[RunKey], Any],
        step: int,
        eps: float,
        seeds: Sequence[int],
        chunks: int,
        one_sided: bool = False,
        perturbations: Sequence[Perturbation] | None = None,
        center: bool = False,
    ) -> list[list[tuple[Any, ...]]]:
        """:meth:`run_directions` for ``chunks`` micro-batches at once: ``fn(key)`` runs micro-batch ``key.chunk``,
        and all ``chunks`` x 2q runs share one residency of each block (the transfer is paid once per step, not
        once per micro-batch; each block's compute temporaries exist for one micro-batch at a time). Returns
        ``[[(out+, out-) per direction] per chunk]``.

        ``perturbations``: run only these of the step's perturbations (:func:`.keys.step_perturbations`), e.g. the
        share of one process when several split a step between them; the others' outputs are ``None``. z is drawn
        only for the directions run. What is committed afterwards does not depend on it: every process may commit
        every direction.

        ``center``: the central runs and one more at theta itself (direction 0, sign 0); returns
        ``[(out+, out-, out0)]`` per direction (a method that also needs L(theta), e.g. HiZOO's curvature).

        Raises:
            ValueError: ``perturbations`` names one that is not the step's.
        """
        q = range(len(seeds))
        self.spsa.prune_kept(int(step), self.ledger.keys())
        runs = _subset(step_perturbations(len(q), one_sided, center and not one_sided), perturbations)
        results = self._run_lockstep(fn, runs, chunks, step, eps, seeds)
        layouts = [loss_tuple(d, one_sided, center) for d in q]
        return [[tuple(results.get(RunKey(p.direction, p.sign, m)) for p in layout)  # None: another process ran it
                 for layout in layouts] for m in range(chunks)]

    def run_trial(
        self, fn: Callable[[RunKey], Any], commits: Sequence[Commit], chunks: int = 1,
        perturbations: Sequence[Perturbation] | None = None,
    ) -> list[tuple[Any, Any, Any]]:
        """The three runs of a conservative step (ZO-SGD-Cons), in lockstep: ``fn(key)`` at theta after ``commits``
        (``key.sign`` +1), at theta (0) and at theta after the commits reversed (-1), for each micro-batch. Returns
        ``[(out_step, out_none, out_reversed)]`` per chunk; nothing is committed. The candidates are computed
        exactly as the commits would be applied, so committing the chosen one gives the parameters its run saw,
        bit for bit. Needs a stateless rule. ``perturbations``: run only these of the three
        (:data:`.keys.TRIAL_PERTURBATIONS`); the others' outputs are ``None``.
        """
        if self.rule.stateful:
            raise ValueError(f"a conservative step needs a stateless update rule, not {self.rule.name!r}")
        step = commits[0].step if commits else 0
        runs = _subset(TRIAL_PERTURBATIONS, perturbations)
        results = self._run_lockstep(fn, runs, chunks, step, 0.0, [], trial=commits)
        return [tuple(results.get(RunKey(p.direction, p.sign, m)) for p in TRIAL_PERTURBATIONS)  # type: ignore[misc]
                for m in range(chunks)]

    def _run_lockstep(self, fn: Callable[[RunKey], Any], perturbations: list, chunks: int, step: int, eps: float,
                      seeds: Sequence[int], trial: Sequence[Commit] | None = None) -> dict[RunKey, Any]:
        """Every perturbation on each chunk, as lockstep runs keyed by :class:`.keys.RunKey`."""
        if not perturbations:
            return {}  # this process has no share of these runs
        self._release_all()
        assert self.spsa is not None and self.resident_params is not None
        self._runs = StepRuns(self.spsa, self.resident_params, self.units, self._arrive)
        try:
            with self.ops.compute_scope():
                return self._runs.run(fn, perturbations, chunks, step, eps, seeds, trial)
        finally:
            self._runs = None
            self._release_all()
            self.resident_params.bind_plain()

    def candidate(
        self,
        step: int,
        g: float,
        lrs: Sequence[float],
        weight_decays: Sequence[float],
        seed: int | None = None,
        hyper: Sequence[float] = (),
    ) -> Commit:
        """The commit :meth:`commit` would record next (for :meth:`run_trial`; ``t`` is set when committed)."""
        seed = self.seed if seed is None else int(seed)
        return Commit(int(step), float(g), tuple(map(float, lrs)), tuple(map(float, weight_decays)), seed,
                      tuple(map(float, hyper)))

    def commit(
        self,
        step: int | Commit,
        g: float = 0.0,
        lrs: Sequence[float] = (),
        weight_decays: Sequence[float] = (),
        seed: int | None = None,
        hyper: Sequence[float] = (),
    ) -> None:
        """Record the update of ``step`` along the direction of ``seed`` (default: the engine's run seed):
        resident parameters now, blocks when they next arrive. ``hyper``: the rule's coefficients (see
        :mod:`.rules`). A :class:`Commit` from :meth:`candidate` may be passed instead."""
        c = step if isinstance(step, Commit) else self.candidate(step, g, lrs, weight_decays, seed, hyper)
        self.updates += 1
        c = dataclasses.replace(c, t=self.updates)
        self.ledger.add(c)
        if self._auto_residency:
            self._plan_residency()
        assert self.resident_params is not None
        self.resident_params.commit(c)

    def _plan_residency(self) -> None:
        """Once, after the first (fully streamed) step: keep as many blocks resident as the budget allows."""
        self._auto_residency = False
        assert self.streamer is not None
        if not self.streamer.copies or not self.units:
            return  # nothing is copied: every block is already where it computes
        peak = self._probe() if self._probe is not None else self.ops.peak_memory()
        budget = self.options.max_gpu_memory
        if budget is None and self.ops.total_memory() is not None:
            budget = int(0.9 * self.ops.total_memory())
        if peak is None or budget is None:
            return  # the device does not count its memory (CPU): nothing to plan by
        block_bytes = max(u.nbytes for u in self.units)  # working dtype, on the device
        n = blocks_that_fit(budget, peak, block_bytes, len(self.units))
        self._release_all()
        self.streamer.set_resident(n)

    def flush(self) -> None:
        """Apply every pending update and make the host copies current. Idempotent."""
        if self._runs is not None:
            return  # parameters are perturbed mid-step; nothing outside the step may read them now
        if self.streamer is None:
            return
        self._flushing = True  # every release writes back, disk included
        try:
            self._release_all()
            for i in range(len(self.units)):
                if self.ledger.applied[i] < self.ledger.head:
                    self._arrive(i)
                    self._release(i)
        finally:
            self._flushing = False
        self.streamer.sync_host()
        self.ledger.clear()

    @property
    def run_key(self) -> RunKey | None:
        """The perturbed run executing now (direction, sign, micro-batch), else None."""
        return self._runs.key if self._runs is not None else None

    def release_blocks(self) -> None:
        """Let go of the blocks an evaluation forward left on the device."""
        if self.streamer is not None and self._runs is None:
            self._release_all()

    @property
    def pending(self) -> int:
        """Number of block updates not yet applied."""
        return self.ledger.pending

    def device_bytes(self) -> dict[str, int]:
        """What the engine holds on the working device, by component (bytes): the streamed blocks' buffers and the
        resident blocks' (``slots``, ``resident_blocks``), the parameters outside the blocks and their runs'
        copies (``resident/...``), the block scratch (``scratch/...``) and kept directions. Empty before
        :meth:`attach`."""
        if not self.attached:
            return {}
        assert self.streamer is not None and self.spsa is not None and self.resident_params is not None
        return {**self.streamer.device_bytes(), **self.resident_params.device_bytes(), **self.spsa.device_bytes()}

    # ================================================================== optimizer state
    def rule_state(self) -> dict[str, Any]:
        """For a checkpoint, after a flush: the update count and the rule's buffers per unit (as they live)."""
        self.flush()
        assert self.spsa is not None
        return {"rule": self.rule.name, "updates": self.updates,
                "buffers": self.spsa.state.state_dict(self._all_units())}

    def load_rule_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`rule_state` (after :meth:`attach`, before the first step).

        Raises:
            ValueError: the state belongs to another rule or another model (unit sizes differ).
        """
        assert self.spsa is not None
        if state.get("rule", self.rule.name) != self.rule.name:
            raise ValueError(
                f"the checkpoint's optimizer state is for the {state['rule']!r} update rule, this run uses"
                f" {self.rule.name!r}: resume with the optimizer that wrote it, or start a new fit from its weights"
            )
        self.updates = int(state.get("updates", 0))
        self.spsa.state.load_state_dict(self._all_units(), state.get("buffers", {}))

    def _all_units(self) -> list[Unit]:
        return [*self.units, *([self.resident_params.unit] if self.resident_params is not None else [])]

    # ================================================================== block arrivals
    def _block_hook(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            if self._runs is not None and self._runs.active:
                self._runs.barrier(i)  # lockstep: the runs bind what each reads
            else:
                self.units[i].bind(self._arrive(i))

        return hook

    def _arrive(self, i: int) -> list[torch.Tensor]:
        """Make block ``i`` current on the device (deferred updates applied) and release the others."""
        for j in [j for j in self._active if j != i]:
            self._release(j)
        if i not in self._active:
            flats = self.streamer.acquire(i)
            dirty = self.spsa.catch_up(self.units[i], flats, self.ledger.since(i))
            self._active[i] = _Acquired(flats, dirty, self.ledger.head)
        for k in range(1, self.streamer.prefetch_depth + 1):
            self.streamer.prefetch(i + k)
        return self._active[i].flats

    def _release(self, j: int) -> None:
        acquired = self._active.pop(j)
        lazy = (self.streamer.disk is not None and j not in self.streamer.resident and not self._flushing
                and not self.rule.stateful)  # replaying a stateful update would advance its state twice
        lag = acquired.applied - self.ledger.applied[j]  # updates the host copy has not absorbed
        write = acquired.dirty and not (lazy and lag < self.options.disk_flush_every)
        self.streamer.release(j, acquired.dirty, write_back=write)
        if write or not acquired.dirty:
            self.ledger.absorbed(j, acquired.applied)

    def _materialize_block(self, i: int) -> None:
        block = self.blocks[i]
        if self._materialize is not None and any(p.is_meta for p in block.parameters()):
            self._materialize(block)

    def _release_all(self) -> None:
        for j in list(self._active):
            self._release(j)

    # ================================================================== state_dict
    def _state_dict_hook(self, module: nn.Module, prefix: str, keep_vars: bool) -> None:
        if not self.attached or self._runs is not None:
            return
        if self.pending:
            self.flush()
        self.streamer.expose()  # disk offload: parked parameters read through file maps



def _subset(every: list[Perturbation], chosen: Sequence[Perturbation] | None) -> list[Perturbation]:
    """``chosen`` (all of ``every`` when None), in the order of ``every``.

    Raises:
        ValueError: ``chosen`` names a perturbation that is not in ``every``.
    """
    if chosen is None:
        return every
    chosen = [Perturbation(*p) for p in chosen]
    foreign = [p for p in chosen if p not in every]
    if foreign:
        raise ValueError(f"perturbations {foreign} are not among this step's runs {every}")
    return [p for p in every if p in chosen]


def _device_ops(device: torch.device, options: EngineOptions) -> DeviceOps:
    """The device operations of a working device: the simulated device where the options ask for it (the CPU, or
    the meta device for a dry run that only counts), CUDA's on a GPU, else synchronous copies.

    Raises:
        ValueError: ``simulated_device`` on a real accelerator.
    """
    if options.simulated_device is not None:
        if device.type not in ("cpu", "meta"):
            raise ValueError(f"simulated_device stands in for a GPU on the CPU (or counts on the meta device), not on"
                             f" {device}: leave it None on a real accelerator")
        return SimulatedDevice(device, seed=options.simulated_device)
    if device.type == "cuda":
        return CudaOps(device)
    return DeviceOps(device)
