"""Splitting a batch into equal micro-batches along its first dimension (the strategy's ``micro_batches``).

``parts = split_batch({"input_ids": ids, "labels": labels}, 4)`` -> 4 dicts of the same keys, each a quarter.

Tensors of the batch's size are split; anything else (scalars, strings, tensors of another leading size such as
a per-batch constant) is handed to every part as it is. Equal parts keep the mean of the parts' mean losses
equal to the whole batch's mean loss, so the split does not change what a step estimates.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def batch_size(batch: Any) -> int:
    """The largest leading size among the batch's tensors (the batch dimension).

    Raises:
        ValueError: the batch holds no tensor with a leading dimension.
    """
    sizes = [t.shape[0] for t in _tensors(batch) if t.dim() > 0]
    if not sizes:
        raise ValueError("micro_batches needs a batch of tensors (a dict, list or tuple of them) to split")
    return max(sizes)


def split_batch(batch: Any, chunks: int) -> list[Any]:
    """``chunks`` equal micro-batches of ``batch`` (views, no copies).

    Raises:
        ValueError: the batch size is not a multiple of ``chunks``.
    """
    if chunks == 1:
        return [batch]
    n = batch_size(batch)
    if n % chunks:
        raise ValueError(
            f"micro_batches={chunks} does not divide the batch size {n}: use a batch size that is a multiple of it"
            " (equal micro-batches keep the step's loss the mean over the batch), or a smaller micro_batches"
        )
    return [_part(batch, n, n // chunks, m) for m in range(chunks)]


def _part(obj: Any, n: int, size: int, m: int) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj[m * size : (m + 1) * size] if obj.dim() > 0 and obj.shape[0] == n else obj
    if isinstance(obj, Mapping):
        parts = {k: _part(v, n, size, m) for k, v in obj.items()}
        return parts if type(obj) is dict else type(obj)(parts)  # e.g. transformers' BatchEncoding
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_part(v, n, size, m) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_part(v, n, size, m) for v in obj)
    return obj


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []
