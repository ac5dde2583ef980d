"""The ZO half of every zo2 strategy: the paired training step, the commit, flushes, checkpoints.

``class ZO2OffloadStrategy(ZOStrategyCore, DDPStrategy)``: the strategy class owns placement, lifecycle and the
process group, and overrides :meth:`ZOStrategyCore._direction_seeds` / :meth:`ZOStrategyCore._reduce_losses`
for several ranks; this mixin owns the ZO behaviour itself.

Lightning glue only: the streaming, perturbation and update live in :mod:`zo2_lightning.engine`. The core
overrides ``training_step`` (the +eps/-eps runs in lockstep), ``backward`` (nothing to do) and drives the
update from ``ZOSGD.step`` (the projected gradient and the commit) and flushes before anything reads the
weights; the configurations that would silently do the wrong thing are refused by :mod:`zo2_lightning.refusals`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import Tensor
from typing_extensions import override

from zo2_lightning.batches import split_batch
from zo2_lightning.checkpoint_io import AtomicCheckpointIO
from zo2_lightning.engine import ZOEngine, direction_seed, projected_grad
from zo2_lightning.engine.perturb import all_finite
from zo2_lightning.engine.spsa import Commit
from zo2_lightning.engine.streaming import device_slot_count
from zo2_lightning.engine.zo import check_direction_buffers
from zo2_lightning.optim import ZOSGD
from zo2_lightning.refusals import (
    as_number,
    check_same_model,
    scalar_loss,
    zo_optimizer,
)

_STORAGE_DTYPES = {
    None: None, "fp32": None, "float32": None, torch.float32: None,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, torch.bfloat16: torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, torch.float16: torch.float16,
}
_CKPT_KEY = "zo2_lightning"
_CKPT_FORMAT = 1


class ZOStrategyCore:
    """Mixin with the ZO behaviour shared by the zo2 strategies (must precede the Lightning base class).

    The concrete strategy sets the ``offload_device``, ``pin_memory``, ``prefetch``, ``resident_blocks`` and
    ``seed`` attributes (see :meth:`_init_zo`) and calls :meth:`_attach_engine` / :meth:`_detach_engine` from
    its ``setup`` / ``teardown``.
    """

    engine: ZOEngine | None

    def _init_zo(
        self,
        offload_device: str | None,
        pin_memory: bool | None,
        prefetch: int,
        resident_blocks: int | str,
        seed: int | None,
        max_consecutive_skips: int = 0,
        storage_dtype: str | torch.dtype | None = None,
        offload_dir: str | None = None,
        disk_flush_every: int = 16,
        max_gpu_memory: int | None = None,
        keep_directions: bool = False,
        micro_batches: int = 1,
        regenerate_directions: bool = False,
        device_slots: int | None = None,
    ) -> None:
        """Validate and keep the ZO options (documented on the concrete strategy)."""
        if offload_device not in ("cpu", "disk", None):
            raise ValueError(
                f"offload_device={offload_device!r} is not supported: use 'cpu' (stream blocks from host memory),"
                " 'disk' (from files under offload_dir) or None (keep the whole model on the working device)"
            )
        if (offload_device == "disk") != (offload_dir is not None):
            raise ValueError(
                "disk offload needs both `offload_device='disk'` and `offload_dir='/path/on/a/local/drive'`"
            )
        prefetch = as_number(int, "prefetch", prefetch)
        if resident_blocks != "auto":
            resident_blocks = as_number(int, "resident_blocks", resident_blocks)
        if prefetch < 0 or (resident_blocks != "auto" and resident_blocks < 0):
            raise ValueError(f"prefetch ({prefetch}) and resident_blocks ({resident_blocks}) must be >= 0")
        if storage_dtype not in _STORAGE_DTYPES:
            raise ValueError(f"storage_dtype={storage_dtype!r}: choose 'bf16', 'fp16' or None (the parameters' dtype)")
        if int(disk_flush_every) < 1:
            raise ValueError(f"disk_flush_every must be >= 1, got {disk_flush_every}")
        micro_batches = as_number(int, "micro_batches", micro_batches)
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        self.micro_batches = micro_batches
        self.offload_device = offload_device
        self.pin_memory = pin_memory
        self.prefetch = int(prefetch)
        self.resident_blocks = resident_blocks if resident_blocks == "auto" else int(resident_blocks)
        self.seed = seed
        self.storage_dtype = storage_dtype
        self.offload_dir = offload_dir
        self.disk_flush_every = int(disk_flush_every)
        self.max_gpu_memory = max_gpu_memory
        self.keep_directions = bool(keep_directions)
        self.regenerate_directions = bool(regenerate_directions)
        if device_slots is not None:  # checked here, at construction, as the engine will check it at setup
            device_slots = device_slot_count(as_number(int, "device_slots", device_slots), prefetch)
        self.device_slots = device_slots
        check_direction_buffers(self.keep_directions, self.regenerate_directions)
        self.engine = None
        self._force_copies = False  # tests: exercise the transfer path on CPU
        self._resumed_state: dict[str, Any] | None = None
        self._measured: list[dict[int, tuple[float, float]]] = []  # per micro-batch: direction seed -> (L+, L-)
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.max_consecutive_skips = int(max_consecutive_skips)

    def _attach_engine(self, trainer: Trainer) -> None:
        """Build the engine over the LightningModule and attach it (after the optimizers exist)."""
        module = self.lightning_module
        fitting = trainer.state.fn == TrainerFn.FITTING
        optimizer = zo_optimizer(self.optimizers) if fitting else None
        self.engine = ZOEngine(
            module,
            module.zo_blocks(),
            self.root_device,
            seed=self._run_seed(),
            offload=self.offload_device is not None,
            pin_memory=self.pin_memory,
            prefetch=self.prefetch,
            resident_blocks=self.resident_blocks,
            force_copies=self._force_copies,
            storage_dtype=_STORAGE_DTYPES[self.storage_dtype],
            offload_dir=self.offload_dir,
            disk_flush_every=self.disk_flush_every,
            max_device_memory=self.max_gpu_memory,
            keep_directions=self.keep_directions,
            regenerate_directions=self.regenerate_directions,
            device_slots=self.device_slots,
            distribution=optimizer.direction if optimizer is not None else "gaussian",
            rule=optimizer.update_rule() if optimizer is not None else None,
        )
        if optimizer is not None and optimizer.conservative and trainer.accumulate_grad_batches > 1:
            raise ValueError(
                f"{type(optimizer).__name__} compares the step's candidates on one batch, so it needs"
                f" accumulate_grad_batches=1 (got {trainer.accumulate_grad_batches}): raise the batch size instead"
            )
        groups = [group["params"] for group in optimizer.param_groups] if optimizer is not None else []
        self.engine.attach(groups)
        if optimizer is not None:
            optimizer._zo_step = self._zo_step
            saved = (self._resumed_state or {}).get("rule_state")
            if saved is not None:
                self.engine.load_rule_state(saved)
        self._measured = []
        self._last_run = None

    def _detach_engine(self) -> None:
        """Flush and give the module back: hooks off, parameters on their original devices."""
        if self.engine is not None:
            self.engine.detach()
            self.engine = None
        for opt in self.optimizers:
            if isinstance(opt, ZOSGD):
                opt._zo_step = None

    # ================================================================== the ZO step
    @override
    def training_step(self, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        module, engine = self.lightning_module, self.engine
        assert module is not None and engine is not None
        optimizer = zo_optimizer(self.optimizers)
        step = self.lightning_module.trainer.global_step

        chunks = self.micro_batches
        parts = split_batch(args[0], chunks) if chunks > 1 else None

        def run(key: Any) -> Any:  # key: (direction, sign, micro-batch)
            if parts is None:
                return module.training_step(*args, **kwargs)
            return module.training_step(parts[key[2]], *args[1:], **kwargs)

        seeds = self._direction_seeds(optimizer.q)
        with self._zo_forward_mode(module), self.precision_plugin.train_step_context(), torch.no_grad():
            per_chunk = engine.run_chunks(run, step, optimizer.eps, seeds, chunks, optimizer.one_sided)
        self._last_run = run if optimizer.conservative else None  # the trial runs the same batch again
        for outs in per_chunk:  # each micro-batch is measured as accumulate_grad_batches would measure it
            measured: dict[int, tuple[float, float]] = {}
            for seed, (out_plus, out_minus) in zip(seeds, outs):
                loss_plus, loss_minus = scalar_loss(out_plus), scalar_loss(out_minus)
                measured[seed] = (loss_plus.item(), loss_minus.item())  # sync point: g needs both on host
            self._measured.append(measured)
        return _mean_output([outs[0][0] for outs in per_chunk])

    @override
    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        return closure_loss  # zeroth order: no backward pass, no gradients

    def _direction_seeds(self, q: int) -> list[int]:
        """The run seeds of this process's directions at each step (q-SPSA: q of them)."""
        assert self.engine is not None
        return [direction_seed(self.engine.seed, k) for k in range(q)]

    def _reduce_losses(self, measured: dict[int, list[tuple[float, float]]]) -> dict[int, list[tuple[float, float]]]:
        """``{direction seed: [(L+, L-) per micro-batch]}`` as every rank must see it; one process: as measured."""
        return measured

    def _zo_step(self, closure: Callable[[], Any]) -> Any:
        """ZOSGD.step: run the closure (the paired training step of the last micro-batch), then commit.

        With k micro-batches (accumulate_grad_batches) and q directions, direction d gets
        ``g_d = mean over micro-batches of (L+ - L-) / (2 eps)`` and the update ``-lr * (g_d / q) * z_d`` for each d.
        """
        result = closure()
        micro, self._measured = self._measured, []
        if not micro:
            raise RuntimeError("the zo2_offload closure ran no training_step")
        per_direction = self._reduce_losses({seed: [m[seed] for m in micro] for seed in micro[0]})
        optimizer = zo_optimizer(self.optimizers)
        trainer = self.lightning_module.trainer
        eps = optimizer.eps
        lrs, wds = optimizer.hyperparameters()
        values = [v for pairs in per_direction.values() for pair in pairs for v in pair]
        grads = {seed: sum(projected_grad(p, m, eps, optimizer.one_sided) for p, m in pairs) / len(pairs)
                 for seed, pairs in per_direction.items()}
        q = len(grads)
        logs: list[tuple[str, float]] = []
        if all_finite(*values):
            self.consecutive_skips = 0
            clip = trainer.gradient_clip_val
            hyper = optimizer.rule_hyper()
            commits = []
            for seed, g in grads.items():
                if clip:
                    g = max(-float(clip), min(float(clip), g))
                g = optimizer.transform_grad(g)
                commits.append(self.engine.candidate(trainer.global_step, g / q if q > 1 else g, lrs, wds, seed, hyper))
            if optimizer.conservative:
                commits, choice = self._conservative(commits)
                logs.append(("zo/cons_choice", float(choice)))
            for c in commits:
                self.engine.commit(c)
        else:
            self._skip_non_finite(trainer.global_step, values)
        all_pairs = [pair for pairs in per_direction.values() for pair in pairs]
        module = self.lightning_module
        for name, value in (*logs,
            ("zo/loss_plus", sum(p for p, _ in all_pairs) / len(all_pairs)),
            ("zo/loss_minus", sum(m for _, m in all_pairs) / len(all_pairs)),
            ("zo/projected_grad", sum(grads.values()) / q),
            ("zo/lr", lrs[0]),
            ("zo/skipped_steps", float(self.skipped_steps)),
        ):
            module.log(name, value, on_step=True, on_epoch=False, batch_size=1)
        return result

    def _conservative(self, commits: list[Commit]) -> tuple[list[Commit], int]:
        """ZO-SGD-Cons: the losses of the step, no step and the step reversed on the step's batch; returns the
        commits of the lowest (ties prefer the step, then no step) and which it was (+1, 0, -1)."""
        run, module, engine = self._last_run, self.lightning_module, self.engine
        assert run is not None and engine is not None
        self._last_run = None
        with self._zo_forward_mode(module, log=False), self.precision_plugin.train_step_context(), torch.no_grad():
            per_chunk = engine.run_trial(run, commits, self.micro_batches)
        losses = self._reduce_values(
            [sum(scalar_loss(outs[k]).item() for outs in per_chunk) / len(per_chunk) for k in range(3)]
        )
        if not all_finite(*losses):
            return [], 0  # nothing finite to compare: stay put
        choice = min(zip(losses, (1, 0, -1)), key=lambda lc: lc[0])[1]  # min keeps the first of equal losses
        return {1: commits, 0: [], -1: [c.reversed() for c in commits]}[choice], choice

    def _reduce_values(self, values: list[float]) -> list[float]:
        """Scalars every rank must agree on (the trial losses): one process keeps them as measured."""
        return values

    def _skip_non_finite(self, step: int, values: list[float]) -> None:
        self.skipped_steps += 1
        self.consecutive_skips += 1
        if self.max_consecutive_skips and self.consecutive_skips >= self.max_consecutive_skips:
            raise FloatingPointError(
                f"zo2_offload: {self.consecutive_skips} consecutive steps with a non-finite L+ or L- (last at step"
                f" {step}); the parameters are untouched since the last finite step. Likely causes: lr too large"
                " (the weights diverged), eps too large or too small for the precision (try eps=1e-3), or fp16"
                " overflow (use precision='bf16-mixed'). Raise `max_consecutive_skips` to tolerate more."
            )
        rank_zero_warn(
            f"zo2_offload: non-finite loss at step {step} (losses {values}); the update is skipped and the"
            " parameters are untouched."
        )

    @contextmanager
    def _zo_forward_mode(self, module: LightningModule, log: bool = True) -> Iterator[None]:
        """Dropout off (both runs must see the same function, as in MeZO); logging from the +eps run only (none
        with ``log=False``)."""
        modes = [(m, m.training) for m in module.modules()]
        module.eval()
        engine = self.engine
        log = module.log

        def log_plus_only(*args: Any, **kwargs: Any) -> None:
            first = engine is None or (engine.direction in (None, 0) and engine.sign in (None, +1)
                                       and engine.chunk in (None, 0))
            if log and first:
                log(*args, **kwargs)

        module.log = log_plus_only  # type: ignore[method-assign]
        try:
            yield
        finally:
            del module.log
            for m, training in modes:
                m.training = training

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
    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any = None) -> None:
        entry = checkpoint.setdefault(_CKPT_KEY, {})  # a strategy may have put its own entries there first
        entry.update(
            format=_CKPT_FORMAT,
            seed=self.engine.seed if self.engine is not None else self._run_seed(),
            skipped_steps=self.skipped_steps,
        )
        if self.engine is not None and self.engine.attached and self.engine.spsa is not None:
            entry["rule_state"] = self.engine.rule_state()  # update count; momentum / Adam buffers
        super().save_checkpoint(checkpoint, filepath, storage_options)

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
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a checkpoint (weights-only unless ``weights_only=False``) and check it fits this run.

        Raises:
            UnsafeCheckpointError: the file needs pickled code and the caller did not pass ``weights_only=False``.
            CorruptCheckpointError: the file is truncated or not a checkpoint.
            ValueError: the checkpoint holds another model's parameters, or ``fit`` would resume a checkpoint
                written by another strategy.
        """
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        module = self.lightning_module
        if module is not None:
            check_same_model(checkpoint, module, checkpoint_path)
            trainer = getattr(module, "_trainer", None)
            if _CKPT_KEY not in checkpoint and trainer is not None and trainer.state.fn == TrainerFn.FITTING:
                raise ValueError(
                    f"{checkpoint_path} was not written by a zo2 strategy (it has no {_CKPT_KEY!r} entry), so"
                    " fit cannot resume it: its optimizer state and step count belong to another run and the"
                    " ZO seed is unknown. To start ZO fine-tuning from its weights, load them and fit from"
                    " step 0: `module.load_state_dict(torch.load(path, weights_only=True)['state_dict'])`, then"
                    " `trainer.fit(module)` without ckpt_path."
                )
        self._resumed_state = checkpoint.get(_CKPT_KEY)
        if self._resumed_state is not None:
            self.skipped_steps = int(self._resumed_state.get("skipped_steps", 0))
        return checkpoint

    def _run_seed(self) -> int:
        if self._resumed_state is not None:
            resumed = int(self._resumed_state["seed"])
            if self.seed is not None and int(self.seed) != resumed:
                rank_zero_warn(f"zo2_offload: resuming with the checkpoint's seed {resumed}, not seed={self.seed}")
            return resumed
        if self.seed is not None:
            return int(self.seed)
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

def _mean_output(outputs: list[Any]) -> Any:
    """What training_step hands Lightning for a split batch: the +eps runs' mean loss (the one output as is)."""
    if len(outputs) == 1:
        return outputs[0]
    losses = torch.stack([scalar_loss(out) for out in outputs]).mean()
    first = outputs[0]
    return {**first, "loss": losses} if isinstance(first, dict) else losses
