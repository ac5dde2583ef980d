"""Turning :class:`Example` lists into tensor batches: one collator per way a batch is scored.

``loader = DataLoader(examples, batch_size=16, collate_fn=ChoiceCollator(tokenizer, max_length=2048))``

Every batch is a dict with a ``kind`` entry that tells :class:`~zo2_lightning.tasks.lm_task.LMTask` how to score it:

* ``choice``: every (example, candidate) pair is one row; ``option_mask`` marks the candidate's tokens,
  ``owner``/``slot`` place each row's score in a ``(batch, candidates)`` table, ``gold`` is the answer.
  Candidate tokens are found as MeZO does: tokenise ``prompt + candidate`` and take the last
  ``len(full) - len(prompt)`` tokens, so merges across the boundary match the tokenizer's own.
* ``lm``: causal-LM loss on ``labels`` (``-100`` where no loss is taken): the gold continuation only for
  multiple-choice and generation training (MeZO's ``only_train_option``), every token for plain text.
* ``generate``: left-padded prompts and their ``answers`` for greedy decoding.
* ``masked``: a masked LM's prompt, the position of its mask and the label words' token ids.

Sequences longer than ``max_length`` lose tokens on the left, as in MeZO.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from zo2_lightning.tasks.templates import MASK, Example

IGNORE = -100


def _pad(rows: Sequence[Sequence[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            if left:
                out[i, width - len(r) :] = torch.tensor(r)
            else:
                out[i, : len(r)] = torch.tensor(r)
    return out


def _attention(rows: Sequence[Sequence[int]], left: bool = False) -> torch.Tensor:
    return _pad([[1] * len(r) for r in rows], 0, left=left)


def encode_continuation(
    tokenizer: PreTrainedTokenizerBase, prompt: str, continuation: str, max_length: int
) -> tuple[list[int], int]:
    """Token ids of ``prompt + continuation`` and how many trailing tokens belong to the continuation."""
    full = tokenizer(prompt + continuation).input_ids
    n_option = max(1, len(full) - len(tokenizer(prompt).input_ids))
    full = full[-max_length:]
    return full, min(n_option, len(full) - 1)


class ChoiceCollator:
    """Batches for scoring every candidate of every example (``kind="choice"``)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int = 2048) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, examples: Sequence[Example]) -> dict:
        rows, option_lens, owner, slot = [], [], [], []
        for i, ex in enumerate(examples):
            for j, cand in enumerate(ex.candidates):
                ids, n_option = encode_continuation(self.tokenizer, ex.prompt, cand, self.max_length)
                rows.append(ids)
                option_lens.append(n_option)
                owner.append(i)
                slot.append(j)
        input_ids = _pad(rows, self.tokenizer.pad_token_id)
        option_mask = torch.zeros_like(input_ids)
        for r, (ids, n_option) in enumerate(zip(rows, option_lens)):
            option_mask[r, len(ids) - n_option : len(ids)] = 1
        return {
            "kind": "choice",
            "input_ids": input_ids,
            "attention_mask": _attention(rows),
            "option_mask": option_mask,
            "owner": torch.tensor(owner),
            "slot": torch.tensor(slot),
            "gold": torch.tensor([ex.gold for ex in examples]),
            "num_candidates": torch.tensor([len(ex.candidates) for ex in examples]),
        }


class LMCollator:
    """Batches for causal-LM loss on the gold continuation of each example (``kind="lm"``).

    Args:
        tokenizer: the model's tokenizer.
        max_length: longest sequence, in tokens.
        answer_suffix: appended to generation answers (MeZO's templates end the answer with a newline).
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, max_length: int = 2048, answer_suffix: str = "\n"
    ) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.answer_suffix = answer_suffix

    def target(self, ex: Example) -> str:
        """The continuation trained on: the gold candidate, or ``" " + answer`` for generation."""
        if ex.candidates:
            return ex.candidates[ex.gold]
        return " " + ex.answers[0] + self.answer_suffix

    def __call__(self, examples: Sequence[Example]) -> dict:
        rows, labels = [], []
        for ex in examples:
            ids, n_option = encode_continuation(self.tokenizer, ex.prompt, self.target(ex), self.max_length)
            rows.append(ids)
            labels.append([IGNORE] * (len(ids) - n_option) + ids[len(ids) - n_option :])
        return {
            "kind": "lm",
            "input_ids": _pad(rows, self.tokenizer.pad_token_id),
            "attention_mask": _attention(rows),
            "labels": _pad(labels, IGNORE),
        }


class GenerateCollator:
    """Left-padded prompts for greedy decoding, with the answers they are scored against."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int = 2048) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, examples: Sequence[Example]) -> dict:
        rows = [self.tokenizer(ex.prompt).input_ids[-self.max_length :] for ex in examples]
        return {
            "kind": "generate",
            "input_ids": _pad(rows, self.tokenizer.pad_token_id, left=True),
            "attention_mask": _attention(rows, left=True),
            "answers": [list(ex.answers) for ex in examples],
        }


def label_token_ids(tokenizer: PreTrainedTokenizerBase, words: Sequence[str]) -> list[int]:
    """One token per label word, as LM-BFF picks it: the first token of ``" " + word``.

    Falls back to the first token of the bare word when the spaced forms collide (byte-level tokenizers,
    whose first token of every spaced word is the space).

    Raises:
        ValueError: when two label words still share their first token.
    """
    for prefix in (" ", ""):
        ids = [tokenizer(prefix + w, add_special_tokens=False).input_ids[0] for w in words]
        if len(set(ids)) == len(ids):
            return ids
    raise ValueError(
        f"Label words {list(words)} share a first token under {type(tokenizer).__name__}: a masked-LM task"
        " needs one distinct token per label; use the model's own tokenizer (model.tokenizer=NAME)."
    )


class MaskedCollator:
    """Batches for label-word scoring at a masked LM's ``<mask>`` (``kind="masked"``).

    Args:
        tokenizer: a tokenizer with a mask token.
        label_words: the verbalizer, in label order.
        max_length: longest sequence, in tokens.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, label_words: Sequence[str], max_length: int = 512
    ) -> None:
        if tokenizer.mask_token is None:
            raise ValueError(f"{type(tokenizer).__name__} has no mask token: masked tasks need a masked LM.")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.label_ids = torch.tensor(label_token_ids(tokenizer, label_words))

    def __call__(self, examples: Sequence[Example]) -> dict:
        rows, mask_pos = [], []
        mask_id = self.tokenizer.mask_token_id
        for ex in examples:
            ids = self.tokenizer(ex.prompt.replace(MASK, self.tokenizer.mask_token)).input_ids
            pos = ids.index(mask_id)
            if len(ids) > self.max_length:  # drop from the left, unless that would drop the mask
                start = min(len(ids) - self.max_length, pos)
                ids = ids[start : start + self.max_length]
                pos -= start
            rows.append(ids)
            mask_pos.append(pos)
        return {
            "kind": "masked",
            "input_ids": _pad(rows, self.tokenizer.pad_token_id),
            "attention_mask": _attention(rows),
            "mask_pos": torch.tensor(mask_pos),
            "label_ids": self.label_ids.expand(len(examples), -1).clone(),
            "gold": torch.tensor([ex.gold for ex in examples]),
        }
