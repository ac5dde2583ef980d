"""What the engine will hold on the working device, computed from shapes alone (a model on the meta device will do).

``parts = engine_device_bytes(model, blocks, options, q=1)`` -> ``{"slots": ..., "scratch/P": ..., ...}`` with the
keys of :meth:`ZOEngine.device_bytes`, plus ``"resident/frozen"`` (the parameters outside the blocks that are not
trained, and the module buffers, which the engine moves to the device as they are). Nothing is allocated, so a
175B model on ``torch.device("meta")`` is planned in milliseconds; ``tests/engine/test_memory.py`` holds the
prediction to what the simulated device counts on a small model, so the two cannot drift apart.

The forwards' own temporaries (activations, attention, the loss) are not here: they depend on the model's code
and the batch, and are measured (``benchmarks/memory_model.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from zo2_lightning.engine.blocks import split_blocks
from zo2_lightning.engine.options import EngineOptions


def engine_device_bytes(model: nn.Module, blocks: Sequence[nn.Module], options: EngineOptions, q: int = 1,
                        one_sided: bool = False, trainable: Iterable[nn.Parameter] | None = None,
                        device: torch.device | None = None) -> dict[str, int]:
    """The engine's device memory for one training step, by component, in bytes.

    Args:
        model: the root module (may live on the meta device).
        blocks: its blocks, as the engine would get them.
        options: the engine's options.
        q: directions per step.
        one_sided: the forward-difference estimate (q + 1 runs, q perturbed copies of the resident parameters).
        trainable: the parameters the optimizer trains (default: every one with ``requires_grad``).
        device: the working device (default CUDA: blocks are copied to it whenever they are offloaded).

    Returns:
        Bytes per component: ``slots``, ``resident_blocks``, ``resident/params`` (the trained parameters outside the
        blocks), ``resident/frozen``, ``resident/copies``, ``resident/z``, ``scratch/z``, ``scratch/z1``, ...,
        ``scratch/P``, ``kept_directions``.
    """
    device = torch.device("cuda") if device is None else device
    blocks = split_blocks(list(blocks)) if options.split_blocks else list(blocks)
    chosen = list(trainable) if trainable is not None else [p for p in model.parameters() if p.requires_grad]
    train = {id(p) for p in chosen if p.requires_grad}
    block_segments, in_blocks = [], set()
    for block in blocks:
        segs: dict[torch.dtype, list[int]] = {}  # dtype -> [numel, trainable numel]
        for p in _unique(block.parameters()):
            in_blocks.add(id(p))
            seg = segs.setdefault(p.dtype, [0, 0])
            seg[0] += p.numel()
            seg[1] += p.numel() if id(p) in train else 0
        block_segments.append(segs)
    rest = [p for p in _unique(model.parameters()) if id(p) not in in_blocks]
    resident = sum(_nbytes(p) for p in rest if id(p) in train)
    frozen = sum(_nbytes(p) for p in rest if id(p) not in train) + sum(_nbytes(b) for b in _unique(model.buffers()))

    storage = options.storage_dtype
    narrows = storage is not None and any(dt != storage for segs in block_segments for dt in segs)
    copies = (options.offload and device.type != "cpu") or options.force_copies or narrows \
        or options.offload_device == "disk" or options.simulated_device is not None
    largest = _largest(block_segments, index=0)  # a slot holds any block's every tensor
    resident_count = 0 if options.resident_blocks == "auto" else min(options.resident_blocks, len(blocks))
    parts = {
        "slots": options.slot_count * largest if copies and blocks else 0,
        "resident_blocks": sum(_bytes(segs, 0) for segs in block_segments[:resident_count]) if copies else 0,
        "resident/params": resident,
        "resident/frozen": frozen,
    }
    perturbed = q if one_sided else 2 * q
    regenerate, keep = options.regenerate_directions, options.keep_directions
    parts["resident/copies"] = 0 if regenerate or not resident else perturbed * resident
    parts["resident/z"] = resident if (regenerate or keep) and resident else 0
    scratch = _largest(block_segments, index=1)  # a scratch buffer holds any block's trainable tensors
    if scratch:
        names = ["P"] if regenerate else ["z", *[f"z{d}" for d in range(1, q)], "P"]
        parts.update({f"scratch/{name}": scratch for name in names})
    # kept z: every block's, per direction, from its perturbation until its update at the next arrival
    parts["kept_directions"] = q * sum(_bytes(segs, 1) for segs in block_segments) if keep else 0
    return parts


def _largest(block_segments: list[dict[torch.dtype, list[int]]], index: int) -> int:
    """Bytes of a buffer per dtype sized for the largest block's (trainable) elements of that dtype."""
    most: dict[torch.dtype, int] = {}
    for segs in block_segments:
        for dt, counts in segs.items():
            most[dt] = max(most.get(dt, 0), counts[index])
    return sum(n * dt.itemsize for dt, n in most.items())


def _bytes(segs: dict[torch.dtype, list[int]], index: int) -> int:
    return sum(counts[index] * dt.itemsize for dt, counts in segs.items())


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _unique(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out
