"""What the zo2 strategies refuse, and the errors that name the fix.

``check_configuration(trainer, module, precision_plugin)``, ``clip_projected_gradient(trainer)``,
``check_layout(world_size, perturbation_parallel)`` and ``check_step(optimizer, trainer, world_size,
directions, group_size)`` at setup, ``zo_optimizer(strategy.optimizers)`` when fitting,
``check_same_model(checkpoint, module, path)`` on load, ``check_step_options(micro_batches, directions,
max_consecutive_skips, perturbation_parallel)`` at construction, ``scalar_loss(training_step_output)`` for every
run's output. The engine's own options refuse themselves
(:class:`zo2_lightning.engine.EngineOptions`).
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.plugins.precision import DoublePrecision, HalfPrecision, MixedPrecision, Precision
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.enums import GradClipAlgorithmType
from torch import Tensor

from zo2_lightning.module import ZOModule
from zo2_lightning.optim import ZOOptimizer
from zo2_lightning.strategy.collectives import DIRECTION_MODES


def zo_optimizer(opts: list[Any]) -> ZOOptimizer:
    """The one ZO optimizer among ``opts`` (the strategy's optimizers), or an error naming the fix."""
    if len(opts) != 1 or not isinstance(opts[0], ZOOptimizer):
        got = ", ".join(type(o).__name__ for o in opts) or "none"
        raise TypeError(
            f"zo2_offload needs exactly one ZO optimizer (ZOSGD or a variant) from configure_optimizers, got: {got}."
            " Return `zo2_lightning.ZOSGD(self.parameters(), lr=1e-6, eps=1e-3)` (optionally with an LR scheduler)."
        )
    return opts[0]


def check_step_options(micro_batches: Any, directions: Any, max_consecutive_skips: Any,
                       perturbation_parallel: Any = 1) -> tuple[int, int]:
    """Refuse strategy options the step cannot use; returns ``micro_batches`` and ``perturbation_parallel`` as ints.

    Raises:
        ValueError: ``micro_batches`` or ``perturbation_parallel`` is not an integer >= 1, ``directions`` is not a
            known mode, or ``max_consecutive_skips`` is negative.
    """
    micro_batches = as_number(int, "micro_batches", micro_batches)
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
    perturbation_parallel = as_number(int, "perturbation_parallel", perturbation_parallel)
    if perturbation_parallel < 1:
        raise ValueError(
            f"perturbation_parallel must be >= 1 (ranks that split each step's perturbed runs; 1: data parallel"
            f" only), got {perturbation_parallel}"
        )
    if directions not in DIRECTION_MODES:
        raise ValueError(
            f"directions={directions!r} is not supported: use 'shared' (one z for all ranks, MeZO on the"
            " global batch) or 'independent' (one z per rank, all of them applied)"
        )
    if as_number(int, "max_consecutive_skips", max_consecutive_skips) < 0:
        raise ValueError(f"max_consecutive_skips must be >= 0 (0: never stop), got {max_consecutive_skips}")
    return micro_batches, perturbation_parallel


def check_layout(world_size: int, perturbation_parallel: int) -> None:
    """Refuse a world size that does not split into groups of ``perturbation_parallel`` ranks.

    Raises:
        ValueError: ``world_size`` is not a multiple of ``perturbation_parallel``.
    """
    if world_size % perturbation_parallel:
        fits = [g for g in range(1, world_size + 1) if world_size % g == 0]
        raise ValueError(
            f"perturbation_parallel={perturbation_parallel} puts the ranks in groups of {perturbation_parallel}"
            f" that split each step's perturbed runs, but this run has {world_size} ranks (devices x num_nodes),"
            f" not a multiple of {perturbation_parallel}. Launch a multiple of {perturbation_parallel} ranks, or set"
            f" perturbation_parallel to one of {fits} (1: data parallel only)."
        )


def check_step(optimizer: ZOOptimizer, trainer: Trainer, world_size: int, directions: str,
               group_size: int = 1) -> None:
    """Refuse an optimizer the step cannot drive under this Trainer and layout (groups of ``group_size`` ranks
    that split each step's runs, data-parallel with each other).

    Raises:
        ValueError: a conservative optimizer with ``accumulate_grad_batches > 1``; one whose state follows one
            direction per step (``optimizer.one_direction``: momentum, Adam, HiZOO, LOZO-M) or a conservative one
            with independent directions in several groups; a group size that does not divide the step's runs.
    """
    name = type(optimizer).__name__
    if optimizer.conservative and trainer.accumulate_grad_batches > 1:
        raise ValueError(
            f"{name} compares the step's candidates on one batch, so it needs"
            f" accumulate_grad_batches=1 (got {trainer.accumulate_grad_batches}): raise the batch size instead"
        )
    if world_size // group_size > 1 and directions == "independent" and (optimizer.one_direction
                                                                         or optimizer.conservative):
        raise ValueError(
            f"{name} cannot run with directions='independent' on several ranks: each rank's"
            " directions are separate updates, which a state that follows one direction per step (momentum, Adam,"
            " HiZOO's Hessian, LOZO-M) or a conservative trial cannot combine. Use directions='shared' (MeZO on the"
            " global batch)."
        )
    runs = len(optimizer.perturbations())
    if runs % group_size:
        count = "q + 1" if optimizer.one_sided else ("2q + 1" if optimizer.center else "2q")
        fits = [g for g in range(1, runs + 1) if runs % g == 0]
        idle = ", and some would idle" if group_size > runs else ""
        raise ValueError(
            f"perturbation_parallel={group_size} cannot split the {count} = {runs} perturbed runs of a"
            f" {name}(q={optimizer.q}{', one_sided=True' if optimizer.one_sided else ''}) step evenly between the"
            f" ranks of a group: the busiest rank would set the pace{idle}. Use perturbation_parallel in {fits}, or"
            f" a q whose {count} runs {group_size} divides."
        )


