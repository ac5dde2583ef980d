"""Where the model's tensors were before the engine took them, and the part of the model that stays on the device.

``placement = Placement(model)`` records every parameter's and buffer's device; after the blocks are offloaded,
``rest = placement.place_rest(device, in_blocks, trainable, ops)`` moves everything outside the blocks (embeddings,
final norm, head, every buffer) to the working device; ``placement.restore()`` at detach puts each tensor back on
the device it came from (blocks built on the meta device and materialised on the host stay there).
"""

from __future__ import annotations

import torch
from torch import nn

from zo2_lightning.engine.device import DeviceOps


class Placement:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._devices = {id(t): t.device for t in [*model.parameters(), *model.buffers()]}

    def place_rest(self, device: torch.device, in_blocks: set[int], trainable: set[int],
                   ops: DeviceOps) -> list[nn.Parameter]:
        """Move the parameters outside the blocks and every buffer to ``device``; returns those parameters.

        The device counts the frozen ones and the buffers (``ops.track``); the trainable ones are packed into the
        resident unit's own buffers next.
        """
        rest = [p for p in self.model.parameters() if id(p) not in in_blocks]
        for p in rest:
            p.data = p.data.to(device)
            if id(p) not in trainable:
                ops.track(p.data)
        for module in self.model.modules():
            for name, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[name] = buf.to(device)
                    ops.track(module._buffers[name])
        return rest

    def restore(self) -> None:
        """Every parameter and buffer back on the device it had (its values as they are now)."""
        for p in self.model.parameters():
            dev = self._devices.get(id(p))
            if dev is not None and dev.type != "meta" and p.device != dev:  # materialized blocks stay on host
                p.data = p.data.to(dev)
        for module in self.model.modules():
            for name, buf in module._buffers.items():
                dev = self._devices.get(id(buf)) if buf is not None else None
                if dev is not None and dev.type != "meta" and buf.device != dev:
                    module._buffers[name] = buf.to(dev)
