"""What a run prints, and where: ``quiet_dependency_noise()`` in ``build``, ``log_to_hydra()`` in the entry points.

``zo2_lightning.train`` and ``zo2_lightning.eval`` call :func:`log_to_hydra` once Hydra has set up logging, so
Lightning's messages, the run's size report and the final metrics reach Hydra's handlers: the console and the
run's ``train.log`` / ``eval.log``. Lightning (imported before Hydra configures logging) otherwise keeps its
own stderr handler and never propagates, which left that file empty.

:func:`quiet_dependency_noise` drops two messages of the dependencies that no setting of ours avoids, each
matched exactly: Lightning's advertising tips ("💡 Tip: ... litlogger / litmodels", logged on rank 0 at every
Trainer), and torch 2.13's ``FutureWarning`` about ``LeafSpec``, which Lightning 2.6 triggers in its
``CombinedLoader`` for every dataloader. Everything else Lightning says is left as it is.
"""

from __future__ import annotations

import logging
import re
import warnings

TIP_PREFIX = "💡 Tip:"  # Lightning's advertisements for its cloud products
LEAFSPEC_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
_LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
# rank_zero_info logs through one of these, whichever of the two packages was imported last
_RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropTips(logging.Filter):
    """Drops the log records that are Lightning's tips; passes every other record."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(TIP_PREFIX)


_DROP_TIPS = _DropTips()


def quiet_dependency_noise() -> None:
    """Filter Lightning's tips and the ``LeafSpec`` deprecation warning (and nothing else); idempotent."""
    for name in _RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if _DROP_TIPS not in logger.filters:
            logger.addFilter(_DROP_TIPS)
    warnings.filterwarnings("ignore", message=LEAFSPEC_WARNING, category=FutureWarning,
                            module=re.escape("lightning.pytorch.utilities._pytree"))


def log_to_hydra() -> None:
    """Send Lightning's log records to the root logger's handlers (Hydra's console and log file).

    Lightning adds stderr handlers of its own to ``lightning`` (``INFO: ...``) and to ``lightning.pytorch`` /
    ``lightning.fabric``, whose propagation it stops when imported before the root logger has a handler; this
    undoes that once the root logger has one, so each message appears once, on the console and in the run's
    log file.
    """
    if not logging.getLogger().handlers:
        return  # nothing would receive the records: leave Lightning's own handler
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
            logger.removeHandler(handler)
        logger.propagate = True
