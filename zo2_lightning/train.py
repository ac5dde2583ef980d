"""Train: ``python -m zo2_lightning.train [group=option ...] [key=value ...]`` (``-m`` for a sweep).

``metrics, objects = train(compose("train", overrides, output_dir))`` runs the same thing from Python.

The default composes a tiny random-init OPT, the synthetic task and ``zo2_offload`` on one CPU, about a
minute on two cores; ``model=opt-13b precision=bf16 offload=cpu_overlap task=sst2 trainer=gpu`` is a MeZO
run on a GPU. Each config group (``conf/<group>/``) builds one object through its ``_target_``; this module
only wires them together, and no DictConfig travels below it.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as L
from hydra.utils import instantiate
from omegaconf import DictConfig

import zo2_lightning  # noqa: F401  (registers the strategy names)
from zo2_lightning.strategy.checkpoint_io import UnsafeCheckpointError
from zo2_lightning.config import CONF_DIR, accepts, check_types, instantiate_each, to_plain
from zo2_lightning.run_output import log_to_hydra, quiet_dependency_noise

log = logging.getLogger(__name__)


def build(cfg: DictConfig) -> dict[str, Any]:
    """Instantiate everything a run needs from a composed config.

    The ``tuning`` config (:func:`zo2_lightning.peft.tuning.tuning`) prepares the model in place before the
    LightningModule is built, so the optimizer is handed only the parameters it leaves trainable.

    Args:
        cfg: a composed ``train`` or ``eval`` config with ``paths.output_dir`` resolved.

    Returns:
        ``precision``, ``model``, ``tokenizer``, ``datamodule``, ``module``, ``callbacks``, ``loggers``,
        ``trainer``.

    Raises:
        ValueError: for a numeric setting given as text (``trainer.max_steps=abc``), naming the override.
    """
    check_types(cfg)
    quiet_dependency_noise()
    precision = instantiate(cfg.precision)
    bundle = instantiate(cfg.model, _convert_="all")
    if cfg.get("tuning"):  # which parameters train (full, LoRA, prefix, head): set before the module sees them
        instantiate(cfg.tuning, _convert_="all")(bundle.model)
    extra = {"tokenizer": bundle.tokenizer} if accepts(cfg.task, "tokenizer") else {}
    datamodule = instantiate(cfg.task, **extra, _convert_="all")
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    module = instantiate(
        cfg.module, model=bundle.model, tokenizer=bundle.tokenizer, optimizer=instantiate(cfg.optimizer),
        scheduler=scheduler, _convert_="all",
    )
    check_objective(module, datamodule)
    strategy = instantiate(cfg.offload, **precision.strategy_kwargs())
    callbacks = instantiate_each(cfg.get("callbacks"))
    loggers = instantiate_each(cfg.get("logger"))
    for logger in loggers:
        logger.log_hyperparams(to_plain(cfg))
    trainer = instantiate(
        cfg.trainer, strategy=strategy, precision=precision.trainer_precision, callbacks=callbacks,
        logger=loggers or False, _convert_="all",
    )
    return {
        "precision": precision, "model": bundle.model, "tokenizer": bundle.tokenizer, "datamodule": datamodule,
        "module": module, "callbacks": callbacks, "loggers": loggers, "trainer": trainer,
    }


def check_objective(module: Any, datamodule: Any) -> None:
    """Refuse, before the trainer starts, a metric objective on a datamodule of plain text.

    A prompted task's datamodule hands a metric objective the batches the metric is computed on (its ``objective``
    follows ``module.objective``); plain text (``kind`` ``lm``: ``task=textfile``, ``task=synthetic``) has no
    candidates to pick from and no answers to decode.

    Raises:
        ValueError: the module's ``objective`` is not ``loss`` and the datamodule's ``kind`` is ``lm``; names the fix.
    """
    objective = getattr(module, "objective", "loss")
    if objective != "loss" and getattr(datamodule, "kind", None) == "lm":
        raise ValueError(
            f"module.objective={objective!r} is a metric, but {type(datamodule).__name__} trains on plain text (LM"
            " loss on every token), which has no candidates to pick from and no answers to decode. Use"
            " `module.objective=loss`, or a prompted task: accuracy fits classification, multiple-choice and"
            " masked-LM tasks (task=sst2, task=copa, task=sst2_mlm), f1 generation tasks (task=squad, task=drop)."
        )


def read_metric_series(metrics_csv: str | Path, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` rows of one metric in a CSVLogger ``metrics.csv`` (empty if absent)."""
    path = Path(metrics_csv)
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [(int(r["step"]), float(r[key])) for r in csv.DictReader(f) if r.get(key) not in (None, "")]


