"""The offload engine: plain torch, no Lightning, no Hydra (DESIGN.md decision 9).

``from zo2_lightning.engine import ZOEngine, discover_blocks``
"""

from zo2_lightning.engine.blocks import NoBlocksError, discover_blocks
from zo2_lightning.engine.lockstep import Lockstep, LockstepDivergenceError
from zo2_lightning.engine.perturb import perturb_into, projected_grad, sgd_update_
from zo2_lightning.engine.seeds import RESIDENT_UNIT, derive_seed, direction_seed, draw_direction
from zo2_lightning.engine.streaming import BlockStreamer
from zo2_lightning.engine.units import Unit
from zo2_lightning.engine.spsa import Commit, UnitSPSA
from zo2_lightning.engine.zo import ZOEngine

__all__ = [
    "RESIDENT_UNIT",
    "BlockStreamer",
    "Commit",
    "LockstepDivergenceError",
    "Lockstep",
    "NoBlocksError",
    "Unit",
    "UnitSPSA",
    "ZOEngine",
    "derive_seed",
    "direction_seed",
    "discover_blocks",
    "draw_direction",
    "perturb_into",
    "projected_grad",
    "sgd_update_",
]
