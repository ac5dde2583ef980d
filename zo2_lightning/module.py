"""The ``ZOModule`` mixin: what a LightningModule declares to be fine-tuned by ``zo2_offload``.

```python
class MyTask(ZOModule, L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = AutoModelForCausalLM.from_pretrained("facebook/opt-13b")
    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss                        # an ordinary scalar loss
    def configure_optimizers(self):
        return ZOSGD(self.parameters(), lr=1e-7, eps=1e-3)
```
"""

from __future__ import annotations

from torch import nn

from zo2_lightning.engine.blocks import discover_blocks


class ZOModule:
    """Mixin for a LightningModule trained by the ``zo2_offload`` strategy.

    The training step stays ordinary: it returns a scalar loss and the strategy runs it at +eps and -eps in
    lockstep (dropout off, as in MeZO). Metrics logged from ``training_step`` are those of the +eps run.

    Blocks are the modules streamed to the working device one at a time; by default they are discovered as
    the repeated layer stacks of the Hugging Face models inside this module (decoder layers, encoder layers,
    both stacks of an encoder-decoder). Everything that is not inside a block (embeddings, final norm, head,
    tied weights) stays resident on the working device. Parameters with ``requires_grad=False`` are neither
    perturbed nor updated: that is how ZO on a subset (LoRA, prefix, head-only) works.
    """

    def zo_blocks(self) -> list[nn.Module]:
        """The blocks to stream, in forward order. Override for a model without a standard layer stack; return
        ``[]`` to keep every parameter resident (what ``zo2_resident`` does for a model without blocks).

        Raises:
            NoBlocksError: if none can be discovered (the message shows the override to write).
        """
        assert isinstance(self, nn.Module), "ZOModule must be mixed into a LightningModule"
        return discover_blocks(self)