def loss_curve(loggers: list[Any], key: str = "train/loss", window: int = 5) -> dict[str, float]:
    """Mean of the first and of the last ``window`` logged values of ``key`` (from the CSV logger).

    Returns:
        ``{"train/loss_start": ..., "train/loss_end": ...}``, or ``{}`` without a CSV logger or values.
    """
    for logger in loggers:
        if isinstance(logger, L.loggers.CSVLogger):
            series = [v for _, v in read_metric_series(Path(logger.log_dir) / "metrics.csv", key)]
            series = [v for v in series if math.isfinite(v)]
            if series:
                n = min(window, len(series))
                return {f"{key}_start": sum(series[:n]) / n, f"{key}_end": sum(series[-n:]) / n}
    return {}


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit (and optionally test) the configured module.

    Args:
        cfg: a composed ``train`` config (``@hydra.main`` or :func:`zo2_lightning.config.compose`).

    Returns:
        ``(metrics, objects)``: the final logged metrics as floats (plus ``train/loss_start`` and
        ``train/loss_end`` when a CSV logger ran, and ``test/...`` when ``cfg.test``), and the objects built.
    """
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    objects = build(cfg)
    trainer: L.Trainer = objects["trainer"]
    weights_only = weights_only_of(cfg)
    with weights_only_hint():
        trainer.fit(objects["module"], datamodule=objects["datamodule"], ckpt_path=cfg.get("ckpt_path"),
                    weights_only=weights_only)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics.update(loss_curve(objects["loggers"]))
    if cfg.get("test"):
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
        with weights_only_hint():
            trainer.test(objects["module"], datamodule=objects["datamodule"], ckpt_path=best,
                         weights_only=weights_only)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
    perf = next((c for c in objects["callbacks"] if hasattr(c, "summary")), None)
    if perf is not None:
        metrics.update({f"perf/run_{k}": v for k, v in perf.summary.items()})
    return metrics, objects


def weights_only_of(cfg: DictConfig) -> bool:
    """Whether checkpoints load weights-only (``weights_only``, default true; false only for files you trust)."""
    return bool(cfg.get("weights_only", True))


@contextlib.contextmanager
def weights_only_hint() -> Iterator[None]:
    """Add the command-line opt-in to a refusal of a checkpoint that needs pickled code."""
    try:
        yield
    except UnsafeCheckpointError as err:
        raise UnsafeCheckpointError(f"{err} From the command line: `weights_only=false`.") from err


def report(metrics: dict[str, float], output_dir: str) -> str:
    """The lines printed at the end of a run: final metrics and where the logs are."""
    lines = [f"  {k:<32} {v:.6g}" for k, v in sorted(metrics.items())]
    return "\n".join(["Final metrics:", *lines, f"Logs and checkpoints: {output_dir}"])


def print_report(metrics: dict[str, float], trainer: L.Trainer, output_dir: str) -> None:
    """Print :func:`report` once, on global rank 0, through logging when Hydra set it up (console and the run's
    log file), else to stdout."""
    if not trainer.is_global_zero:
        return
    text = report(metrics, output_dir)
    if logging.getLogger().handlers:
        log.info(text)
    else:
        print(text)


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point: run :func:`train` and print its metrics; returns ``cfg.optimized_metric`` if set."""
    log_to_hydra()
    metrics, objects = train(cfg)
    print_report(metrics, objects["trainer"], cfg.paths.output_dir)
    return metrics.get(cfg.get("optimized_metric")) if cfg.get("optimized_metric") else None


if __name__ == "__main__":
    main()
