"""ZO optimizer objects: the hyperparameters of a zeroth-order step, carried where Lightning expects them.

```python
def configure_optimizers(self):
    opt = ZOSGD(self.parameters(), lr=1e-6, eps=1e-3, weight_decay=0.0)
    return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0, 1000)}
```

The strategy reads ``lr`` and ``weight_decay`` (and ``momentum`` / ``betas``) from the param groups at every
step, so LR schedulers, ``LearningRateMonitor`` and checkpointed optimizer state work as for any torch optimizer.
The update itself runs inside the ``zo2_offload`` strategy's streaming engine, with the rule of
:mod:`zo2_lightning.engine.rules` the optimizer names: the strategy's ``optimizer_step`` lets ``step`` run the
closure (the paired forwards) and then commits the update; ``step`` outside the strategy is an error.

The family (ZO-Bench, arXiv 2402.11592), with the host memory each keeps beyond the model:

============================  ==========================================  =======================
optimizer                     update                                      extra host memory
============================  ==========================================  =======================
``ZOSGD``                     MeZO-SGD                                    none
``ZOSGD(one_sided=True)``     forward difference, q + 1 forwards          none
``ZOSGD(direction=...)``      Gaussian or Rademacher z                    none
``ZOSGD(q=k)``                q-SPSA, k directions per residency          none (device scratch)
``ZOSGDSign``                 sign(g) instead of g                        none
``ZOSGDCons``                 conservative: best of step / none / back    none (3 more forwards)
``ZOSGDMomentum``             ZO-SGD-MMT, torch.optim.SGD momentum        1x trainable params
``ZOAdam``                    ZO-Adam, torch.optim.Adam                   2x trainable params
============================  ==========================================  =======================

The methods published since (HiZOO, LOZO, LOZO-M, Sparse MeZO, FZOO) are in :mod:`zo2_lightning.methods`, built on
the hooks of :class:`ZOOptimizer` (:meth:`~ZOOptimizer.perturbations`, :meth:`~ZOOptimizer.estimate`,
:meth:`~ZOOptimizer.step_hyper`) and of :class:`~zo2_lightning.engine.rules.UpdateRule`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from zo2_lightning.engine.keys import Perturbation, loss_tuple, step_perturbations
from zo2_lightning.engine.perturb import projected_grad
from zo2_lightning.engine.rules import AdamRule, MomentumRule, UpdateRule
from zo2_lightning.engine.seeds import DISTRIBUTIONS

_INSIDE_STRATEGY: contextvars.ContextVar[bool] = contextvars.ContextVar("zo2_inside_strategy", default=False)


@contextlib.contextmanager
def strategy_step() -> Iterator[None]:
    """Marks the ``optimizer.step`` the zo2 strategy itself drives (its ``optimizer_step``); only there may a ZO
    optimizer's :meth:`ZOOptimizer.step` run."""
    token = _INSIDE_STRATEGY.set(True)
    try:
        yield
    finally:
        _INSIDE_STRATEGY.reset(token)


