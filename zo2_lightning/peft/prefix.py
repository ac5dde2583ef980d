"""Prefix-tuning without touching attention code: a forward pre-hook per attention module.

``attach_prefix(attn, keys, values)`` makes ``attn`` attend to ``num_tokens`` trainable key/value vectors in
front of the real tokens; ``record_keys_values(model, attns, input_ids)`` runs the model once and returns
each attention module's keys and values (to initialise prefixes from real activations, as MeZO does).

How: a Hugging Face decoder attention (OPT, Llama and its relatives in transformers 5) computes its keys
and values, then calls ``cache.update(keys, values, layer_idx, ...)`` and attends to whatever that
returns, with the ``attention_mask`` it was given. The pre-hook swaps the ``cache`` argument for a
:class:`PrefixedCache` that lets the real cache (if any) store the real tokens, then puts the prefix in
front of what it returns; and it widens the mask by ``num_tokens`` always-visible columns. Positions,
the real cache and generation are untouched: the prefix is invisible outside the attention.

The prefix lives on the attention module as ``prefix_keys`` / ``prefix_values``, shape
``(kv_heads, num_tokens, head_dim)``, so it sits in the block and streams with it. The hook is a plain
function reading them from the module at call time, so ``copy.deepcopy`` and
``torch.func.functional_call`` see the copy's or the substituted tensors. Plain torch; no Lightning.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")  # the name moved across transformers versions
MASK_FORMATS = {"sdpa": "bool", "eager": "additive"}  # attention implementations whose masks we can widen


def cache_kwarg(attn: nn.Module) -> str | None:
    """The name under which ``attn.forward`` takes its KV cache, or ``None`` if it takes none."""
    params = inspect.signature(attn.forward).parameters
    if "attention_mask" not in params:
        return None
    return next((name for name in CACHE_KWARGS if name in params), None)


class PrefixedCache:
    """What a prefixed attention sees as its cache for one call.

    ``update`` lets the model's own cache (``inner``, possibly ``None``) store and return the real keys and
    values, then prepends the prefix, broadcast over the batch. Anything else is the inner cache's.
    """

    def __init__(self, inner: Any, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.inner, self.keys, self.values = inner, keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if self.inner is not None:
            key_states, value_states = self.inner.update(key_states, value_states, *args, **kwargs)
        batch = key_states.shape[0]
        keys = self.keys.to(key_states.dtype).expand(batch, -1, -1, -1)  # (B, kv_heads, P, head_dim)
        values = self.values.to(value_states.dtype).expand(batch, -1, -1, -1)
        return torch.cat([keys, key_states], dim=2), torch.cat([values, value_states], dim=2)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def widen_mask(
    mask: torch.Tensor | None, num_tokens: int, *, query_len: int, past_len: int, fmt: str, dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """The attention mask with ``num_tokens`` visible columns in front (the prefix).

    ``None`` means "causal, no padding" (the model lets SDPA's ``is_causal`` do it); with a prefix the key
    axis is longer than the query axis, so the causal mask is spelled out, with the query at row i sitting
    at position ``past_len + i``.

    Args:
        mask: ``(B or 1, 1, q, kv)``, bool (True: attend) or additive float (0: attend), or ``None``.
        num_tokens: prefix length.
        query_len, past_len: for a ``None`` mask: new tokens, and tokens already in the cache.
        fmt: ``"bool"`` or ``"additive"``: the form to build a ``None`` mask in.
        dtype, device: of an additive mask built from ``None``.

    Returns:
        ``(B or 1, 1, q, num_tokens + kv)`` in the mask's own form.
    """
    if mask is None:
        rows = torch.arange(query_len, device=device)[:, None] + past_len
        visible = rows >= torch.arange(past_len + query_len, device=device)[None, :]  # (q, kv)
        mask = visible if fmt == "bool" else torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill(
            ~visible, torch.finfo(dtype).min)
        mask = mask[None, None]
    front = mask.new_ones if mask.dtype == torch.bool else mask.new_zeros
    return torch.cat([front((*mask.shape[:-1], num_tokens)), mask], dim=-1)


def _prefix_pre_hook(attn: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    name, impl = attn.prefix_cache_kwarg, attn.config._attn_implementation
    if "attention_mask" not in kwargs or impl not in MASK_FORMATS:
        raise RuntimeError(
            f"{type(attn).__name__} was called with attn_implementation={impl!r} or without attention_mask as a"
            f" keyword: the prefix cannot be added. Use attn_implementation in {sorted(MASK_FORMATS)} and a family"
            " listed in zo2_lightning.peft.tuning.PREFIX_FAMILIES."
        )
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # (B, q, hidden)
    inner = kwargs.get(name)
    keys = attn.prefix_keys
    past = inner.get_seq_length(attn.layer_idx) if inner is not None and kwargs["attention_mask"] is None else 0
    kwargs["attention_mask"] = widen_mask(
        kwargs["attention_mask"], keys.shape[1], query_len=hidden.shape[1], past_len=past, fmt=MASK_FORMATS[impl],
        dtype=hidden.dtype, device=hidden.device,
    )
    kwargs[name] = PrefixedCache(inner, keys, attn.prefix_values)
    return args, kwargs


def attach_prefix(attn: nn.Module, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Give ``attn`` trainable prefix keys and values, ``(kv_heads, num_tokens, head_dim)`` each.

    Raises:
        ValueError: if ``attn`` takes no cache and mask, already has a prefix, or runs an attention
            implementation whose mask cannot be widened (flash / flex attention).
    """
    name = cache_kwarg(attn)
    if name is None or not hasattr(attn, "layer_idx"):
        raise ValueError(f"{type(attn).__name__} takes no KV cache and attention mask: it cannot carry a prefix.")
    if hasattr(attn, "prefix_keys"):
        raise ValueError(f"{type(attn).__name__} (layer {attn.layer_idx}) already has a prefix.")
    impl = attn.config._attn_implementation
    if impl not in MASK_FORMATS:
        raise ValueError(f"Prefix-tuning needs attn_implementation in {sorted(MASK_FORMATS)}, not {impl!r}: load the"
                         " model with `attn_implementation=\"sdpa\"`.")
    attn.prefix_keys = nn.Parameter(keys.detach().clone())
    attn.prefix_values = nn.Parameter(values.detach().clone())
    attn.prefix_cache_kwarg = name
    attn.register_forward_pre_hook(_prefix_pre_hook, with_kwargs=True)


class _Recorder:
    """A cache stand-in that keeps what each attention passed to ``update``, then behaves like ``inner``."""

    def __init__(self, inner: Any, sink: list) -> None:
        self.inner, self.sink = inner, sink

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        self.sink.append((key_states.detach().clone(), value_states.detach().clone()))
        if self.inner is not None:
            return self.inner.update(key_states, value_states, *args, **kwargs)
        return key_states, value_states

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@torch.no_grad()
def record_keys_values(
    model: nn.Module, attns: list[nn.Module], input_ids: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run ``model(input_ids=...)`` once and return the keys and values each of ``attns`` computed.

    Returns:
        One ``(keys, values)`` per attention module, each ``(B, kv_heads, T, head_dim)`` (after rotary
        embedding where the family applies it before the cache).
    """
    sinks: list[list] = [[] for _ in attns]

    def make_hook(sink: list):
        def hook(attn: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            name = cache_kwarg(attn)
            kwargs[name] = _Recorder(kwargs.get(name), sink)
            return args, kwargs
        return hook

    handles = [attn.register_forward_pre_hook(make_hook(sink), with_kwargs=True) for attn, sink in zip(attns, sinks)]
    was_training = model.training
    try:
        model.eval()
        model(input_ids=input_ids, use_cache=False)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    if any(len(sink) != 1 for sink in sinks):
        raise RuntimeError("Recording the prefix activations saw an attention module called other than once.")
    return [sink[0] for sink in sinks]
