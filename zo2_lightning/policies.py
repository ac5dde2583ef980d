"""How a ``precision/`` choice maps onto the Trainer, the model build and the offload strategy.

``policy = PrecisionPolicy("bf16-mixed", storage_dtype="bfloat16")``; ``Trainer(precision=
policy.trainer_precision)``, ``build_model(..., dtype=policy.model_dtype)`` and
``ZO2OffloadStrategy(**offload_kwargs, **policy.strategy_kwargs())``. Blocks travel to the working
device in their storage dtype and are widened there, so storage and transfer dtype are one choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

SUPPORTED_TRAINER_PRECISION = ("32-true", "bf16-mixed", "bf16-true")


@dataclass(frozen=True)
class PrecisionPolicy:
    """Compute precision, the dtype weights are built in, and the offload engine's storage dtype.

    Args:
        trainer_precision: Lightning's ``precision=`` (``32-true``, ``bf16-mixed`` or ``bf16-true``; the strategy
            refuses the others).
        model_dtype: dtype of the weights when the model is built (the host copy).
        storage_dtype: dtype the offload engine keeps host copies in and uploads (``None``: the model's);
            updates are written back with seeded stochastic rounding.

    Raises:
        ValueError: for a trainer precision the ZO strategy does not support.
    """

    trainer_precision: str = "32-true"
    model_dtype: str = "float32"
    storage_dtype: str | None = None

    def __post_init__(self) -> None:
        if str(self.trainer_precision) not in SUPPORTED_TRAINER_PRECISION:
            raise ValueError(
                f"precision {self.trainer_precision!r} is not supported by zo2_offload: use one of"
                f" {SUPPORTED_TRAINER_PRECISION} (precision=fp32, bf16_mixed or bf16_true)."
            )

    def strategy_kwargs(self) -> dict[str, Any]:
        """The storage keyword argument (as ``torch.dtype``) to pass to the strategy, if set."""
        return {"storage_dtype": getattr(torch, self.storage_dtype)} if self.storage_dtype is not None else {}
