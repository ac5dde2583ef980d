"""Evaluate: ``python -m zo2_lightning.eval model=opt-13b task=sst2 [ckpt_path=PATH] [split=test|val]``.

``metrics, objects = evaluate(compose("eval", overrides, output_dir))`` runs the same thing from Python.

Without ``ckpt_path`` the model is evaluated as the ``model/`` config builds it (a pretrained hub model or
local directory: MeZO's zero-shot row); with one, the weights of a ``zo2_lightning.train`` checkpoint are
loaded into that model first (its ``state_dict`` only: the training run's callbacks and loops are not
restored). Compose the same ``model``/``task``/``tuning`` as the training run. Checkpoints load weights-only;
``weights_only=false`` opts in to full unpickling for a file you trust.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as L
from omegaconf import DictConfig

from zo2_lightning.strategy.checkpoint_io import AtomicCheckpointIO
from zo2_lightning.config import CONF_DIR
from zo2_lightning.strategy.refusals import check_same_model
from zo2_lightning.run_output import log_to_hydra
from zo2_lightning.train import build, print_report, weights_only_hint, weights_only_of


def load_weights(module: L.LightningModule, ckpt_path: str | Path, weights_only: bool = True) -> None:
    """Load the weights of a Lightning checkpoint into ``module`` (nothing else of the checkpoint is used).

    Args:
        module: the LightningModule, built as the training run built it.
        ckpt_path: a checkpoint written by ``zo2_lightning.train`` (or any Lightning checkpoint of that module).
        weights_only: load without executing pickled code; ``False`` only for files you trust.

    Raises:
        UnsafeCheckpointError: the file needs pickled code and ``weights_only`` is true.
        CorruptCheckpointError: the file is truncated or not a checkpoint.
        ValueError: the checkpoint holds another model's parameters (named, before anything is copied).
    """
    checkpoint = AtomicCheckpointIO().load_checkpoint(ckpt_path, weights_only=weights_only)
    check_same_model(checkpoint, module, ckpt_path)
    module.load_state_dict(checkpoint["state_dict"], strict=module.strict_loading)


def evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Run the validation or test loop of the configured task.

    Args:
        cfg: a composed ``eval`` config.

    Returns:
        ``(metrics, objects)``: the logged ``val/...`` or ``test/...`` metrics as floats, and the objects built.

    Raises:
        ValueError: for a ``split`` other than ``test`` or ``val``.
    """
    if cfg.split not in ("test", "val"):
        raise ValueError(f"split={cfg.split!r}: use split=test or split=val.")
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    objects = build(cfg)
    if cfg.get("ckpt_path"):
        with weights_only_hint():
            load_weights(objects["module"], cfg.ckpt_path, weights_only_of(cfg))
    trainer: L.Trainer = objects["trainer"]
    run = trainer.test if cfg.split == "test" else trainer.validate
    results = run(objects["module"], datamodule=objects["datamodule"])
    metrics = {k: float(v) for r in results for k, v in r.items()}
    return metrics, objects


@hydra.main(config_path=CONF_DIR, config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: run :func:`evaluate` and print its metrics."""
    log_to_hydra()
    metrics, objects = evaluate(cfg)
    print_report(metrics, objects["trainer"], cfg.paths.output_dir)


if __name__ == "__main__":
    main()
