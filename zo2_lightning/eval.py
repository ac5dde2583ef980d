"""Evaluate: ``python -m zo2_lightning.eval model=opt-13b task=sst2 [ckpt_path=PATH] [split=test|val]``.

``metrics, objects = evaluate(compose("eval", overrides, output_dir))`` runs the same thing from Python.

Without ``ckpt_path`` the model is evaluated as the ``model/`` config builds it (a pretrained hub model or
local directory: MeZO's zero-shot row); with one, the weights of a ``zo2_lightning.train`` checkpoint are
loaded into that model first. Compose the same ``model``/``task`` as the training run.
"""

from __future__ import annotations

from typing import Any

import hydra
import lightning.pytorch as L
from omegaconf import DictConfig

from zo2_lightning.config import CONF_DIR
from zo2_lightning.train import build, report


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
    trainer: L.Trainer = objects["trainer"]
    run = trainer.test if cfg.split == "test" else trainer.validate
    results = run(objects["module"], datamodule=objects["datamodule"], ckpt_path=cfg.get("ckpt_path"),
                  weights_only=False)
    metrics = {k: float(v) for r in results for k, v in r.items()}
    return metrics, objects


@hydra.main(config_path=CONF_DIR, config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: run :func:`evaluate` and print its metrics."""
    metrics, _ = evaluate(cfg)
    print(report(metrics, cfg.paths.output_dir))


if __name__ == "__main__":
    main()
