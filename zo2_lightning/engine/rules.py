"""Update rules: what one commit does to a flat run of parameters, given z and the projected gradient g.

```python
rule = AdamRule()                                   # or UpdateRule() (MeZO-SGD), MomentumRule()
state = rule.new_state(numel, dtype, device)        # per tensor run: [] / [buf] / [exp_avg, exp_avg_sq]
rule.apply_(theta, z, state, g, lr, wd, hyper=(0.9, 0.999, 1e-8), t=1)
```

The gradient estimate of a step is ``grad = g * z`` (plus ``wd * theta``, L2 as in torch.optim); each rule
applies torch.optim's own single-tensor formula to it, op for op, so a rule equals ``torch.optim.SGD`` /
``torch.optim.Adam`` (``foreach=False``) stepping with ``p.grad = g * z`` bit for bit. ``z`` is consumed as
scratch (no temporary the size of the block). ``hyper`` carries the rule's coefficients as they were when the
step was committed (a scheduler may change them), ``t`` the 1-based number of the update (Adam's bias
correction). State buffers are zero-initialised, which for momentum equals torch's first-step copy.

Rules are plain torch, used by :class:`zo2_lightning.engine.spsa.UnitSPSA` on one unit at a time.

A rule may also shape the direction itself (the methods of :mod:`zo2_lightning.methods`), through four hooks
that all run on one trainable tensor at a time, on the working device:

- :meth:`UpdateRule.draw_`: z of one tensor from its :class:`TensorKey` (default: :func:`.seeds.draw_direction`
  with ``derive_seed(*key)``; LOZO: a low-rank product);
- :meth:`UpdateRule.perturbation_`: z -> the direction the perturbed runs read (HiZOO: ``z / sqrt(H)``; Sparse
  MeZO: ``z * mask(theta)``), with the tensor's state and its current values (``shapes_direction``);
- :meth:`UpdateRule.init_state_`: the tensor's state before its first use (default: zeros, as created);
- :meth:`UpdateRule.update_`: the update of one tensor (``per_tensor`` rules, whose update is not elementwise:
  a threshold over the tensor, a low-rank momentum); the others update whole segments with :meth:`apply_`.

``state_shape`` gives a tensor's state buffer its own shape (LOZO-M's momentum is m x r for an m x n matrix).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

from zo2_lightning.engine.perturb import sgd_update_
from zo2_lightning.engine.pinned import flat_empty
from zo2_lightning.engine.seeds import derive_seed, draw_direction

if TYPE_CHECKING:
    from zo2_lightning.engine.ledger import Commit


class TensorKey(NamedTuple):
    """Where one tensor's direction comes from: ``derive_seed(seed, step, unit, tensor)`` (see :mod:`.seeds`)."""

    seed: int
    step: int
    unit: int
    tensor: int


class UpdateRule:
    """MeZO-SGD: ``theta <- theta - lr * (g * z + wd * theta)``; no state."""

    name = "sgd"
    state_names: tuple[str, ...] = ()
    #: the perturbed runs read :meth:`perturbation_` of z, not z (so a z kept from the runs cannot serve the update)
    shapes_direction = False
    #: the update runs tensor by tensor through :meth:`update_` (16-bit tensors are widened whole, not in chunks)
    per_tensor = False

    @property
    def stateful(self) -> bool:
        return bool(self.state_names)

    def state_shape(self, shape: torch.Size) -> torch.Size:
        """The shape of one tensor's buffer of each state name (default: the tensor's own)."""
        return shape

    def new_state(self, numel: int, dtype: torch.dtype, device: torch.device, pin: bool = False) -> list[torch.Tensor]:
        """Zeroed state buffers of ``numel`` elements (one per name in ``state_names``)."""
        return [flat_empty(numel, dtype, device, pin).zero_() for _ in self.state_names]

    def init_state_(self, theta: torch.Tensor, state: Sequence[torch.Tensor]) -> None:
        """Set one tensor's state before its first use, from its values then (default: leave the zeros)."""

    def draw_(self, out: torch.Tensor, key: TensorKey, generator: torch.Generator, distribution: str) -> None:
        """z of one tensor into ``out`` (its shape): the ``distribution``'s draw from ``derive_seed(*key)``."""
        draw_direction(out, derive_seed(*key), generator, distribution)

    def perturbation_(self, z: torch.Tensor, theta: torch.Tensor, state: Sequence[torch.Tensor]) -> None:
        """z -> the direction the perturbed runs read, in place (only called when ``shapes_direction``)."""

    def update_(self, theta: torch.Tensor, z: torch.Tensor, state: Sequence[torch.Tensor], c: Commit, lr: float,
                weight_decay: float, key: TensorKey, generator: torch.Generator) -> None:
        """One tensor's update (``per_tensor`` rules): by default :meth:`apply_` on it."""
        self.apply_(theta, z, state, c.g, lr, weight_decay, c.hyper, c.t)

    def apply_(
        self,
        theta: torch.Tensor,
        z: torch.Tensor,
        state: Sequence[torch.Tensor],
        g: float,
        lr: float,
        weight_decay: float,
        hyper: Sequence[float] = (),
        t: int = 0,
    ) -> None:
        sgd_update_(theta, z, g, lr, weight_decay)



class MomentumRule(UpdateRule):
    """ZO-SGD-MMT, as ``torch.optim.SGD(momentum=beta)``: ``buf <- beta * buf + grad; theta <- theta - lr * buf``.

    ``hyper = (beta,)``; state: the momentum buffer (one copy of the parameters).
    """

    name = "momentum"
    state_names = ("momentum_buffer",)

    def apply_(self, theta, z, state, g, lr, weight_decay, hyper=(), t=0) -> None:  # type: ignore[override]
        (beta,) = hyper
        (buf,) = state
        grad = z.mul_(g)
        if weight_decay != 0.0:
            grad.add_(theta, alpha=weight_decay)
        buf.mul_(beta).add_(grad, alpha=1.0)
        theta.add_(buf, alpha=-lr)


class AdamRule(UpdateRule):
    """ZO-Adam, as ``torch.optim.Adam`` (L2 ``weight_decay`` added to the gradient, bias-corrected moments).

    ``hyper = (beta1, beta2, adam_eps)``; ``t`` the update count; state: ``exp_avg`` and ``exp_avg_sq`` (two
    copies of the parameters).
    """

    name = "adam"
    state_names = ("exp_avg", "exp_avg_sq")

    def apply_(self, theta, z, state, g, lr, weight_decay, hyper=(), t=0) -> None:  # type: ignore[override]
        beta1, beta2, adam_eps = hyper
        exp_avg, exp_avg_sq = state
        if t < 1:
            raise ValueError(f"AdamRule needs the 1-based update count t, got {t}")
        grad = z.mul_(g)
        if weight_decay != 0.0:
            grad.add_(theta, alpha=weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = lr / (1 - beta1**t)
        bias_correction2_sqrt = (1 - beta2**t) ** 0.5
        denom = torch.sqrt(exp_avg_sq, out=z)  # grad is spent: its buffer holds the denominator
        denom.div_(bias_correction2_sqrt).add_(adam_eps)
        theta.addcdiv_(exp_avg, denom, value=-step_size)

