"""Which parameters ZO fine-tunes: all, LoRA adapters, prefixes, or the head (``requires_grad`` marks them).

``model = tuning(model, "lora", r=8, alpha=16)``; the ``tuning/`` configs call it through Hydra
(``python -m zo2_lightning.train tuning=lora``) on the model the ``model/`` config built, before the
LightningModule is made.

Each function prepares a Hugging Face model in place and returns it: it adds parameters where the mode
needs them and leaves ``requires_grad=True`` on exactly the ones to train. The ``zo2_offload`` strategy
perturbs and updates only those (frozen ones are streamed and read, never written), and ``LMTask`` hands
only those to the optimizer. LoRA layers and prefixes are placed inside the transformer blocks, so they
stream with their block; the blocks the strategy discovers are the same objects as before.

MeZO (Malladi et al., 2023, arXiv:2305.17333) runs all three PEFT settings with ZO-SGD: LoRA r=8, alpha=16
on the attention's q and v projections; prefix-tuning with 5 tokens initialised from real activations.
Plain torch + transformers; no Lightning, no Hydra.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from zo2_lightning.engine.blocks import discover_blocks
from zo2_lightning.peft.lora import add_lora, merge_lora
from zo2_lightning.peft.prefix import MASK_FORMATS, attach_prefix, cache_kwarg, record_keys_values

__all__ = ["MODES", "PREFIX_FAMILIES", "full", "head_only", "lora", "merge_lora", "prefix", "tuning"]

# Families whose attention the prefix hook is tested on (tests/test_tuning.py); others are refused.
PREFIX_FAMILIES = ("gemma", "llama", "mistral", "opt", "qwen2", "qwen3")


def _train_only(model: nn.Module, trainable: list[nn.Parameter]) -> None:
    keep = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def full(model: nn.Module) -> nn.Module:
    """MeZO's full-parameter setting: the model is returned as built (a Hugging Face model trains all of it)."""
    return model


def _head_modules(model: nn.Module) -> list[nn.Module]:
    """The modules outside ``model.base_model`` (``lm_head``, ``classifier``, ``score``), else the output embeddings."""
    base = getattr(model, "base_model", model)
    if base is not model:
        heads = [m for m in model.children() if m is not base and next(m.parameters(), None) is not None]
        if heads:
            return heads
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is None:
        raise ValueError(f"head_only: {type(model).__name__} has no head outside its base model and no output"
                         " embeddings; freeze by hand (set requires_grad on the parameters to train).")
    return [out]


def head_only(model: nn.Module, untie: bool = True) -> nn.Module:
    """Train only the head: the modules outside the base model (``lm_head``, ``classifier``, ``score``).

    Tied embeddings (OPT, GPT-2, Gemma, tiny Qwen: ``lm_head.weight is embed_tokens.weight``): with
    ``untie=True`` (default) the head gets its own copy of the shared matrix and ``config.tie_word_embeddings``
    is set to False, so only the output projection trains and the input embeddings stay as they were; the
    model's output is unchanged at this point, and ``save_pretrained`` output reloads untied. It costs one
    more vocab x hidden matrix (resident: outside the blocks). With ``untie=False`` the shared matrix itself
    trains, so the input embeddings move with the head (what MeZO's ``--head_tuning`` does without
    ``--untie_emb``: it tunes ``embed_tokens``).

    Args:
        model: a Hugging Face model with a head (``...ForCausalLM``, ``...ForSequenceClassification``, ...).
        untie: give a tied head its own weight.

    Returns:
        ``model``.

    Raises:
        ValueError: if no head can be found.
    """
    heads = _head_modules(model)
    in_heads = {id(m) for head in heads for m in head.modules()}
    elsewhere = {id(p) for m in model.modules() if id(m) not in in_heads for p in m._parameters.values()
                 if p is not None}  # e.g. embed_tokens.weight, which a tied lm_head shares
    untied = False
    if untie:
        for head in heads:
            for module in head.modules():
                for name, p in list(module._parameters.items()):
                    if p is not None and id(p) in elsewhere:
                        module.register_parameter(name, nn.Parameter(p.detach().clone()))
                        untied = True
    if untied and hasattr(model, "config"):
        model.config.tie_word_embeddings = False
    _train_only(model, [p for head in heads for p in head.parameters()])
    return model


# The attention's query and value projections (MeZO-LoRA's targets) as each model family names them.
QUERY_VALUE_NAMES = (("q_proj", "v_proj"), ("query", "value"), ("c_attn",), ("query_key_value",), ("qkv_proj",),
                     ("Wqkv",), ("q", "v"))


def _targets_hint(names: Sequence[str]) -> str:
    """The targets to pass for a block whose linear layers are ``names``: its query and value projections."""
    for pair in QUERY_VALUE_NAMES:
        if set(pair) <= set(names):
            return (f"pass its query and value projections, targets={list(pair)} (Hydra:"
                    f" `tuning.targets=[{','.join(pair)}]`)")
    return "pass the names of its attention's query and value projections as targets (Hydra: tuning.targets=[...])"


