"""The ZO step on top of Lightning's training step: paired runs in lockstep, measured losses, the commit.

```python
step = ZOStep(engine, optimizer, Reduction(), micro_batches=1, max_consecutive_skips=10)
out = step.measure(module, batch, batch_idx, global_step=t)    # strategy.training_step: the 2q runs of a batch
step.commit(module, global_step=t, clip=None)                   # strategy.optimizer_step, after the closure
```

:meth:`ZOStep.measure` runs the user's ``training_step`` at every perturbation (and micro-batch) in lockstep and
keeps the measured ``(L+, L-)``; with ``accumulate_grad_batches=k`` it is called k times before a commit, and the
measurements accumulate. :meth:`ZOStep.commit` turns them into the projected gradients (reduced over ranks by the
strategy's :class:`.collectives.Reduction`), skips a step whose losses are not finite, runs the conservative trial
of ``ZOSGDCons``, hands the commits to the engine and logs the ``zo/*`` metrics. Nothing here knows about
placement, processes or checkpoints: those are the strategy's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from zo2_lightning.engine import Commit, RunKey, ZOEngine
from zo2_lightning.engine.keys import TRIAL_PERTURBATIONS, Perturbation
from zo2_lightning.engine.perturb import all_finite
from zo2_lightning.optim import ZOOptimizer
from zo2_lightning.strategy.batches import split_batch
from zo2_lightning.strategy.collectives import Reduction
from zo2_lightning.strategy.refusals import scalar_loss

Run = Callable[[RunKey], Any]


@dataclass
class _Measured:
    """What the training steps since the last commit measured: per micro-batch ``{direction seed: (L+, L-)}``
    (``(L+, L-, L0)`` with a center run; ``None`` for a run another member of this rank's group made), and the last batch's runs (a conservative trial
    evaluates the same batch again)."""

    losses: list[dict[int, tuple[float | None, ...]]] = field(default_factory=list)
    last_run: Run | None = None


class ZOStep:
    """One ZO optimizer step at a time, over a LightningModule whose ``training_step`` returns a scalar loss.

    Args:
        engine: the attached engine (it owns the parameters).
        optimizer: the ZO optimizer (q, eps, one-sidedness, the rule's hyperparameters, conservative or not).
        reduction: how the ranks agree on the directions and losses (one process: :class:`.collectives.Reduction`).
        micro_batches: split each batch into this many equal micro-batches, all run in lockstep.
        max_consecutive_skips: stop with an error after this many consecutive steps with a non-finite loss
            (0: never).
        step_context: entered around the runs (the precision plugin's ``train_step_context``: autocast).
        skipped_steps: steps skipped before (a resumed run's count).
    """

    def __init__(self, engine: ZOEngine, optimizer: ZOOptimizer, reduction: Reduction, *, micro_batches: int = 1,
                 max_consecutive_skips: int = 10,
                 step_context: Callable[[], AbstractContextManager] | None = None, skipped_steps: int = 0) -> None:
        self.engine = engine
        self.optimizer = optimizer
        self.reduction = reduction
        self.micro_batches = int(micro_batches)
        self.max_consecutive_skips = int(max_consecutive_skips)
        self._step_context = step_context or _no_context
        self.skipped_steps = int(skipped_steps)
        self.consecutive_skips = 0
        self._measured = _Measured()

    # ------------------------------------------------------------------ the runs of a batch
    def measure(self, module: LightningModule, args: Sequence[Any], kwargs: dict[str, Any], global_step: int) -> Any:
        """Run ``module.training_step(*args, **kwargs)`` at every perturbation in lockstep and keep the losses.

        With perturbation parallelism this rank makes only its share of the runs (``reduction.share``); the
        losses of the others are ``None`` here and come from the other members of its group at the commit.

        Returns:
            What Lightning receives as the step's output: the output of this rank's first run, direction 0's +eps
            run unless another member of its group makes that one (the mean loss of that run over the micro-batches
            when the batch is split).
        """
        optimizer, chunks = self.optimizer, self.micro_batches
        parts = split_batch(args[0], chunks) if chunks > 1 else None
        runs = self.reduction.share(optimizer.perturbations())

        def run(key: RunKey) -> Any:
            if parts is None:
                return module.training_step(*args, **kwargs)
            return module.training_step(parts[key.chunk], *args[1:], **kwargs)

        seeds = self.reduction.seeds(self.engine.seed, optimizer.q)
        with self._forward_mode(module, log=runs[0]), self._step_context(), torch.no_grad(), _no_backward():
            per_chunk = self.engine.run_chunks(run, global_step, optimizer.eps, seeds, chunks, optimizer.one_sided,
                                               perturbations=runs, center=optimizer.center)
        self._measured.last_run = run if optimizer.conservative else None
        mine = set(runs)
        for outs in per_chunk:  # each micro-batch is measured as accumulate_grad_batches would measure it
            self._measured.losses.append({  # sync point: g needs the losses on host
                seed: tuple(_loss(out, p in mine) for out, p in zip(outs_d, optimizer.loss_runs(d)))
                for d, (seed, outs_d) in enumerate(zip(seeds, outs))
            })
        first = runs[0]
        at = optimizer.loss_runs(first.direction).index(first)
        return _mean_output([outs[first.direction][at] for outs in per_chunk])

    # ------------------------------------------------------------------ losses -> commits
    def commit(self, module: LightningModule, global_step: int, clip: float | None = None) -> None:
        """Commit the step from the accumulated measurements and log ``zo/*``.

        With k micro-batches (``micro_batches`` or ``accumulate_grad_batches``) and q directions, direction d gets
        the optimizer's estimate ``g_d`` (:meth:`~zo2_lightning.optim.ZOOptimizer.estimate`; MeZO: the mean over
        micro-batches of ``(L+ - L-) / (2 eps)``), clipped to ``[-clip, clip]`` when ``clip`` is set, and the update
        ``-lr * (g_d / q) * z_d`` (through the optimizer's rule).

        Raises:
            RuntimeError: nothing was measured since the last commit.
            FloatingPointError: ``max_consecutive_skips`` steps in a row had a non-finite loss.
        """
        measured, self._measured = self._measured, _Measured()
        if not measured.losses:
            raise RuntimeError("the zo2_offload closure ran no training_step")
        micro = measured.losses
        per_direction = self.reduction.losses({seed: [m[seed] for m in micro] for seed in micro[0]}, self.engine.seed)
        optimizer, engine = self.optimizer, self.engine
        lrs, wds = optimizer.hyperparameters()
        values = [v for pairs in per_direction.values() for pair in pairs for v in pair]
        logs: list[tuple[str, float]] = []
        if all_finite(*values):
            grads = optimizer.estimate(per_direction)
            q = len(grads)
            self.consecutive_skips = 0
            hyper = optimizer.step_hyper(per_direction)
            commits = []
            for seed, g in grads.items():
                if clip:
                    g = max(-float(clip), min(float(clip), g))
                g = optimizer.transform_grad(g)
                commits.append(engine.candidate(global_step, g / q if q > 1 else g, lrs, wds, seed, hyper))
            if optimizer.conservative:
                assert measured.last_run is not None
                commits, choice = self._conservative(module, measured.last_run, commits)
                logs.append(("zo/cons_choice", float(choice)))
            for c in commits:
                engine.commit(c)
        else:
            grads = {seed: math.nan for seed in per_direction}
            self._skip_non_finite(global_step, values)
        all_pairs = [pair for pairs in per_direction.values() for pair in pairs]
        for name, value in (*logs,
                            ("zo/loss_plus", sum(p[0] for p in all_pairs) / len(all_pairs)),
                            ("zo/loss_minus", sum(p[1] for p in all_pairs) / len(all_pairs)),
                            ("zo/projected_grad", sum(grads.values()) / len(grads)),
                            ("zo/lr", lrs[0]),
                            ("zo/skipped_steps", float(self.skipped_steps))):
            module.log(name, value, on_step=True, on_epoch=False, batch_size=1)

    def _conservative(self, module: LightningModule, run: Run, commits: list[Commit]) -> tuple[list[Commit], int]:
        """ZO-SGD-Cons: the losses of the step, no step and the step reversed on the step's batch; returns the
        commits of the lowest (ties prefer the step, then no step) and which it was (+1, 0, -1)."""
        runs = self.reduction.share(TRIAL_PERTURBATIONS)
        with self._forward_mode(module, log=None), self._step_context(), torch.no_grad():
            per_chunk = self.engine.run_trial(run, commits, self.micro_batches, perturbations=runs)
        losses = self.reduction.values(  # None where another member of this rank's group made the run
            [sum(_loss(outs[k], True) for outs in per_chunk) / len(per_chunk) if p in runs else None
             for k, p in enumerate(TRIAL_PERTURBATIONS)]
        )
        if not all_finite(*losses):
            return [], 0  # nothing finite to compare: stay put
        choice = min(zip(losses, (1, 0, -1)), key=lambda lc: lc[0])[1]  # min keeps the first of equal losses
        return {1: commits, 0: [], -1: [c.reversed() for c in commits]}[choice], choice

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

    # ------------------------------------------------------------------ what the runs see
    @contextmanager
    def _forward_mode(self, module: LightningModule, log: Perturbation | None) -> Iterator[None]:
        """Dropout off (every run must see the same function, as in MeZO); ``self.log`` calls from one run only,
        ``log`` on micro-batch 0 (this rank's first: direction 0's +eps run unless another member of its group
        makes that one, so that every rank logs as often, and ``sync_dist`` collectives match), or from none with
        ``log=None`` (a conservative trial)."""
        modes = [(m, m.training) for m in module.modules()]
        module.eval()
        engine, module_log = self.engine, module.log

        def first_run_only(*args: Any, **kwargs: Any) -> None:
            key = engine.run_key
            if log is not None and (key is None or (key.perturbation, key.chunk) == (log, 0)):
                module_log(*args, **kwargs)

        module.log = first_run_only  # type: ignore[method-assign]
        try:
            yield
        finally:
            del module.log
            for m, training in modes:
                m.training = training


@contextmanager
def _no_context() -> Iterator[None]:
    yield


@contextmanager
def _no_backward() -> Iterator[None]:
    """Turn autograd's error for a ``loss.backward()`` inside ``training_step`` (the runs compute no graph) into
    one that says why and what to remove."""
    try:
        yield
    except RuntimeError as err:
        if "does not require grad" not in str(err):
            raise
        raise RuntimeError(
            "training_step called backward() (or autograd.grad) on its loss, but zeroth-order training needs no"
            " backward pass: zo2_offload runs training_step twice, at +eps and -eps, without gradients, and takes"
            " the update from the two losses. Remove `loss.backward()` / `self.manual_backward(loss)` and return the"
            " loss."
        ) from err


def _loss(output: Any, made: bool) -> float | None:
    """The loss of a run this rank ``made`` on the host (an error naming the fix if there is none); ``None`` for a
    run another member of its group made."""
    return scalar_loss(output).item() if made else None


def _mean_output(outputs: list[Any]) -> Any:
    """What training_step hands Lightning for a split batch: the +eps runs' mean loss (the one output as is)."""
    if len(outputs) == 1:
        return outputs[0]
    losses = torch.stack([scalar_loss(out) for out in outputs]).mean()
    first = outputs[0]
    return {**first, "loss": losses} if isinstance(first, dict) else losses
