"""The ``zo2_offload`` Lightning strategy: MeZO steps with blocks streamed from host memory, on one device.

```python
import lightning.pytorch as L
import zo2_lightning                                  # registers "zo2_offload" and "zo2_resident"
trainer = L.Trainer(strategy="zo2_offload", accelerator="gpu", devices=1, precision="bf16-mixed")
trainer.fit(module, datamodule)                       # module: ZOModule + LightningModule, ZOSGD optimizer
```

Placement and lifecycle for a single device; the ZO step itself is :class:`zo2_lightning.zo_core.ZOStrategyCore`.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.strategies import _StrategyRegistry
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch import Trainer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import SingleDeviceStrategy
from typing_extensions import override

from zo2_lightning._registration import register_into
from zo2_lightning.zo_core import ZOStrategyCore


class ZO2OffloadStrategy(ZOStrategyCore, SingleDeviceStrategy):
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
        max_consecutive_skips: stop the fit with an error after this many consecutive steps whose loss was
            not finite (each such step is skipped, parameters untouched); 0 never stops.
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
        max_consecutive_skips: int = 10,
        *,
        device: str | torch.device | None = None,
        accelerator: Any = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
    ) -> None:
        super().__init__(
            device=device or "cpu",
            accelerator=accelerator,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        self._init_zo(offload_device, pin_memory, prefetch, resident_blocks, seed, max_consecutive_skips)
        # filled by the Trainer from `devices=` (see _AcceleratorConnector._lazy_init_strategy)
        self.parallel_devices: list[torch.device] | None = [torch.device(device)] if device else None

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
        self._check_configuration(trainer, self.lightning_module)
        super().setup(trainer)
        self._attach_engine(trainer)

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

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        register_into(strategy_registry)  # the presets of zo2_lightning._registration