def lora(
    model: nn.Module, r: int = 8, alpha: float = 16, targets: Sequence[str] = ("q_proj", "v_proj"), seed: int = 0
) -> nn.Module:
    """MeZO-LoRA: low-rank adapters on the named linear layers of every block; only they train.

    Each matching ``nn.Linear`` / GPT-2 ``Conv1D`` inside a block becomes a
    :class:`~zo2_lightning.peft.lora.LoRALinear` that keeps the original weight (frozen, same state-dict
    name) and adds ``lora_A`` (r x in, Kaiming uniform) and ``lora_B`` (out x r, zero): the model's output is
    unchanged until B moves. ``merge_lora(model)`` folds the adapters back for ``save_pretrained``.

    Args:
        model: a Hugging Face model.
        r: rank (MeZO: 8).
        alpha: scale numerator, update scaled by ``alpha / r`` (MeZO: 16).
        targets: attribute names of the layers to adapt: ``q_proj``/``v_proj`` (OPT, Llama, Qwen, Mistral),
            ``query``/``value`` (BERT, RoBERTa), ``c_attn`` (GPT-2's fused q,k,v), ``query_key_value`` (GPT-NeoX).
        seed: draws the A matrices.

    Returns:
        ``model``.

    Raises:
        ValueError: if no layer inside the blocks matches ``targets`` (the message lists the linear layers found).
    """
    generator = torch.Generator().manual_seed(seed)
    targets = tuple(targets)
    replaced = [name for block in discover_blocks(model) for name in add_lora(block, targets, r, alpha, generator)]
    if not replaced:
        block = discover_blocks(model)[0]
        names = sorted({n.rpartition(".")[2] for n, m in block.named_modules() if isinstance(m, (nn.Linear, Conv1D))})
        raise ValueError(f"lora: no linear layer named {list(targets)} in the blocks of {type(model).__name__};"
                         f" its blocks have {names}: {_targets_hint(names)}.")
    _train_only(model, [p for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))])
    return model


def _attention_of(block: nn.Module) -> nn.Module:
    found = [m for m in list(block.modules())[1:] if cache_kwarg(m) is not None and hasattr(m, "layer_idx")]
    if len(found) != 1:
        raise ValueError(f"prefix: expected one self-attention with a KV cache in {type(block).__name__},"
                         f" found {len(found)}.")
    return found[0]


def prefix(model: nn.Module, num_tokens: int = 5, init: str = "real", seed: int = 0) -> nn.Module:
    """MeZO-prefix: ``num_tokens`` trainable keys and values in front of every layer's attention; only they train.

    Each block's self-attention gets ``prefix_keys`` and ``prefix_values`` (``(kv_heads, num_tokens,
    head_dim)``) and a forward pre-hook that makes it attend to them as if they were cached tokens before
    the input (:mod:`zo2_lightning.peft.prefix`; no attention code is rewritten). Every query sees the
    prefix; positions are unchanged. Outputs change by design, even at initialisation.

    ``init="real"`` (MeZO's ``--prefix_init_by_real_act``): run the model once on ``num_tokens`` random
    token ids and take each layer's actual keys and values. ``init="random"``: standard normal (MeZO
    without that flag). Either way one forward of ``num_tokens`` tokens runs here, on the model's device.

    Args:
        model: a decoder-only Hugging Face model of a family in :data:`PREFIX_FAMILIES`, with ``sdpa`` or
            ``eager`` attention.
        num_tokens: prefix length (MeZO: 5).
        init: ``"real"`` or ``"random"``.
        seed: draws the token ids (``real``) or the values (``random``).

    Returns:
        ``model``.

    Raises:
        ValueError: for another model family, attention implementation or ``init``.
    """
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family not in PREFIX_FAMILIES:
        raise ValueError(f"prefix: model family {family!r} is not supported; supported: {list(PREFIX_FAMILIES)}."
                         " Use tuning=lora or tuning=head_only for other models.")
    impl = model.config._attn_implementation
    if impl not in MASK_FORMATS:
        raise ValueError(f"prefix: attn_implementation={impl!r} is not supported; use one of {sorted(MASK_FORMATS)}"
                         " (load the model with `attn_implementation=\"sdpa\"`).")
    if init not in ("real", "random"):
        raise ValueError(f"prefix: init={init!r}: use 'real' (activations of random tokens, MeZO) or 'random'.")
    if num_tokens < 1:
        raise ValueError(f"prefix: num_tokens={num_tokens}: use at least 1.")
    attns = [_attention_of(block) for block in discover_blocks(model)]
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, num_tokens), generator=generator)
    recorded = record_keys_values(model, attns, ids.to(next(model.parameters()).device))
    for attn, (keys, values) in zip(attns, recorded):
        keys, values = keys[0], values[0]  # (kv_heads, num_tokens, head_dim)
        if init == "random":
            keys = torch.randn(keys.shape, generator=generator).to(keys)
            values = torch.randn(values.shape, generator=generator).to(values)
        attach_prefix(attn, keys, values)
    _train_only(model, [p for attn in attns for p in (attn.prefix_keys, attn.prefix_values)])
    return model


MODES = {"full": full, "lora": lora, "prefix": prefix, "head_only": head_only}


def tuning(model: nn.Module, mode: str = "full", **kwargs: Any) -> nn.Module:
    """Prepare ``model`` for ZO fine-tuning in ``mode``: ``full``, ``lora``, ``prefix`` or ``head_only``.

    Args:
        model: a Hugging Face model.
        mode: which parameters to train.
        **kwargs: the mode's options (``r``, ``alpha``, ``targets`` for LoRA; ``num_tokens``, ``init`` for
            prefix; ``untie`` for head-only).

    Returns:
        ``model``, prepared in place.

    Raises:
        ValueError: for an unknown mode (naming the known ones) or an option the mode does not take.
    """
    if mode not in MODES:
        raise ValueError(f"tuning mode {mode!r} is unknown: use one of {list(MODES)} (e.g. `tuning=lora`).")
    options = list(inspect.signature(MODES[mode]).parameters)[1:]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise ValueError(f"tuning mode {mode!r} takes {options}, not {unknown}.")
    return MODES[mode](model, **kwargs)
