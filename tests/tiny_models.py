"""Tiny random-init Hugging Face models, one per architecture the engine must handle without per-family code.

``model, batch = build("llama")`` gives an fp32 model in eval mode and a batch whose ``loss(model, batch)``
is a scalar. Nothing is downloaded: every model is built from its config.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import transformers as tf

VOCAB = 64
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, intermediate_size=64)
_LLAMA_LIKE = dict(**_COMMON, num_hidden_layers=3, num_key_value_heads=2, max_position_embeddings=64)


def _cfg(name: str) -> tuple[Any, type, str]:
    """(config, model class, kind) where kind is 'causal', 'cls' (sequence classification) or 'seq2seq'."""
    if name == "opt":
        cfg = tf.OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, ffn_dim=64,
                           num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)
        return cfg, tf.OPTForCausalLM, "causal"
    if name == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64)
        return cfg, tf.GPT2LMHeadModel, "causal"
    if name == "gpt_neox":
        cfg = tf.GPTNeoXConfig(**_COMMON, num_hidden_layers=3, max_position_embeddings=64)
        return cfg, tf.GPTNeoXForCausalLM, "causal"
    if name == "llama":
        return tf.LlamaConfig(**_LLAMA_LIKE), tf.LlamaForCausalLM, "causal"
    if name == "mistral":
        return tf.MistralConfig(**_LLAMA_LIKE, sliding_window=8), tf.MistralForCausalLM, "causal"
    if name == "qwen2":
        return tf.Qwen2Config(**_LLAMA_LIKE), tf.Qwen2ForCausalLM, "causal"
    if name == "qwen3":
        return tf.Qwen3Config(**_LLAMA_LIKE, head_dim=8), tf.Qwen3ForCausalLM, "causal"
    if name == "gemma":
        return tf.GemmaConfig(**_LLAMA_LIKE, head_dim=8), tf.GemmaForCausalLM, "causal"
    if name == "phi":  # outside the required list: shows a new family needs no code
        cfg = tf.PhiConfig(**_COMMON, num_hidden_layers=3, max_position_embeddings=64)
        return cfg, tf.PhiForCausalLM, "causal"
    if name == "bert":
        cfg = tf.BertConfig(**_COMMON, num_hidden_layers=3, max_position_embeddings=64, num_labels=3)
        return cfg, tf.BertForSequenceClassification, "cls"
    if name == "roberta":
        cfg = tf.RobertaConfig(**_COMMON, num_hidden_layers=3, max_position_embeddings=70, num_labels=3)
        return cfg, tf.RobertaForSequenceClassification, "cls"
    if name == "t5":
        cfg = tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                          num_heads=4, decoder_start_token_id=0)
        return cfg, tf.T5ForConditionalGeneration, "seq2seq"
    raise KeyError(name)


ARCHITECTURES = ("opt", "gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma", "bert", "roberta",
                 "t5", "phi")


def build(name: str, seed: int = 0, batch_size: int = 2, seq_len: int = 10) -> tuple[torch.nn.Module, dict]:
    """A tiny model (eval mode, fp32) and a batch for it."""
    cfg, cls, kind = _cfg(name)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(3, VOCAB, (batch_size, seq_len), generator=g)
    if kind == "causal":
        batch = {"input_ids": ids, "labels": ids}
    elif kind == "cls":
        batch = {"input_ids": ids, "labels": torch.randint(0, 3, (batch_size,), generator=g)}
    else:
        batch = {"input_ids": ids, "labels": torch.randint(3, VOCAB, (batch_size, 4), generator=g)}
    return model, batch


def loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).loss


def logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).logits


def batches(name: str, n: int, seed: int = 0, batch_size: int = 2) -> list[dict]:
    return [build(name, seed=seed + 100 * i, batch_size=batch_size)[1] for i in range(n)]


LossFn = Callable[[torch.nn.Module, dict], torch.Tensor]