class ZOOptimizer(torch.optim.Optimizer):
    """The hyperparameters of a zeroth-order step, common to every ZO optimizer (subclasses name the rule).

    Args:
        params: parameters (or param groups) to fine-tune; parameters with ``requires_grad=False`` are neither
            perturbed nor updated.
        lr: learning rate.
        eps: perturbation scale of the two-point estimate; must be the same in every param group.
        weight_decay: L2 coefficient, added to the estimated gradient (``g * z + weight_decay * theta``) as in MeZO.
        q: directions per step (q-SPSA): the update averages q two-point estimates, each along its own z,
            for 2q forwards per step. q=1 is MeZO.
        direction: distribution of z: ``"gaussian"`` (MeZO) or ``"rademacher"`` (+1/-1, as in ZO-Bench).
        one_sided: the forward-difference estimate ``g = (L(theta + eps z) - L(theta)) / eps`` (q + 1 forwards per
            step, one of them unperturbed) instead of the central ``(L+ - L-) / (2 eps)`` (2q forwards).

    Raises:
        ValueError: on ``lr < 0``, ``eps <= 0``, ``weight_decay < 0``, ``q < 1`` (``q != 1`` where ``one_direction``) or
            an unknown ``direction``.
    """

    #: ZO-SGD-Cons: try the step, no step and the step reversed, keep the best (see :class:`ZOSGDCons`)
    conservative = False
    #: a central estimate that also measures L(theta) (one more forward per step, e.g. HiZOO's curvature)
    center = False
    #: a state that follows one direction per step (momentum, Adam, ...): q must be 1 (checked here), and the
    #: strategy refuses independent directions
    one_direction = False

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        q: int = 1,
        direction: str = "gaussian",
        one_sided: bool = False,
        _rule_defaults: dict[str, Any] | None = None,
    ) -> None:
        owner = type(self).__name__
        _check_hparams(owner, lr, eps, weight_decay)
        if int(q) != q or q < 1:
            raise ValueError(f"{owner} q (directions per step) must be an integer >= 1, got {q}")
        if self.one_direction and q != 1:
            raise ValueError(
                f"{owner} supports q=1 only: its state would need the q directions' estimates combined into one"
                " gradient first. Use ZOSGD(q=...) for q-SPSA, or q=1 here."
            )
        if direction not in DISTRIBUTIONS:
            raise ValueError(f"{owner} direction={direction!r}: use one of {DISTRIBUTIONS}")
        self.q = int(q)
        self.direction = direction
        self.one_sided = bool(one_sided)
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay, **(_rule_defaults or {})))
        eps_values = {group["eps"] for group in self.param_groups}
        if len(eps_values) > 1:
            raise ValueError(f"{type(self).__name__} needs one eps for all param groups, got {sorted(eps_values)}")

    @property
    def eps(self) -> float:
        return float(self.param_groups[0]["eps"])

    def hyperparameters(self) -> tuple[list[float], list[float]]:
        """Current ``(lrs, weight_decays)`` per param group, validated (schedulers may have changed them)."""
        lrs = [float(g["lr"]) for g in self.param_groups]
        wds = [float(g["weight_decay"]) for g in self.param_groups]
        for lr, wd in zip(lrs, wds):
            _check_hparams(type(self).__name__, lr, self.eps, wd)
        return lrs, wds

    def perturbations(self) -> list[Perturbation]:
        """The perturbed runs of one step (:func:`~zo2_lightning.engine.keys.step_perturbations`)."""
        return step_perturbations(self.q, self.one_sided, self.center)

    def loss_runs(self, d: int) -> tuple[Perturbation, ...]:
        """The runs whose losses direction ``d``'s estimate reads, in the order of its loss tuple: ``(L+, L-)``,
        ``(L+, L0)`` one-sided, ``(L+, L-, L0)`` with a center run (the order the engine returns them in)."""
        return loss_tuple(d, self.one_sided, self.center)

    def estimate(self, losses: dict[int, list[tuple[float, ...]]]) -> dict[int, float]:
        """The projected gradient of each direction from the step's losses ``{direction seed: [loss tuple per
        micro-batch]}`` (tuples as :meth:`loss_runs`): MeZO's two-point estimate, averaged over micro-batches.

        Args:
            losses: as every rank sees them (reduced over ranks), all finite.
        """
        return {seed: sum(projected_grad(t[0], t[1], self.eps, self.one_sided) for t in per_batch) / len(per_batch)
                for seed, per_batch in losses.items()}

    def step_hyper(self, losses: dict[int, list[tuple[float, ...]]]) -> tuple[float, ...]:
        """The rule's coefficients for this step's commit: :meth:`rule_hyper`, plus what a method derives from
        the step's ``losses`` (as :meth:`estimate` receives them)."""
        return self.rule_hyper()

    def transform_grad(self, g: float) -> float:
        """The scalar the update multiplies z by, from the projected gradient ``g`` (MeZO-SGD: ``g`` itself)."""
        return g

    def update_rule(self) -> UpdateRule:
        """The engine's rule for this optimizer's update (MeZO-SGD)."""
        return UpdateRule()

    def rule_hyper(self) -> tuple[float, ...]:
        """The rule's coefficients now, one value for all param groups (read at every step: schedulable)."""
        return ()

    def _same_in_all_groups(self, key: str) -> Any:
        values = {_freeze(g[key]) for g in self.param_groups}
        if len(values) > 1:
            raise ValueError(f"{type(self).__name__} needs one {key} for all param groups, got {sorted(values)}")
        return self.param_groups[0][key]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Run ``closure`` (Lightning's: the paired training step); the strategy commits the update afterwards.

        Raises:
            RuntimeError: called outside the zo2 strategy's ``optimizer_step``, or without a closure.
        """
        if not _INSIDE_STRATEGY.get() or closure is None:
            raise RuntimeError(
                f"{type(self).__name__}.step() runs inside the zo2_offload strategy, which evaluates the loss at +eps"
                " and -eps: use `Trainer(strategy='zo2_offload')` and return the optimizer from"
                " `configure_optimizers`."
            )
        return closure()


class ZOSGD(ZOOptimizer):
    """MeZO-SGD: ``theta <- theta - lr * (g * z + weight_decay * theta)`` with the SPSA estimate ``g``.

    Arguments as :class:`ZOOptimizer`; MeZO uses ``lr`` 1e-7 .. 1e-6 for OPT-13B full fine-tuning.
    """


class ZOSGDSign(ZOSGD):
    """ZO-SGD-Sign (ZO-Bench, arXiv 2402.11592): ``theta <- theta - lr * (sign(g) * z + weight_decay * theta)``.

    The step length no longer scales with the noisy magnitude of g, only its sign is used; no extra memory.
    Arguments as :class:`ZOSGD`.
    """

    def transform_grad(self, g: float) -> float:
        return float((g > 0) - (g < 0))


class ZOSGDCons(ZOSGD):
    """ZO-SGD-Cons (ZO-Bench): after the estimate, evaluate the loss on the same batch at the step taken, at no
    step and at the step reversed (three more forwards, in one more pass over the blocks), and keep whichever is
    lowest (ties prefer the step, then no step). Needs ``accumulate_grad_batches=1``; no extra memory.
    Arguments as :class:`ZOSGD`.
    """

    conservative = True


class ZOSGDMomentum(ZOOptimizer):
    """ZO-SGD-MMT (ZO-Bench): heavy-ball momentum on the ZO estimate, as ``torch.optim.SGD(momentum=...)`` stepping
    with ``grad = g * z``: ``buf <- momentum * buf + grad + weight_decay * theta; theta <- theta - lr * buf``.

    The momentum buffer (one copy of the trainable parameters, in their dtype) lives in host memory next to each
    block's host copy and travels with the block for its update; it is saved in checkpoints. ``q`` must be 1.

    Args:
        momentum: the buffer's decay, in ``[0, 1)``; a param-group key (schedulers such as OneCycleLR cycle it).
        others: as :class:`ZOOptimizer`.
    """

    one_direction = True

    def __init__(self, params: Iterable[Any], lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 momentum: float = 0.9, **kwargs: Any) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"ZOSGDMomentum momentum must be in [0, 1), got {momentum}")
        super().__init__(params, lr, eps, weight_decay, _rule_defaults={"momentum": momentum}, **kwargs)

    def update_rule(self) -> UpdateRule:
        return MomentumRule()

    def rule_hyper(self) -> tuple[float, ...]:
        return (float(self._same_in_all_groups("momentum")),)


class ZOAdam(ZOOptimizer):
    """ZO-Adam (ZO-Bench): Adam on the ZO estimate, as ``torch.optim.Adam`` stepping with ``grad = g * z`` (L2
    ``weight_decay`` added to the gradient; bias-corrected moments counted in updates, skipped steps not counted).

    Its two moment buffers (two copies of the trainable parameters) live in host memory next to each block's
    host copy and travel with the block for its update; they are saved in checkpoints. ``q`` must be 1.

    Args:
        betas: the moments' decays, each in ``[0, 1)``; a param-group key.
        adam_eps: Adam's denominator term (``eps`` is the perturbation scale).
        others: as :class:`ZOOptimizer`; ZO-Bench tunes ZO-Adam's lr around 1e-5 .. 1e-4 on OPT.
    """

    one_direction = True

    def __init__(self, params: Iterable[Any], lr: float = 1e-5, eps: float = 1e-3, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8, **kwargs: Any) -> None:
        betas = tuple(float(b) for b in betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"ZOAdam betas must be two numbers in [0, 1), got {betas}")
        if not adam_eps > 0.0:
            raise ValueError(f"ZOAdam adam_eps must be > 0, got {adam_eps}")
        super().__init__(params, lr, eps, weight_decay, _rule_defaults={"betas": betas, "adam_eps": float(adam_eps)},
                         **kwargs)

    def update_rule(self) -> UpdateRule:
        return AdamRule()

    def rule_hyper(self) -> tuple[float, ...]:
        beta1, beta2 = self._same_in_all_groups("betas")
        return (float(beta1), float(beta2), float(self._same_in_all_groups("adam_eps")))


def _freeze(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _check_hparams(owner: str, lr: float, eps: float, weight_decay: float) -> None:
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(
                f"{owner} {name} must be a number, got {value!r} (on the command line: optimizer.{name}=1e-6)"
            )
    if not lr >= 0.0:
        raise ValueError(f"{owner} lr must be >= 0, got {lr}; MeZO uses 1e-7 .. 1e-6")
    if not eps > 0.0:
        raise ValueError(f"{owner} eps must be > 0, got {eps}; MeZO uses eps=1e-3")
    if not weight_decay >= 0.0:
        raise ValueError(f"{owner} weight_decay must be >= 0, got {weight_decay}")