def check_configuration(trainer: Trainer, module: LightningModule, plugin: Precision) -> None:
    """Refuse a module, optimization mode or precision the ZO step would get silently wrong."""
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
    supported = (
        type(plugin) is Precision
        or isinstance(plugin, DoublePrecision)
        or (isinstance(plugin, MixedPrecision) and plugin.precision == "bf16-mixed")
        or (isinstance(plugin, HalfPrecision) and plugin.precision == "bf16-true")
    )
    if not supported:
        name = getattr(plugin, "precision", type(plugin).__name__)
        hint = {
            "16-mixed": "fp16 AMP needs a GradScaler for gradients that ZO never computes",
            "16-true": "fp16 weights overflow where bf16 ones do not (both get stochastically rounded updates)",
        }.get(str(name), "it is not supported by the ZO step")
        raise ValueError(
            f"zo2_offload does not support precision={name!r}: {hint}. Use `Trainer(precision='bf16-true')`"
            " (bf16 weights, updates in fp32 with stochastic rounding), 'bf16-mixed' (bf16 compute over fp32"
            " weights) or '32-true'."
        )


def clip_projected_gradient(trainer: Trainer) -> None:
    """Give ``gradient_clip_val`` its ZO meaning under either ``gradient_clip_algorithm``.

    The ZO step clips the projected gradient g to ``[-c, c]`` (for a scalar, clipping by value and by norm are the
    same thing). Lightning's own pass over the parameters' ``.grad``, which ZO never fills, is left to the norm
    variant, which does nothing without gradients; its value variant fails on the empty list.
    """
    if trainer.gradient_clip_algorithm == GradClipAlgorithmType.VALUE:
        trainer.gradient_clip_algorithm = GradClipAlgorithmType.NORM


def check_same_model(checkpoint: dict[str, Any], module: LightningModule, path: _PATH) -> None:
    """Refuse, before anything is copied, a checkpoint whose parameters do not fit ``module``."""
    saved = checkpoint.get("state_dict")
    if not isinstance(saved, dict):
        return  # Lightning itself reports a checkpoint without weights
    own = module.state_dict(keep_vars=True)
    shapes = [f"{k}: {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} here"
              for k, v in saved.items() if k in own and isinstance(v, Tensor) and v.shape != own[k].shape]
    missing = [k for k in own if k not in saved] if module.strict_loading else []
    unexpected = [k for k in saved if k not in own] if module.strict_loading else []
    if shapes or missing or unexpected:
        found = "; ".join(
            f"{what} ({len(keys)}): {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
            for what, keys in (("shape mismatch", shapes), ("missing", missing), ("unexpected", unexpected)) if keys
        )
        raise ValueError(
            f"{path} was written for a different model: {found}. Build the module with the model config of the"
            " run that wrote it (same size and architecture), or pass the checkpoint of this model."
        )


def as_number(kind: type, name: str, value: Any) -> Any:
    """``kind(value)``, or an error that names the option (a Hydra override like ``offload.micro_batches=abc``)."""
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}"
            f" (on the command line: offload.{name}=2)"
        ) from None


def scalar_loss(output: Any) -> Tensor:
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
