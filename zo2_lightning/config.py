"""Finding, composing and instantiating the Hydra configs in ``conf/``: shared by the entry points.

``cfg = compose("train", ["model=tiny", "trainer=debug"], output_dir="out")`` composes a run programmatically
(tests, ``experiments/``); ``python -m zo2_lightning.train`` composes through ``@hydra.main`` with
:data:`CONF_DIR`.

``conf/`` sits at the repository root, next to the package (an editable install or a clone); the
``ZO2_CONF_DIR`` environment variable points elsewhere (a copy shipped with a cluster job, say).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict


def conf_dir_path() -> Path:
    """Where the config directory should be: ``$ZO2_CONF_DIR``, else ``conf/`` beside the package directory."""
    env = os.environ.get("ZO2_CONF_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "conf"


def find_conf_dir() -> Path:
    """The config directory (see :func:`conf_dir_path`).

    Raises:
        FileNotFoundError: when it holds no ``train.yaml``; the message names the fix.
    """
    path = conf_dir_path()
    if not (path / "train.yaml").is_file():
        raise FileNotFoundError(
            f"No Hydra configs at {path}: run from a clone installed with `pip install -e .`, or set"
            " ZO2_CONF_DIR to a copy of the repository's conf/ folder."
        )
    return path


CONF_DIR = str(conf_dir_path())  # for @hydra.main, which needs the path when the module is imported


def compose(config_name: str = "train", overrides: Sequence[str] = (), output_dir: str | Path | None = None) -> DictConfig:
    """Compose a config as ``python -m zo2_lightning.<config_name> overrides...`` would, outside ``@hydra.main``.

    Args:
        config_name: ``train`` or ``eval``.
        overrides: Hydra overrides (``model=opt-13b``, ``optimizer.lr=1e-7``).
        output_dir: the run directory (what Hydra would create); required to resolve ``paths.output_dir``.

    Returns:
        The composed config, without the ``hydra`` node.
    """
    with initialize_config_dir(str(find_conf_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name, overrides=list(overrides))
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg


def instantiate_each(node: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a dict node (``callbacks``, ``logger``); skip the rest, and the
    entries whose factory returns ``None`` (a callback turned off by a setting)."""
    if not node:
        return []
    built = [instantiate(v, _convert_="all") for v in node.values() if isinstance(v, DictConfig) and "_target_" in v]
    return [obj for obj in built if obj is not None]


def accepts(node: DictConfig, name: str) -> bool:
    """Whether the callable a node's ``_target_`` names takes a keyword argument ``name``."""
    return name in inspect.signature(get_object(node._target_)).parameters


def to_plain(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain containers (for logging it as hyperparameters)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


# Trainer fields Lightning compares numerically; a string there fails deep inside Lightning with "'<' not supported".
_NUMERIC_TRAINER_FIELDS = (
    "max_steps", "min_steps", "max_epochs", "min_epochs", "accumulate_grad_batches", "log_every_n_steps",
    "num_sanity_val_steps", "check_val_every_n_epoch", "gradient_clip_val", "val_check_interval",
    "limit_train_batches", "limit_val_batches", "limit_test_batches", "num_nodes",
)


def check_types(cfg: DictConfig) -> None:
    """Refuse, with the override to fix, numeric run settings that arrived as text (``trainer.max_steps=abc``).

    Raises:
        ValueError: naming the key, the value and an example of the right form.
    """
    trainer = cfg.get("trainer") or {}
    for key in _NUMERIC_TRAINER_FIELDS:
        value = trainer.get(key) if key in trainer else None
        if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
            continue
        raise ValueError(f"trainer.{key} must be a number, got {value!r}: e.g. `trainer.{key}=100`")
    seed = cfg.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an integer, got {seed!r}: e.g. `seed=42`")
