"""Finding the blocks: the repeated layer stacks that are streamed one at a time.

``blocks = discover_blocks(hf_model)``; ``units = split_blocks(blocks)`` (``EngineOptions(split_blocks=True)``)

A block stack is an ``nn.ModuleList`` (or ``nn.Sequential``) of at least two children that each own
parameters, and that does not sit inside another stack: ``model.decoder.layers`` in OPT, ``transformer.h``
in GPT-2, ``encoder.layer`` in BERT, ``encoder.block`` then ``decoder.block`` in T5. Nested lists (T5's
per-block ``layer`` list, MoE ``experts``) belong to their block. No model family is named here: a new
architecture with a standard layer stack needs nothing; a custom one names its blocks through
``ZOModule.zo_blocks``.
"""

from __future__ import annotations

from torch import nn


class NoBlocksError(ValueError):
    """Raised when a model has no discoverable repeated layer stack."""


def _owns_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def discover_blocks(model: nn.Module) -> list[nn.Module]:
    """Return the blocks of ``model`` in forward order of their stacks (module registration order).

    Args:
        model: any ``nn.Module``, typically a Hugging Face ``PreTrainedModel`` or a LightningModule holding one.

    Returns:
        The children of every outermost repeated layer stack, concatenated (encoder before decoder where the
        model registers them in that order).

    Raises:
        NoBlocksError: if no stack is found; the message names the fix.
    """
    stacks: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < 2:
            continue
        if not all(_owns_parameters(child) for child in module):
            continue
        if any(name.startswith(outer + ".") for outer, _ in stacks):
            continue  # nested inside a block of an outer stack
        stacks.append((name, module))
    blocks = [child for _, stack in stacks for child in stack]
    if not blocks:
        raise NoBlocksError(
            f"No repeated layer stack found in {type(model).__name__}: zo2_offload streams a model one block at a"
            " time and needs to know its blocks. Override `zo_blocks()` in your ZOModule to return them, e.g."
            " `def zo_blocks(self): return list(self.model.layers)`; or keep the whole model on the device"
            " (strategy='zo2_resident', i.e. offload_device=None), which needs no blocks."
        )
    return blocks


def split_blocks(blocks: list[nn.Module], min_share: float = 0.01) -> list[nn.Module]:
    """Each block's parts, streamed one at a time: its children that own parameters (looking through a nested
    ``ModuleList``/``Sequential``), in registration order, which is the order a decoder layer calls them (OPT:
    attention, fc1, fc2; Llama: attention, MLP). A part with under ``min_share`` of its block's parameters (a layer
    norm) is left out, so it stays resident with the embeddings, and a block with a single part stays whole.

    A device slot then holds the largest part instead of the largest block (OPT: a third of a layer), and so does
    each block-sized scratch buffer, while every byte still crosses the bus once each way per step.
    """
    units: list[nn.Module] = []
    for block in blocks:
        parts = list(_parts(block))
        total = sum(p.numel() for p in block.parameters())
        kept = [m for m in parts if sum(p.numel() for p in m.parameters()) >= min_share * total]
        units += kept if len(kept) > 1 else [block]
    return units


def _parts(module: nn.Module):
    for child in module.children():
        if isinstance(child, (nn.ModuleList, nn.Sequential)):
            yield from _parts(child)
        elif _owns_parameters(child):
            yield child
