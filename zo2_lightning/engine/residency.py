"""How many blocks to keep resident on the working device, from a memory budget.

``n = blocks_that_fit(budget_bytes=16 * 2**30, peak_bytes=measured, block_bytes=unit.nbytes, blocks=len(units))``

The first step runs with every block streamed; its peak device memory (slots, scratch, resident
parameters, activations) is measured, and the room left under the budget is filled with whole blocks, so
a model that fits runs at in-device MeZO speed and one that does not degrades gracefully.
"""

from __future__ import annotations


def blocks_that_fit(budget_bytes: int, peak_bytes: int, block_bytes: int, blocks: int) -> int:
    """Whole blocks that fit in ``budget_bytes - peak_bytes``, between 0 and ``blocks``."""
    if block_bytes <= 0:
        return blocks
    return max(0, min(blocks, (int(budget_bytes) - int(peak_bytes)) // int(block_bytes)))
