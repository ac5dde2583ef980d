"""ZO optimizer objects: the hyperparameters of a zeroth-order step, carried where Lightning expects them.

```python
def configure_optimizers(self):
    opt = ZOSGD(self.parameters(), lr=1e-6, eps=1e-3, weight_decay=0.0)
    return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0, 1000)}
```

The strategy reads ``lr`` and ``weight_decay`` from the param groups at every step, so LR schedulers,
``LearningRateMonitor`` and checkpointed optimizer state work as for any torch optimizer. The update
itself runs inside the ``zo2_offload`` strategy's streaming engine; ``step`` outside it is an error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from zo2_lightning.engine.seeds import DISTRIBUTIONS


class ZOSGD(torch.optim.Optimizer):
    """MeZO-SGD: ``theta <- theta - lr * (g * z + weight_decay * theta)`` with the SPSA estimate ``g``.

    Args:
        params: parameters (or param groups) to fine-tune; parameters with ``requires_grad=False`` are neither
            perturbed nor updated.
        lr: learning rate (MeZO uses 1e-7 .. 1e-6 for OPT-13B full fine-tuning).
        eps: perturbation scale of the two-point estimate; must be the same in every param group.
        weight_decay: decoupled L2 coefficient as in MeZO.
        q: directions per step (q-SPSA): the update averages q two-point estimates, each along its own z,
            for 2q forwards per step. q=1 is MeZO.
        direction: distribution of z: ``"gaussian"`` (MeZO) or ``"rademacher"`` (+1/-1, as in ZO-Bench).

    Raises:
        ValueError: on ``lr < 0``, ``eps <= 0``, ``weight_decay < 0``, ``q < 1`` or an unknown ``direction``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        q: int = 1,
        direction: str = "gaussian",
    ) -> None:
        _check_hparams(lr, eps, weight_decay)
        if int(q) != q or q < 1:
            raise ValueError(f"ZOSGD q (directions per step) must be an integer >= 1, got {q}")
        if direction not in DISTRIBUTIONS:
            raise ValueError(f"ZOSGD direction={direction!r}: use one of {DISTRIBUTIONS}")
        self.q = int(q)
        self.direction = direction
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay))
        eps_values = {group["eps"] for group in self.param_groups}
        if len(eps_values) > 1:
            raise ValueError(f"ZOSGD needs one eps for all param groups, got {sorted(eps_values)}")
        self._zo_step: Callable[[Callable[[], Any]], Any] | None = None

    @property
    def eps(self) -> float:
        return float(self.param_groups[0]["eps"])

    def hyperparameters(self) -> tuple[list[float], list[float]]:
        """Current ``(lrs, weight_decays)`` per param group, validated (schedulers may have changed them)."""
        lrs = [float(g["lr"]) for g in self.param_groups]
        wds = [float(g["weight_decay"]) for g in self.param_groups]
        for lr, wd in zip(lrs, wds):
            _check_hparams(lr, self.eps, wd)
        return lrs, wds

    def transform_grad(self, g: float) -> float:
        """The scalar the update multiplies z by, from the projected gradient ``g`` (MeZO-SGD: ``g`` itself)."""
        return g

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Run ``closure`` (the paired training step) and the ZO update, through the strategy that drives us."""
        if self._zo_step is None or closure is None:
            raise RuntimeError(
                "ZOSGD.step() runs inside the zo2_offload strategy, which evaluates the loss at +eps and -eps:"
                " use `Trainer(strategy='zo2_offload')` and return ZOSGD from `configure_optimizers`."
            )
        return self._zo_step(closure)


class ZOSGDSign(ZOSGD):
    """ZO-SGD-Sign (ZO-Bench, arXiv 2402.11592): ``theta <- theta - lr * (sign(g) * z + weight_decay * theta)``.

    The step length no longer scales with the noisy magnitude of g, only its sign is used; no extra memory.
    Arguments as :class:`ZOSGD`.
    """

    def transform_grad(self, g: float) -> float:
        return float((g > 0) - (g < 0))


def _check_hparams(lr: float, eps: float, weight_decay: float) -> None:
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(
                f"ZOSGD {name} must be a number, got {value!r} (on the command line: optimizer.{name}=1e-6)"
            )
    if not lr >= 0.0:
        raise ValueError(f"ZOSGD lr must be >= 0, got {lr}; MeZO uses 1e-7 .. 1e-6")
    if not eps > 0.0:
        raise ValueError(f"ZOSGD eps must be > 0, got {eps}; MeZO uses eps=1e-3")
    if not weight_decay >= 0.0:
        raise ValueError(f"ZOSGD weight_decay must be >= 0, got {weight_decay}")
