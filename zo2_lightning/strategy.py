"""The ``zo2_offload`` Lightning strategy: MeZO steps with blocks streamed from host memory.

```python
import lightning.pytorch as L
import zo2_lightning                                  # registers "zo2_offload" and "zo2_resident"
trainer = L.Trainer(strategy="zo2_offload", accelerator="gpu", devices=1, precision="bf16-mixed")
trainer.fit(module, datamodule)                       # module: ZOModule + LightningModule, ZOSGD optimizer
```

Lightning glue only: the streaming, perturbation and update live in :mod:`zo2_lightning.engine`. This file
overrides ``training_step`` (the paired +eps/-eps runs), ``backward`` (nothing to do) and ``optimizer_step``
(the projected gradient and the commit), places the model, flushes before anything reads the weights, and
refuses the configurations that would silently do the wrong thing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.strategies import _StrategyRegistry
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.plugins.precision import DoublePrecision, MixedPrecision, Precision
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import Tensor
from typing_extensions import override

from zo2_lightning._registration import register_into
from zo2_lightning.engine import ZOEngine, projected_grad
from zo2_lightning.engine.perturb import all_finite
from zo2_lightning.module import ZOModule
from zo2_lightning.optim import ZOSGD

_CKPT_KEY = "zo2_lightning"
_CKPT_FORMAT = 1


class ZO2OffloadStrategy(SingleDeviceStrategy):
    """Zeroth-order (MeZO/SPSA) fine-tuning with the model's blocks streamed from host memory (ZO2).

    Per optimizer step the LightningModule's ``training_step`` runs twice, at theta + eps*z and theta - eps*z,
    in lockstep block by block (each block is uploaded once and both forwards use it); the projected gradient
    ``g = (L+ - L-) / (2 eps)`` drives ``theta <- theta - lr * (g * z + wd * theta)``, applied to each block when
    it next arrives. z is regenerated from ``(seed, global_step, block, tensor)``, never stored.

    Args:
        offload_device: where block parameters live between uses: ``"cpu"`` (streamed), or ``None`` to keep
            the whole model on the working device (in-device MeZO, the ``zo2_resident`` preset).
        pin_memory: pin the host copies for fast asynchronous uploads; ``None`` pins when training on CUDA.
        prefetch: how many blocks are uploaded ahead of the one computing (CUDA; ignored on CPU).
        resident_blocks: the first N blocks stay on the working device for the whole run.
        seed: run seed of the perturbation directions; ``None`` takes ``seed_everything``'s seed (or 0). On
            resume the checkpoint's seed is used.
        device: the working device; normally filled in by ``Trainer(accelerator=..., devices=1)``.

    Raises:
        ValueError: for an unknown ``offload_device`` or negative ``prefetch`` / ``resident_blocks``.
    """

    strategy_name = "zo2_offload"

    def __init__(
        self,
        offload_device: str | None = "cpu",
        pin_memory: bool | None = None,
        prefetch: int = 1,
        resident_blocks: int = 0,
        seed: int | None = None,
        *,
        device: str | torch.device | None = None,
        accelerator: Any = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
    ) -> None:
        if offload_device not in ("cpu", None):
            raise ValueError(
                f"offload_device={offload_device!r} is not supported: use 'cpu' (stream blocks from host memory)"
                " or None (keep the whole model on the working device)"
            )
        if int(prefetch) < 0 or int(resident_blocks) < 0:
            raise ValueError(f"prefetch ({prefetch}) and resident_blocks ({resident_blocks}) must be >= 0")
        super().__init__(
            device=device or "cpu",
            accelerator=accelerator,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        self.offload_device = offload_device
        self.pin_memory = pin_memory
        self.prefetch = int(prefetch)
        self.resident_blocks = int(resident_blocks)
        self.seed = seed
        # filled by the Trainer from `devices=` (see _AcceleratorConnector._lazy_init_strategy)
        self.parallel_devices: list[torch.device] | None = [torch.device(device)] if device else None
        self.engine: ZOEngine | None = None
        self._force_copies = False  # tests: exercise the transfer path on CPU
        self._resumed_state: dict[str, Any] | None = None
        self._pairs: list[tuple[float, float]] = []
        self.skipped_steps = 0

    # ================================================================== placement
    @property
    @override
    def root_device(self) -> torch.device:
        return self.parallel_devices[0] if self.parallel_devices else self._root_device

    @override
    def setup_environment(self) -> None:
        if self.parallel_devices and len(self.parallel_devices) > 1:
            raise ValueError(
                f"strategy='zo2_offload' runs on one device here, got devices={len(self.parallel_devices)}:"
                " use `Trainer(devices=1)`."
            )
        super().setup_environment()

    @override
    def model_to_device(self) -> None:
        pass  # the engine places the model in setup(): blocks on the host, the rest on the working device

    @override
    def setup(self, trainer: Trainer) -> None:
        module = self.lightning_module
        self._check_configuration(trainer, module)
        super().setup(trainer)
        fitting = trainer.state.fn == TrainerFn.FITTING
        optimizer = self._zo_optimizer() if fitting else None
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
        )
        groups = [group["params"] for group in optimizer.param_groups] if optimizer is not None else []
        self.engine.attach(groups)
        if optimizer is not None:
            optimizer._zo_step = self._zo_step
        self._pairs = []

    @override
    def teardown(self) -> None:
        # unlike Strategy.teardown, the module is not moved to the CPU: the engine puts every parameter back
        # on the device it had before fit/validate/test/predict, holding its final (flushed) value
        if self.engine is not None:
            self.engine.detach()
            self.engine = None
        for opt in self.optimizers:
            if isinstance(opt, ZOSGD):
                opt._zo_step = None
        _optimizers_to_device(self.optimizers, torch.device("cpu"))
        self.precision_plugin.teardown()
        assert self.accelerator is not None
        self.accelerator.teardown()
        self.checkpoint_io.teardown()

    # ================================================================== the ZO step
    @override
    def training_step(self, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        module, engine = self.lightning_module, self.engine
        assert module is not None and engine is not None
        optimizer = self._zo_optimizer()
        step = self.lightning_module.trainer.global_step

        def run(sign: int) -> Any:
            return module.training_step(*args, **kwargs)

        with self._zo_forward_mode(module), self.precision_plugin.train_step_context(), torch.no_grad():
            out_plus, out_minus = engine.run_pair(run, step=step, eps=optimizer.eps)
        loss_plus, loss_minus = _scalar_loss(out_plus), _scalar_loss(out_minus)
        self._pairs.append((loss_plus.item(), loss_minus.item()))  # sync point: g needs both values on host
        return out_plus

    @override
    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        return closure_loss  # zeroth order: no backward pass, no gradients

    def _zo_step(self, closure: Callable[[], Any]) -> Any:
        """ZOSGD.step: run the closure (the paired training step of the last micro-batch), then commit."""
        result = closure()
        pairs, self._pairs = self._pairs, []
        if not pairs:
            raise RuntimeError("the zo2_offload closure ran no training_step")
        optimizer = self._zo_optimizer()
        trainer = self.lightning_module.trainer
        eps = optimizer.eps
        lrs, wds = optimizer.hyperparameters()
        loss_plus = sum(p for p, _ in pairs) / len(pairs)
        loss_minus = sum(m for _, m in pairs) / len(pairs)
        g = sum(projected_grad(p, m, eps) for p, m in pairs) / len(pairs)  # one z, k micro-batches
        if all_finite(*(v for pair in pairs for v in pair)):
            clip = trainer.gradient_clip_val
            if clip:
                g = max(-float(clip), min(float(clip), g))
            self.engine.commit(trainer.global_step, g, lrs, wds)
        else:
            self.skipped_steps += 1
            rank_zero_warn(
                f"zo2_offload: non-finite loss at step {trainer.global_step} (L+={loss_plus}, L-={loss_minus});"
                " the update is skipped and the parameters are untouched."
            )
        module = self.lightning_module
        for name, value in (
            ("zo/loss_plus", loss_plus),
            ("zo/loss_minus", loss_minus),
            ("zo/projected_grad", g),
            ("zo/lr", lrs[0]),
        ):
            module.log(name, value, on_step=True, on_epoch=False, batch_size=1)
        return result

    @contextmanager
    def _zo_forward_mode(self, module: LightningModule) -> Iterator[None]:
        """Dropout off (both runs must see the same function, as in MeZO); logging from the +eps run only."""
        modes = [(m, m.training) for m in module.modules()]
        module.eval()
        engine = self.engine
        log = module.log

        def log_plus_only(*args: Any, **kwargs: Any) -> None:
            if engine is None or engine.sign != -1:
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

    @override
    def on_validation_start(self) -> None:
        self._flush()

    @override
    def on_test_start(self) -> None:
        self._flush()

    @override
    def on_predict_start(self) -> None:
        self._flush()

    @override
    def on_validation_end(self) -> None:
        if self.engine is not None:
            self.engine.release_blocks()

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
        checkpoint[_CKPT_KEY] = {
            "format": _CKPT_FORMAT,
            "seed": self.engine.seed if self.engine is not None else self._run_seed(),
            "skipped_steps": self.skipped_steps,
        }
        super().save_checkpoint(checkpoint, filepath, storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
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

    # ================================================================== refusals
    def _zo_optimizer(self) -> ZOSGD:
        opts = self.optimizers
        if len(opts) != 1 or not isinstance(opts[0], ZOSGD):
            got = ", ".join(type(o).__name__ for o in opts) or "none"
            raise TypeError(
                f"zo2_offload needs exactly one ZOSGD optimizer from configure_optimizers, got: {got}. Return"
                " `zo2_lightning.ZOSGD(self.parameters(), lr=1e-6, eps=1e-3)` (optionally with an LR scheduler)."
            )
        return opts[0]

    def _check_configuration(self, trainer: Trainer, module: LightningModule) -> None:
        if not isinstance(module, ZOModule):
            raise TypeError(
                f"{type(module).__name__} is not a ZOModule: zo2_offload needs to know the model's blocks. Declare"
                f" it as `class {type(module).__name__}(ZOModule, L.LightningModule)` (from zo2_lightning import"
                " ZOModule)."
            )
        if trainer.state.fn == TrainerFn.FITTING and not module.automatic_optimization:
            raise ValueError(
                "zo2_offload drives the ZO step through automatic optimization; manual optimization is not"
                " supported. Remove `self.automatic_optimization = False` and return the loss from training_step."
            )
        plugin = self.precision_plugin
        supported = (
            type(plugin) is Precision
            or isinstance(plugin, DoublePrecision)
            or (isinstance(plugin, MixedPrecision) and plugin.precision == "bf16-mixed")
        )
        if not supported:
            name = getattr(plugin, "precision", type(plugin).__name__)
            hint = {
                "16-mixed": "fp16 AMP needs a GradScaler for gradients that ZO never computes",
                "bf16-true": "bf16 master weights would round away MeZO-size updates (~1e-6)",
                "16-true": "fp16 master weights would round away MeZO-size updates (~1e-6)",
            }.get(str(name), "it is not supported by the ZO step")
            raise ValueError(
                f"zo2_offload does not support precision={name!r}: {hint}. Use `Trainer(precision='bf16-mixed')`"
                " (bf16 compute, fp32 masters) or `precision='32-true'`."
            )

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        register_into(strategy_registry)  # the presets of zo2_lightning._registration


def _scalar_loss(output: Any) -> Tensor:
    """The loss of a training_step output, or an error naming the fix."""
    loss = output.get("loss") if isinstance(output, dict) else output
    if loss is None:
        raise ValueError(
            "training_step returned None (or a dict without 'loss'): zo2_offload needs the scalar loss at every"
            " step to form (L+ - L-) / (2 eps). Return the loss tensor, e.g. `return self.model(**batch).loss`."
        )
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"training_step must return a scalar loss for zo2_offload, got {shape}. Reduce it first, e.g."
            " `return loss.mean()`."
        )
    return loss.detach().float().reshape(())
