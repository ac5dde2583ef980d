"""The ``zo2_offload`` Lightning strategy: MeZO steps with blocks streamed from host memory, on one or many devices.

```python
import lightning.pytorch as L
import zo2_lightning                                  # registers "zo2_offload" and "zo2_resident"
trainer = L.Trainer(strategy="zo2_offload", accelerator="gpu", devices=1, precision="bf16-mixed")
trainer = L.Trainer(strategy="zo2_offload", accelerator="gpu", devices=8, num_nodes=2)  # 16 ranks, see below
trainer = L.Trainer(strategy=zo2_lightning.ZO2OffloadStrategy(perturbation_parallel=2), devices=8)  # 4 x (+eps|-eps)
trainer.fit(module, datamodule)                       # module: ZOModule + LightningModule, ZOSGD optimizer
```

This file is the Lightning glue: placement, lifecycle, the process group, the hooks that flush before anything
reads the weights, and checkpoints. The ZO step itself is :class:`.step.ZOStep`, the scalar collectives are
:mod:`.collectives`, the checkpoint entry :mod:`.checkpoint`, the refusals :mod:`.refusals`; the streaming,
perturbation and update are the engine's (:mod:`zo2_lightning.engine`). docs/distributed.md shows the launches.
"""

from __future__ import annotations

import dataclasses
import os
from datetime import timedelta
from typing import Any, Literal

import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import Tensor
from typing_extensions import override

from zo2_lightning.engine import EngineOptions, NoBlocksError, ZOEngine
from zo2_lightning.optim import strategy_step
from zo2_lightning.strategy.checkpoint import ResumeState, refuse_foreign_checkpoint
from zo2_lightning.strategy.checkpoint_io import AtomicCheckpointIO
from zo2_lightning.strategy.collectives import broadcast_module_, reduction_for
from zo2_lightning.strategy.refusals import (
    check_configuration,
    check_layout,
    check_same_model,
    clip_projected_gradient,
    check_step,
    check_step_options,
    zo_optimizer,
)
from zo2_lightning.strategy.step import ZOStep

#: the strategy's own keyword arguments besides the engine's (EngineOptions) and DDPStrategy's
STEP_OPTIONS = ("seed", "max_consecutive_skips", "micro_batches", "directions", "perturbation_parallel")


