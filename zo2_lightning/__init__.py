"""zo2_lightning: zeroth-order fine-tuning of models larger than the GPU, as a PyTorch Lightning strategy.

```python
import lightning.pytorch as L
import zo2_lightning                       # registers "zo2_offload" and "zo2_resident"
trainer = L.Trainer(strategy="zo2_offload", accelerator="gpu", devices=1, precision="bf16-mixed")
```

Importing this package does not import Lightning (so ``zo2_lightning.engine`` stays plain torch); the strategy
names are registered the moment Lightning is loaded, and ``ZO2OffloadStrategy`` is imported on first use.
"""

from typing import Any

from zo2_lightning._registration import register as _register
from zo2_lightning.module import ZOModule
from zo2_lightning.methods import FZOO, LOZO, LOZOM, HiZOO, SparseMeZO
from zo2_lightning.optim import ZOSGD, ZOAdam, ZOOptimizer, ZOSGDCons, ZOSGDMomentum, ZOSGDSign

_register()

__all__ = ["ZO2OffloadStrategy", "ZOModule", "ZOOptimizer", "ZOSGD", "ZOAdam", "ZOSGDCons", "ZOSGDMomentum",
           "ZOSGDSign", "HiZOO", "LOZO", "LOZOM", "SparseMeZO", "FZOO"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "ZO2OffloadStrategy":
        from zo2_lightning.strategy import ZO2OffloadStrategy

        return ZO2OffloadStrategy
    raise AttributeError(f"module 'zo2_lightning' has no attribute {name!r}")
