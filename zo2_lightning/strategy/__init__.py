"""The Lightning layer: the ``zo2_offload`` strategy and what it is made of.

``from zo2_lightning.strategy import ZO2OffloadStrategy`` (also ``from zo2_lightning import ZO2OffloadStrategy``).

``zo2_offload.py`` the strategy (placement, lifecycle, processes, flushes, checkpoints); ``step.py`` the ZO step
over Lightning's training step; ``collectives.py`` what the ranks exchange; ``checkpoint.py`` the zo2 entry of a
checkpoint and ``checkpoint_io.py`` how files are written and read; ``refusals.py`` the configurations refused and
their errors; ``batches.py`` splitting a batch into micro-batches.
"""

from zo2_lightning.strategy.zo2_offload import ZO2OffloadStrategy

__all__ = ["ZO2OffloadStrategy"]
