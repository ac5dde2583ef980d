"""The ``zo2_offload`` Lightning strategy: MeZO steps with blocks streamed from host memory, on one or many devices.

```python
import lightning.pytorch as L
import zo2_lightning                                  # registers "zo2_offload" and "zo2_resident"
trainer = L.Trainer(strategy="zo2_offload", accelerator="gpu", devices=1, precision="bf16-mixed")
trainer = L.Trainer(strategy="zo2_offload", accelerator="gpu", devices=8, num_nodes=2)  # 16 ranks, see below
trainer.fit(module, datamodule)                       # module: ZOModule + LightningModule, ZOSGD optimizer
```

Placement, lifecycle and the process group; the ZO step itself is :class:`zo2_lightning.zo_core.ZOStrategyCore`,
the scalar collectives are :mod:`zo2_lightning.distributed`, and docs/distributed.md shows the launches.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Literal

import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies import _StrategyRegistry
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import Trainer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from zo2_lightning._registration import register_into
from zo2_lightning.distributed import (
    DIRECTION_MODES,
    broadcast_module_,
    gather_over_ranks,
    mean_over_ranks,
    mean_values_over_ranks,
    rank_direction_seeds,
)
from zo2_lightning.refusals import check_configuration
from zo2_lightning.zo_core import _CKPT_KEY, ZOStrategyCore


# One class for one and for many devices, built on Lightning's DDPStrategy: the registry builds "zo2_offload"
# before the Trainer knows `devices`, so the name cannot pick between two classes. DDPStrategy brings the
# launchers, cluster environments (SLURM, torchrun), world ranks, the process group and the DistributedSampler;
# we drop its DistributedDataParallel wrapper (there are no gradients) and, in a single process, skip all of it:
# no launcher, no process group, the user's own sampler - the single-device run exactly as it was. (One thing a
# single process cannot undo: Lightning's batch-size Tuner refuses every DDPStrategy, even with devices=1.)
class ZO2OffloadStrategy(ZOStrategyCore, DDPStrategy):
    """Zeroth-order (MeZO/SPSA) fine-tuning with the model's blocks streamed from host memory (ZO2).

    Per optimizer step the LightningModule's ``training_step`` runs twice, at theta + eps*z and theta - eps*z,
    in lockstep block by block (each block is uploaded once and both forwards use it); the projected gradient
    ``g = (L+ - L-) / (2 eps)`` drives ``theta <- theta - lr * (g * z + wd * theta)`` (or the rule of the ZO
    optimizer used: momentum, Adam, ...), applied to each block when it next arrives. z is regenerated from
    ``(seed, global_step, block, tensor)``, never stored.

    With ``devices * num_nodes > 1`` every rank keeps its own host copy and streams to its own device; rank 0's
    weights and seed are broadcast once at setup, and after that a step exchanges only the measured losses
    (16 bytes per direction and micro-batch): no DistributedDataParallel, no parameter or gradient traffic.

    Args:
        offload_device: where block parameters live between uses: ``"cpu"`` (streamed from host memory),
            ``"disk"`` (from files under ``offload_dir``), or ``None`` to keep the whole model on the working
            device (in-device MeZO, the ``zo2_resident`` preset).
        pin_memory: pin the host copies for fast asynchronous uploads (each at its exact size, see
            ``engine/pinned.py``); ``None`` pins when training on CUDA.
        prefetch: how many blocks are uploaded ahead of the one computing (CUDA; ignored on CPU).
        resident_blocks: the first N blocks stay on the working device for the whole run; ``"auto"``: after the
            first step, as many as fit under ``max_gpu_memory``.
        seed: run seed of the perturbation directions; ``None`` takes ``seed_everything``'s seed (or 0). On
            resume the checkpoint's seed is used; with several ranks, rank 0's.
        max_consecutive_skips: stop the fit with an error after this many consecutive steps whose loss was
            not finite (each such step is skipped, parameters untouched); 0 never stops.
        storage_dtype: dtype of the blocks' host copies, ``"bf16"`` / ``"fp16"`` (or the torch dtype): half the
            bytes stored and moved, updates narrowed with seeded stochastic rounding; compute stays in the
            parameters' dtype. ``None``: the parameters' dtype.
        offload_dir: with ``offload_device="disk"``, the directory (on a local drive) of the blocks' files; with
            several ranks each writes its own ``rank{r}`` subdirectory.
        disk_flush_every: a block's file is rewritten every this many updates (and at a flush); in between the
            pending updates are replayed on each read.
        max_gpu_memory: the budget of ``resident_blocks="auto"`` in bytes; ``None``: 90% of the device.
        keep_directions: keep each block's z from its perturbation until its deferred update instead of drawing
            it again: one draw per parameter per step saved, one extra copy of the trainable parameters held on
            the working device. For models that fit (CPU training, ``zo2_resident``), where drawing z dominates.
        regenerate_directions: keep no z on the device: each run's perturbed copy of a block and of the resident
            parameters is drawn afresh as the run takes its turn, into one buffer each. The least GPU memory (the
            largest models), for 2q draws per block per step instead of q. Excludes ``keep_directions``.
        device_slots: device buffers for streamed blocks; ``None``: ``prefetch + 2`` (the block in use, the one
            being written back, the prefetched ones). ``prefetch + 1`` saves one block of GPU memory: an upload
            into a just-released buffer then waits for its write-back (off the compute stream, but the two
            directions of the bus no longer overlap).
        micro_batches: split each batch into this many equal micro-batches along its first dimension and run all
            of them, each at +eps and -eps, in lockstep: every block is uploaded once per step for all of them
            (ZO2's transfer amortised over the batch) while each block's compute temporaries (attention scores,
            MLP activations) exist for one micro-batch at a time. The step is the one ``accumulate_grad_batches``
            would take over the same micro-batches: g averaged over them, one z.
        directions: with several ranks, ``"shared"``: all ranks perturb along the same z and g comes from the
            mean of L+ and L- over ranks (one all-reduce): exactly MeZO on the global batch, any world size
            resumes the run. ``"independent"``: rank r draws its own directions (seeds r*q .. r*q+q-1, q from
            ZOSGD) on its own shard, the (L+, L-) are all-gathered and every rank applies all N*q updates:
            q-SPSA with N*q directions for the price of one collective. One process: the same either way.
        start_method: how Lightning starts the ranks when it starts them itself: ``"popen"`` (re-runs the
            script, as ``strategy="ddp"``), ``"spawn"`` or ``"fork"`` (notebooks, tests). Under SLURM or
            torchrun the cluster starts the processes and this is not used.
        process_group_backend: ``"nccl"`` or ``"gloo"``; ``None`` picks NCCL on CUDA and gloo on CPU.
        timeout: how long a collective may wait for the other ranks.
        device: the working device of a one-device run; normally filled in by ``Trainer(devices=...)``.
        cluster_environment: as for ``DDPStrategy``; normally detected (SLURM, torchrun, or local).
        checkpoint_io: how checkpoints are written and read; ``None``:
            :class:`zo2_lightning.checkpoint_io.AtomicCheckpointIO` (atomic, fsynced saves; weights-only loads,
            opt out per call with ``trainer.fit(..., ckpt_path=..., weights_only=False)``).

    Raises:
        ValueError: for an unknown ``offload_device``, ``storage_dtype`` or ``directions``, ``"disk"`` without an
            ``offload_dir``, or negative ``prefetch`` / ``resident_blocks``.
    """

    strategy_name = "zo2_offload"

    def __init__(
        self,
        offload_device: str | None = "cpu",
        pin_memory: bool | None = None,
        prefetch: int = 1,
        resident_blocks: int | str = 0,
        seed: int | None = None,
        max_consecutive_skips: int = 10,
        *,
        storage_dtype: str | torch.dtype | None = None,
        offload_dir: str | None = None,
        disk_flush_every: int = 16,
        max_gpu_memory: int | None = None,
        keep_directions: bool = False,
        micro_batches: int = 1,
        regenerate_directions: bool = False,
        device_slots: int | None = None,
        directions: Literal["shared", "independent"] = "shared",
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        device: str | torch.device | None = None,
        accelerator: Any = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
    ) -> None:
        if directions not in DIRECTION_MODES:
            raise ValueError(
                f"directions={directions!r} is not supported: use 'shared' (one z for all ranks, MeZO on the"
                " global batch) or 'independent' (one z per rank, all of them applied)"
            )
        super().__init__(
            accelerator=accelerator,
            # filled by the Trainer from `devices=` (see _AcceleratorConnector._lazy_init_strategy)
            parallel_devices=[torch.device(device)] if device else None,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        self._init_zo(offload_device, pin_memory, prefetch, resident_blocks, seed, max_consecutive_skips,
                      storage_dtype, offload_dir, disk_flush_every, max_gpu_memory, keep_directions, micro_batches,
                      regenerate_directions, device_slots)
        self.directions = directions
        self._offload_root = offload_dir

    @property
    def is_multiprocess(self) -> bool:
        """Whether the Trainer asked for more than one process (``devices * num_nodes > 1``)."""
        return self.num_nodes * self.num_processes > 1

    @property
    @override
    def root_device(self) -> torch.device:
        return self.parallel_devices[self.local_rank] if self.parallel_devices else torch.device("cpu")

    # ================================================================== processes
    @override
    def _configure_launcher(self) -> None:
        if self.is_multiprocess:
            super()._configure_launcher()  # DDP's: popen/spawn/fork, or nothing where the cluster starts ranks
        else:
            self._launcher = None

    @override
    def setup_environment(self) -> None:
        if self.is_multiprocess:
            super().setup_environment()  # DDP's: world ranks and the process group
        else:
            super(DDPStrategy, self).setup_environment()  # Strategy's: the device only

    @override
    def setup(self, trainer: Trainer) -> None:
        check_configuration(trainer, self.lightning_module, self.precision_plugin)
        if not self.is_multiprocess:
            # the Trainer injects a DistributedSampler into every DDPStrategy run (an isinstance check in
            # _AcceleratorConnector.is_distributed); one process keeps the user's sampler and its order
            trainer._accelerator_connector.use_distributed_sampler = False
        super(DDPStrategy, self).setup(trainer)  # Strategy's: accelerator, precision, optimizers; no DDP wrapper
        if self.is_multiprocess:
            broadcast_module_(self.lightning_module, self._collective_device)  # the only weight traffic, ever
            if self._offload_root is not None:  # one set of block files per rank, never shared between writers
                self.offload_dir = os.path.join(self._offload_root, f"rank{self.global_rank}")
        self._attach_engine(trainer)
        self._check_directions_mode()
        if self.is_multiprocess:
            assert self.engine is not None
            self.engine.seed = self.broadcast(self.engine.seed)  # rank 0's; nothing is drawn before this

    @override
    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model  # no DistributedDataParallel: the ranks share losses, not gradients

    @override
    def model_to_device(self) -> None:
        pass  # the engine places the model in setup(): blocks on the host, the rest on the working device

    @property
    def _collective_device(self) -> torch.device:
        return self.root_device if self.process_group_backend == "nccl" else torch.device("cpu")

    @override
    def teardown(self) -> None:
        # unlike Strategy.teardown, the module is not moved to the CPU: the engine puts every parameter back
        # on the device it had before fit/validate/test/predict, holding its final (flushed) value
        self._detach_engine()
        _optimizers_to_device(self.optimizers, torch.device("cpu"))
        self.precision_plugin.teardown()
        assert self.accelerator is not None
        self.accelerator.teardown()
        self.checkpoint_io.teardown()
        if self.is_multiprocess and self.cluster_environment is not None:
            self.cluster_environment.teardown()

    # ================================================================== the ZO step across ranks
    @override
    def _direction_seeds(self, q: int) -> list[int]:
        if self.directions == "independent":
            assert self.engine is not None
            return rank_direction_seeds(self.engine.seed, self.global_rank, q)
        return super()._direction_seeds(q)

    def _check_directions_mode(self) -> None:
        optimizer = self.optimizers[0] if self.optimizers else None
        if not (self.is_multiprocess and self.directions == "independent" and optimizer is not None):
            return
        assert self.engine is not None
        if self.engine.rule.stateful or getattr(optimizer, "conservative", False):
            raise ValueError(
                f"{type(optimizer).__name__} cannot run with directions='independent' on several ranks: each rank's"
                " directions are separate updates, which a momentum/Adam state or a conservative trial cannot"
                " combine. Use directions='shared' (MeZO on the global batch)."
            )

    @override
    def _reduce_values(self, values: list[float]) -> list[float]:
        if not self.is_multiprocess:
            return values
        return mean_values_over_ranks(values, self._collective_device)

    @override
    def _reduce_losses(self, measured: dict[int, list[tuple[float, float]]]) -> dict[int, list[tuple[float, float]]]:
        if not self.is_multiprocess:
            return measured
        if self.directions == "independent":
            assert self.engine is not None
            return gather_over_ranks(measured, self.engine.seed, self._collective_device)
        return mean_over_ranks(measured, self._collective_device)

    # ================================================================== checkpoints
    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any = None) -> None:
        checkpoint[_CKPT_KEY] = {"world_size": self.world_size, "directions": self.directions}
        super().save_checkpoint(checkpoint, filepath, storage_options)  # rank 0 writes

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        saved = self._resumed_state or {}
        saved_world = int(saved.get("world_size", 1))
        if "independent" in (self.directions, saved.get("directions")) and (
            saved_world != self.world_size or saved.get("directions", "shared") != self.directions
        ):
            rank_zero_warn(
                f"zo2_offload: resuming a run saved with directions={saved.get('directions', 'shared')!r} on"
                f" {saved_world} rank(s) with directions={self.directions!r} on {self.world_size}: the number of"
                " directions per step changes, so the run does not continue as it would have. Resume on the same"
                " world size, or train with directions='shared' (which resumes on any world size)."
            )
        return checkpoint

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        register_into(strategy_registry)  # the presets of zo2_lightning._registration

