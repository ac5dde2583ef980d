"""Scores and losses from a model's logits, one function per way a batch is scored (see :mod:`.collate`).

``scores = choice_scores(logits, batch)  # (B, C)``; ``pred = scores.argmax(-1)``

* Choice: a candidate's score is the mean log-probability of its tokens given what precedes them (MeZO's
  default, length-normalised). For single-token label words this ranks exactly as the label-word logits at
  the last prompt position do, and cross-entropy over the scores is cross-entropy over those logits
  restricted to the label words (MeZO's ``train_as_classification``).
* Masked: the raw logits of the label words at the mask position (LM-BFF / MeZO's RoBERTa runs).
* LM: mean token cross-entropy over positions whose label is not ``-100``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from zo2_lightning.tasks.collate import IGNORE


def option_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, option_mask: torch.Tensor) -> torch.Tensor:
    """Mean log-probability of the tokens marked in ``option_mask``, per row.

    Args:
        logits: ``(N, T, V)`` next-token logits.
        input_ids: ``(N, T)`` tokens.
        option_mask: ``(N, T)`` 1 on the tokens to score (never position 0, which has no context).

    Returns:
        ``(N,)`` float32 scores.
    """
    return scored_logprobs(lambda rows, cols: logits[rows, cols], input_ids, option_mask)


def scored_logprobs(logits_at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], input_ids: torch.Tensor,
                    option_mask: torch.Tensor) -> torch.Tensor:
    """:func:`option_logprobs`, given ``logits_at(rows, cols)``: the ``(P, V)`` logits at the scored positions
    only (token t is predicted by the logits at t - 1)."""
    target = option_mask[:, 1:].bool()
    rows, cols = target.nonzero(as_tuple=True)
    logp = logits_at(rows, cols).float().log_softmax(-1)  # (P, V): only the scored positions
    token_logp = logp.gather(-1, input_ids[rows, cols + 1, None]).squeeze(-1)
    total = torch.zeros(option_mask.shape[0], device=token_logp.device).index_add_(0, rows, token_logp)
    return total / target.sum(-1).clamp_min(1)


def choice_scores(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """``(B, C)`` candidate scores of a ``choice`` batch; missing candidates score ``-inf``."""
    return choice_table(option_logprobs(logits, batch["input_ids"], batch["option_mask"]), batch)


def choice_table(per_row: torch.Tensor, batch: dict) -> torch.Tensor:
    """Per-row candidate scores (one row per prompt and candidate) laid out ``(B, C)``; missing ones ``-inf``."""
    b, c = batch["gold"].shape[0], int(batch["num_candidates"].max())
    table = torch.full((b, c), float("-inf"), device=per_row.device)
    table[batch["owner"], batch["slot"]] = per_row
    return table


def masked_scores(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """``(B, C)`` label-word logits at the mask position of a ``masked`` batch."""
    at_mask = logits[torch.arange(logits.shape[0], device=logits.device), batch["mask_pos"]]  # (B, V)
    return at_mask.float().gather(-1, batch["label_ids"])


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose label is not ``-100``."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE
    )


def classification_loss(scores: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the gold candidate over the candidate scores."""
    return F.cross_entropy(scores, gold)


def first_line(text: str) -> str:
    """A generated answer up to its first newline (MeZO decodes with ``\\n`` as end of answer)."""
    return text.split("\n", 1)[0].strip()
