"""Losses that apply a decoder's LM head only where a label is read, a few hundred positions at a time.

``parts = split_head(model)``; if not None: ``hidden = parts.backbone(input_ids=..., attention_mask=...)``
``.last_hidden_state``, then ``lm_loss_at(hidden, parts.head, labels, chunk)`` or
``option_logprobs_at(hidden, parts.head, input_ids, option_mask)``.

Why: the model's own forward builds logits for every position, and the loss then widens them to fp32 and takes
their log-softmax: about 10 bytes per position per vocabulary entry. At ZO2's setting (OPT, 2048 tokens, vocab
50272) that is 1 GB; at MeZO's batch (16 x 512) 4 GB, and 10 GB with Llama-3's 128256-word vocabulary, more
than a streamed 30B model's blocks. ZO needs only the scalar loss, so the head runs on the labelled positions
alone, in chunks whose logits stay under a byte budget. The loss is the same cross-entropy, summed chunk by
chunk (equal to the full-logits loss up to float summation order; tests/tasks/test_head_loss.py).

Only for families whose logits are exactly ``get_output_embeddings()(base_model(...).last_hidden_state)``
(:data:`PLAIN_HEAD_FAMILIES`, each checked by a test) and whose config scales or caps no logits; anything else
takes the model's own forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zo2_lightning.tasks.collate import IGNORE
from zo2_lightning.tasks.scoring import scored_logprobs

PLAIN_HEAD_FAMILIES = frozenset({"opt", "gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma", "phi"})
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
_BYTES_PER_LOGIT = 10  # the head's output in 16 bit (2), its fp32 copy (4), the log-softmax (4)


@dataclass(frozen=True)
class HeadParts:
    backbone: nn.Module  # returns last_hidden_state
    head: nn.Module  # hidden -> logits


def split_head(model: nn.Module) -> HeadParts | None:
    """The backbone and head of a decoder LM whose logits are ``head(backbone(...).last_hidden_state)``, or None."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_FAMILIES:
        return None
    if any(getattr(config, key, None) not in (None, 1, 1.0) for key in _LOGIT_TRANSFORMS):
        return None
    head = model.get_output_embeddings()
    backbone = getattr(model, "base_model", model)
    if head is None or backbone is model:
        return None
    return HeadParts(backbone, head)


def chunk_positions(vocab_size: int, budget_mib: float) -> int:
    """Positions per chunk that keep one chunk's logits and their fp32 log-softmax under ``budget_mib``."""
    return max(1, int(budget_mib * 2**20) // (_BYTES_PER_LOGIT * vocab_size))


def lm_loss_at(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose label is not ``-100``, as
    :func:`~zo2_lightning.tasks.scoring.lm_loss` of the full logits, with the head applied to those positions
    only, ``chunk`` at a time.

    Args:
        hidden: ``(B, T, H)`` the backbone's last hidden states.
        head: hidden -> logits (the model's output embeddings).
        labels: ``(B, T)`` token ids, ``-100`` where no loss is taken.
        chunk: positions per head call.
    """
    target = labels[:, 1:].flatten()
    keep = target != IGNORE  # position t predicts label t + 1
    states = hidden[:, :-1].flatten(0, 1)[keep]
    target = target[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, target.numel(), chunk):
        logits = head(states[start: start + chunk]).float()
        total = total + F.cross_entropy(logits, target[start: start + chunk], reduction="sum")
    return total / target.numel()  # 0 / 0 = nan when nothing is labelled, as the full-logits mean gives


def option_logprobs_at(hidden: torch.Tensor, head: nn.Module, input_ids: torch.Tensor,
                       option_mask: torch.Tensor) -> torch.Tensor:
    """:func:`~zo2_lightning.tasks.scoring.option_logprobs` with the head applied only where a candidate's token
    is predicted: ``(N,)`` mean log-probability of the tokens marked in ``option_mask``, per row."""
    return scored_logprobs(lambda rows, cols: head(hidden[rows, cols]), input_ids, option_mask)
