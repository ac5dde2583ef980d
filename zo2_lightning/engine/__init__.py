"""The offload engine: plain torch, no Lightning, no Hydra (docs/architecture.md, "Layers").

``from zo2_lightning.engine import ZOEngine, EngineOptions, discover_blocks``
"""

from zo2_lightning.engine.blocks import NoBlocksError, discover_blocks
from zo2_lightning.engine.keys import Perturbation, RunKey
from zo2_lightning.engine.ledger import Commit
from zo2_lightning.engine.lockstep import LockstepDivergenceError
from zo2_lightning.engine.options import EngineOptions
from zo2_lightning.engine.perturb import projected_grad
from zo2_lightning.engine.seeds import RESIDENT_UNIT, derive_seed, direction_seed, draw_direction
from zo2_lightning.engine.zo import ZOEngine

__all__ = [
    "RESIDENT_UNIT",
    "Commit",
    "EngineOptions",
    "LockstepDivergenceError",
    "NoBlocksError",
    "Perturbation",
    "RunKey",
    "ZOEngine",
    "derive_seed",
    "direction_seed",
    "discover_blocks",
    "draw_direction",
    "projected_grad",
]
