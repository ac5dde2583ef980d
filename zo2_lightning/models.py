"""Building the Hugging Face model and tokenizer a run trains: from the hub, a local directory, or a shape.

``bundle = build_model("facebook/opt-13b")`` (pretrained weights, hub name or local directory), or
``build_model(arch="opt", init="random", shape={"hidden_size": 64, ...})`` (random init from a config, no
download); the ``model/`` configs call it through Hydra.

Random init from a published shape is what the memory and throughput benchmarks use: it needs neither the
weights nor network access. Under ``with torch.device("meta"):`` it allocates nothing, which the config
tests use to check every published size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

BYTES = "bytes"  # the tokenizer name that selects :func:`byte_tokenizer`
_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<mask>")
BYTE_VOCAB_SIZE = len(_SPECIALS) + 256
_HEADS = {"causal": AutoModelForCausalLM, "masked": AutoModelForMaskedLM}


class ModelBundle(NamedTuple):
    """What a ``model/`` config builds."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


def byte_tokenizer(model_max_length: int = 4096) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges: any text, no files, no download.

    Token ids: 0 ``<pad>``, 1 ``<s>``, 2 ``</s>``, 3 ``<unk>``, 4 ``<mask>``, then the 256 bytes. It prepends
    ``<s>`` as OPT's and Llama's tokenizers do. Tiny random-init models use it; so do the tests.

    Args:
        model_max_length: the longest sequence the tokenizer reports as allowed.

    Returns:
        A ``PreTrainedTokenizerFast`` of :data:`BYTE_VOCAB_SIZE` tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        mask_token="<mask>",
        model_max_length=model_max_length,
    )


def build_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer by hub name or local directory (``"bytes"``: :func:`byte_tokenizer`).

    A tokenizer without a pad token gets its eos token as pad (OPT has one; Llama does not).
    """
    if name_or_path == BYTES:
        return byte_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class HostMemoryError(MemoryError):
    """The model's parameters would not fit in the host memory available now."""


def available_host_bytes() -> int | None:
    """``MemAvailable`` from /proc/meminfo (Linux), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_fits_in_host_memory(auto: Any, config: Any, dtype: torch.dtype) -> int:
    """Estimate the parameters' bytes from ``config`` (built on the meta device, nothing allocated) and refuse
    before allocating if they exceed the available host memory.

    Returns:
        The estimated parameter bytes.

    Raises:
        HostMemoryError: stating both numbers and what to change.
    """
    with torch.device("meta"):
        meta = auto.from_config(config, dtype=dtype)
    need = sum(p.numel() * p.element_size() for p in meta.parameters())
    available = available_host_bytes()
    building_on_host = torch.get_default_device().type == "cpu"  # not inside `with torch.device("meta")`
    if building_on_host and available is not None and need > available:
        gib = 2**30
        raise HostMemoryError(
            f"the model's parameters need {need / gib:.1f} GiB of host memory ({dtype}) but only"
            f" {available / gib:.1f} GiB is available: pick a smaller model or a machine with more memory"
            " (a 16-bit build, precision.model_dtype=bfloat16, halves it)."
        )
    return need


def _vocab_fix(init: str, arch: str | None, tokens: int, vocab: int) -> str:
    """What makes a tokenizer of ``tokens`` fit a model of ``vocab`` words, for the way the model was built."""
    if init == "pretrained":  # the weights fix the vocabulary: shape is not read and overrides would not load
        return (f"pretrained weights fix the vocabulary, so use the model's own tokenizer (`model.tokenizer=null`,"
                f" the one saved beside it) or another with at most {vocab} tokens")
    if arch:  # init=random from arch + shape
        return f"raise the vocabulary of the random model (`model.shape.vocab_size={tokens}`)"
    # init=random from name_or_path's config: shape is not read, overrides are
    return f"raise the vocabulary of the random model (`++model.overrides.vocab_size={tokens}`)"


def build_model(
    name_or_path: str | None = None,
    *,
    arch: str | None = None,
    head: str = "causal",
    init: str = "pretrained",
    shape: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    tokenizer: str | None = None,
    dtype: str | None = None,
) -> ModelBundle:
    """Build the model (and its tokenizer) one ``model/`` config describes.

    Args:
        name_or_path: hub name (``facebook/opt-13b``) or local directory saved by ``save_pretrained``.
        arch: HF ``model_type`` (``opt``, ``llama``, ``qwen2``, ``roberta``) for random init from ``shape``.
        head: ``causal`` (``AutoModelForCausalLM``) or ``masked`` (``AutoModelForMaskedLM``, RoBERTa).
        init: ``pretrained`` loads the weights of ``name_or_path``; ``random`` builds a freshly initialised
            model from ``arch`` + ``shape`` (no download), or from the config of ``name_or_path`` if no
            ``arch`` is given.
        shape: config fields of the published architecture (hidden size, layers, heads, ...); used by
            ``init=random`` only, since pretrained weights carry their own.
        overrides: config fields applied in both modes (dropout, ``max_position_embeddings``, ...).
        tokenizer: hub name, local directory or ``"bytes"``. ``None``: the tokenizer of ``name_or_path``
            for pretrained models, the byte tokenizer for random ones.
        dtype: dtype the weights are created in (``float32``, ``bfloat16``, ``float16``); ``None``: float32.

    Returns:
        The model and its tokenizer.

    Raises:
        ValueError: on an unknown ``head`` or ``init``, when neither ``name_or_path`` nor ``arch`` is given, or
            when the tokenizer has more tokens than the model's vocabulary.
        HostMemoryError: when the parameters would not fit in the available host memory (checked before
            anything is allocated).
    """
    if head not in _HEADS:
        raise ValueError(f"head={head!r}: use one of {sorted(_HEADS)}.")
    if init not in ("pretrained", "random"):
        raise ValueError(f"init={init!r}: use 'pretrained' (load weights) or 'random' (published shape).")
    auto = _HEADS[head]
    torch_dtype = getattr(torch, dtype) if dtype else torch.float32
    overrides = dict(overrides or {})

    if tokenizer is None:
        tokenizer = name_or_path if (init == "pretrained" and name_or_path) else BYTES
    tok = build_tokenizer(tokenizer)

    if init == "pretrained":
        if not name_or_path:
            raise ValueError("init=pretrained needs name_or_path (a hub name or a local directory).")
        check_fits_in_host_memory(auto, AutoConfig.from_pretrained(name_or_path, **overrides), torch_dtype)
        model = auto.from_pretrained(name_or_path, dtype=torch_dtype, **overrides)
    else:
        if tokenizer == BYTES:  # a random model speaks the byte tokenizer: align its special ids
            for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
                overrides.setdefault(key, getattr(tok, key))
        if arch:
            config = AutoConfig.for_model(arch, **{**dict(shape or {}), **overrides})
        elif name_or_path:
            config = AutoConfig.from_pretrained(name_or_path, **overrides)
        else:
            raise ValueError("init=random needs arch (+ shape) or name_or_path to take the config from.")
        check_fits_in_host_memory(auto, config, torch_dtype)
        model = auto.from_config(config, dtype=torch_dtype)

    if len(tok) > model.config.vocab_size:
        raise ValueError(
            f"The tokenizer has {len(tok)} tokens but the model only {model.config.vocab_size}:"
            f" {_vocab_fix(init, arch, len(tok), model.config.vocab_size)}."
        )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return ModelBundle(model, tok)