# One class for one and for many devices, built on Lightning's DDPStrategy: the registry builds "zo2_offload"
# before the Trainer knows `devices`, so the name cannot pick between two classes. DDPStrategy brings the
# launchers, cluster environments (SLURM, torchrun), world ranks, the process group and the DistributedSampler;
# we drop its DistributedDataParallel wrapper (there are no gradients) and, in a single process, skip all of it:
# no launcher, no process group, the user's own sampler - the single-device run exactly as it was. (One thing a
# single process cannot undo: Lightning's batch-size Tuner refuses every DDPStrategy, even with devices=1.)
class ZO2OffloadStrategy(DDPStrategy):
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
        seed: run seed of the perturbation directions; ``None`` takes ``seed_everything``'s seed (or 0). On
            resume the checkpoint's seed is used; with several ranks, rank 0's.
        max_consecutive_skips: stop the fit with an error after this many consecutive steps whose loss was
            not finite (each such step is skipped, parameters untouched); 0 never stops.
        micro_batches: split each batch into this many equal micro-batches along its first dimension and run all
            of them, each at +eps and -eps, in lockstep: every block is uploaded once per step for all of them
            (ZO2's transfer amortised over the batch) while each block's compute temporaries (attention scores,
            MLP activations) exist for one micro-batch at a time. The step is the one ``accumulate_grad_batches``
            would take over the same micro-batches: g averaged over them, one z.
        directions: with several ranks, ``"shared"``: all ranks perturb along the same z and g comes from the
            mean of L+ and L- over ranks (one all-reduce): exactly MeZO on the global batch, any world size
            resumes the run. ``"independent"``: rank r draws its own directions (seeds r*q .. r*q+q-1, q from
            the optimizer) on its own shard, the (L+, L-) are all-gathered and every rank applies all N*q
            updates: q-SPSA with N*q directions for the price of one collective. One process: the same either way.
            With ``perturbation_parallel`` > 1 the modes apply to the groups (group g draws seeds g*q ..).
        perturbation_parallel: ranks per group that split each step's perturbed runs (DistZO2's perturbation
            parallelism): the ranks of a group get the same batch and z, rank j of the group makes the j-th
            consecutive share of the 2q runs (q + 1 one-sided; with q=1 and 2 ranks one runs +eps, the other
            -eps), streaming every block once per step for its share only, and the group's losses meet in the
            step's one all-reduce (or all-gather), so every rank applies the same update. Groups of consecutive
            ranks are data-parallel with each other (``directions``), so world size = groups x
            perturbation_parallel; the data is sharded by group. 1 (default): data parallelism only. It must divide
            the world size and the step's run count (else an error names the fix); one process ignores it (the
            single-device run).
        start_method: how Lightning starts the ranks when it starts them itself: ``"popen"`` (re-runs the
            script, as ``strategy="ddp"``), ``"spawn"`` or ``"fork"`` (notebooks, tests). Under SLURM or
            torchrun the cluster starts the processes and this is not used.
        process_group_backend: ``"nccl"`` or ``"gloo"``; ``None`` picks NCCL on CUDA and gloo on CPU.
        timeout: how long a collective may wait for the other ranks.
        device: the working device of a one-device run; normally filled in by ``Trainer(devices=...)``.
        accelerator, cluster_environment, precision_plugin: as for ``DDPStrategy``; normally filled in or detected
            (SLURM, torchrun, or local).
        checkpoint_io: how checkpoints are written and read; ``None``:
            :class:`zo2_lightning.strategy.checkpoint_io.AtomicCheckpointIO` (atomic, fsynced saves; weights-only
            loads, opt out per call with ``trainer.fit(..., ckpt_path=..., weights_only=False)``).
        **engine_options: what to offload, where, and at what memory cost: ``offload_device``, ``pin_memory``,
            ``prefetch``, ``resident_blocks``, ``storage_dtype``, ``device_slots``, ... each documented once, on
            :class:`zo2_lightning.engine.EngineOptions`.

    Raises:
        TypeError: an option that is neither the strategy's nor the engine's (a misspelling).
        ValueError: an option value that cannot work (the message names the fix).
    """

    strategy_name = "zo2_offload"

    def __init__(
        self,
        *,
        seed: int | None = None,
        max_consecutive_skips: int = 10,
        micro_batches: int = 1,
        directions: Literal["shared", "independent"] = "shared",
        perturbation_parallel: int = 1,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        device: str | torch.device | None = None,
        accelerator: Any = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        **engine_options: Any,
    ) -> None:
        unknown = sorted(set(engine_options) - set(EngineOptions.names()))
        if unknown:
            raise TypeError(
                f"ZO2OffloadStrategy got unknown option(s) {unknown}: the strategy's own are {list(STEP_OPTIONS)},"
                f" the engine's {list(EngineOptions.names())}"
            )
        self.engine_options = EngineOptions(**engine_options)
        self.micro_batches, self.perturbation_parallel = check_step_options(micro_batches, directions,
                                                                            max_consecutive_skips,
                                                                            perturbation_parallel)
        self.seed = seed
        self.max_consecutive_skips = int(max_consecutive_skips)
        self.directions = directions
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
        self.engine: ZOEngine | None = None
        self._step: ZOStep | None = None  # while fitting
        self._resumed: ResumeState | None = None
        self._skipped_steps = 0  # kept between fits (and restored from a checkpoint)

    @property
    def is_multiprocess(self) -> bool:
        """Whether the Trainer asked for more than one process (``devices * num_nodes > 1``)."""
        return self.num_nodes * self.num_processes > 1

    @property
    def group_size(self) -> int:
        """Ranks per group of this run's layout: ``perturbation_parallel`` on several processes, else 1."""
        return self.perturbation_parallel if self.is_multiprocess else 1

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """The shard of Lightning's ``DistributedSampler`` (and of the built-in tasks' order): one per group, so
        the ranks of a group see the same batch."""
        return {"num_replicas": self.world_size // self.group_size, "rank": self.global_rank // self.group_size}

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a non-finite loss so far in this run (resumed runs included)."""
        return self._step.skipped_steps if self._step is not None else self._skipped_steps

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
        clip_projected_gradient(trainer)
        if self.is_multiprocess:
            check_layout(self.world_size, self.perturbation_parallel)
        elif self.perturbation_parallel > 1:
            rank_zero_warn(f"zo2_offload: perturbation_parallel={self.perturbation_parallel} on one process: nothing"
                           " to split, every run of a step runs here (the single-device run)")
        if not self.is_multiprocess:
            # the Trainer injects a DistributedSampler into every DDPStrategy run (an isinstance check in
            # _AcceleratorConnector.is_distributed); one process keeps the user's sampler and its order
            trainer._accelerator_connector.use_distributed_sampler = False
        super(DDPStrategy, self).setup(trainer)  # Strategy's: accelerator, precision, optimizers; no DDP wrapper
        if self.is_multiprocess:
            broadcast_module_(self.lightning_module, self._collective_device)  # the only weight traffic, ever
        self._attach(trainer)

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
        self._detach()
        _optimizers_to_device(self.optimizers, torch.device("cpu"))
        self.precision_plugin.teardown()
        assert self.accelerator is not None
        self.accelerator.teardown()
        self.checkpoint_io.teardown()
        if self.is_multiprocess and self.cluster_environment is not None:
            self.cluster_environment.teardown()

    # ================================================================== the engine over the module
    def _attach(self, trainer: Trainer) -> None:
        """Build the engine over the LightningModule and attach it (after the optimizers exist); when fitting, the
        step that drives it."""
        module = self.lightning_module
        optimizer = zo_optimizer(self.optimizers) if trainer.state.fn == TrainerFn.FITTING else None
        options = self.engine_options
        if self.is_multiprocess and options.offload_dir is not None:  # one set of block files per rank
            options = dataclasses.replace(options, offload_dir=os.path.join(options.offload_dir,
                                                                            f"rank{self.global_rank}"))
        self.engine = ZOEngine(
            module, self._blocks(module, options), self.root_device, options,
            seed=self._run_seed(),
            rule=optimizer.update_rule() if optimizer is not None else None,
            distribution=optimizer.direction if optimizer is not None else "gaussian",
        )
        if optimizer is not None:
            check_step(optimizer, trainer, self.world_size, self.directions, self.group_size)
        self.engine.attach([group["params"] for group in optimizer.param_groups] if optimizer is not None else [])
        if self.is_multiprocess:
            self.engine.seed = self.broadcast(self.engine.seed)  # rank 0's; nothing is drawn before this
        if optimizer is None:
            return
        if self._resumed is not None and self._resumed.rule_state is not None:
            self.engine.load_rule_state(self._resumed.rule_state)
        self._step = ZOStep(
            self.engine, optimizer,
            reduction_for(self.world_size, self.directions, self.global_rank, self._collective_device,
                          self.group_size),
            micro_batches=self.micro_batches, max_consecutive_skips=self.max_consecutive_skips,
            step_context=self.precision_plugin.train_step_context, skipped_steps=self._skipped_steps,
        )

    @staticmethod
    def _blocks(module: Any, options: EngineOptions) -> list[torch.nn.Module]:
        """The module's blocks; with everything on the device (``offload_device=None``) a model without a layer
        stack is fine: nothing streams, so no block is needed."""
        try:
            return module.zo_blocks()
        except NoBlocksError:
            if options.offload:
                raise
            return []

    def _detach(self) -> None:
        """Flush and give the module back: hooks off, parameters on their original devices."""
        if self._step is not None:
            self._skipped_steps = self._step.skipped_steps
            self._step = None
        if self.engine is not None:
            self.engine.detach()
            self.engine = None

    # ================================================================== the ZO step
    @override
    def training_step(self, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        assert self._step is not None, "zo2_offload: training_step outside fit"
        module = self.lightning_module
        return self._step.measure(module, args, kwargs, module.trainer.global_step)

    @override
    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        return closure_loss  # zeroth order: no backward pass, no gradients

    @override
    def optimizer_step(self, optimizer: Any, closure: Any, model: LightningModule | torch.nn.Module | None = None,
                       **kwargs: Any) -> Any:
        """Lightning's closure (the paired training steps, then its ``on_before_optimizer_step`` hooks) through the
        precision plugin and ``optimizer.step``, which only runs it; then the ZO commit of what it measured."""
        model = model or self.lightning_module
        with strategy_step():
            output = self.precision_plugin.optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        assert self._step is not None
        trainer = self.lightning_module.trainer
        self._step.commit(self.lightning_module, trainer.global_step, clip=trainer.gradient_clip_val)
        return output

    # ================================================================== flush before reads
    def _flush(self) -> None:
        if self.engine is not None:
            self.engine.flush()

    def _release_blocks(self) -> None:
        if self.engine is not None:
            self.engine.release_blocks()  # what an evaluation left on the device

    # evaluation loops: the weights are flushed before they are read, and the device is freed afterwards
    on_validation_start = on_test_start = on_predict_start = override(_flush)
    on_validation_end = on_test_end = on_predict_end = override(_release_blocks)

    @override
    def on_train_end(self) -> None:
        self._flush()

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        self._flush()
        return super().lightning_module_state_dict()

    # ================================================================== checkpoints
    @property
    @override
    def checkpoint_io(self) -> CheckpointIO:
        # Strategy's property would fill in TorchCheckpointIO; ours writes atomically and loads weights-only
        if self._checkpoint_io is None:
            self._checkpoint_io = AtomicCheckpointIO()
        elif isinstance(self._checkpoint_io, _WrappingCheckpointIO) and self._checkpoint_io.checkpoint_io is None:
            self._checkpoint_io.checkpoint_io = AtomicCheckpointIO()
        return self._checkpoint_io

    @checkpoint_io.setter
    def checkpoint_io(self, io: CheckpointIO) -> None:
        self._checkpoint_io = io

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any = None) -> None:
        engine = self.engine
        rule_state = engine.rule_state() if engine is not None and engine.attached and self._step is not None \
            else None  # update count; momentum / Adam buffers
        ResumeState(seed=engine.seed if engine is not None else self._run_seed(), skipped_steps=self.skipped_steps,
                    world_size=self.world_size, directions=self.directions, rule_state=rule_state,
                    perturbation_parallel=self.group_size).write(checkpoint)
        super().save_checkpoint(checkpoint, filepath, storage_options)  # rank 0 writes

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a checkpoint (weights-only unless ``weights_only=False``) and check it fits this run.

        Raises:
            UnsafeCheckpointError: the file needs pickled code and the caller did not pass ``weights_only=False``.
            CorruptCheckpointError: the file is truncated or not a checkpoint.
            ValueError: the checkpoint holds another model's parameters, ``fit`` would resume a checkpoint written
                by another strategy, or its zo2 entry has a format this version does not read.
        """
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        module = self.lightning_module
        resumed = ResumeState.read(checkpoint, checkpoint_path)
        if module is not None:
            check_same_model(checkpoint, module, checkpoint_path)
            trainer = getattr(module, "_trainer", None)
            if resumed is None and trainer is not None and trainer.state.fn == TrainerFn.FITTING:
                refuse_foreign_checkpoint(checkpoint_path)
        self._resumed = resumed
        if resumed is not None:
            self._skipped_steps = resumed.skipped_steps
            warning = resumed.layout_warning(self.world_size, self.directions, self.group_size)
            if warning is not None:
                rank_zero_warn(warning)
        return checkpoint

    def _run_seed(self) -> int:
        if self._resumed is not None:
            resumed = self._resumed.seed
            if self.seed is not None and int(self.seed) != resumed:
                rank_zero_warn(f"zo2_offload: resuming with the checkpoint's seed {resumed}, not seed={self.seed}")
            return resumed
        if self.seed is not None:
            return int(self.seed)
        return int(os.environ.get("PL_GLOBAL_SEED", 0))
