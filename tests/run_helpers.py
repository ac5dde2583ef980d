"""Shared by the config, entry-point, task and experiment tests: composing runs and stand-in models.

``cfg = compose_run(tmp_path, ["trainer=debug"])``; ``TeacherStub(tokenizer, favoured)`` scores
continuations by construction so tests know the right scores without running a real model; ``StopAtStep`` kills a
run at a chosen step.
"""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from zo2_lightning.config import compose

BOOST = 10.0
VOCAB = 264  # the tiny models' vocabulary (the byte tokenizer has 261 tokens)


def compose_run(tmp_path, overrides=(), config_name="train"):
    """A composed config whose run directory is ``tmp_path / "run"``."""
    return compose(config_name, list(overrides), output_dir=tmp_path / "run")


def suggested_overrides(message: str) -> list[str]:
    """The Hydra overrides an error message suggests, written in backticks (``model.tokenizer=null`` in backticks)."""
    return re.findall(r"`([+~\w.]+=[^`\s]+)`", message)


def favoured_logprob(vocab: int = VOCAB) -> float:
    """Log-probability of a token whose logit is BOOST among ``vocab`` zeros (by hand: 10 - log(e^10 + V - 1))."""
    return BOOST - math.log(math.exp(BOOST) + vocab - 1)


def plain_logprob(vocab: int = VOCAB) -> float:
    """Log-probability of any token when all logits are equal: -log V."""
    return -math.log(vocab)


class TeacherStub(nn.Module):
    """A causal LM stand-in: on rows whose decoded text ends with a favoured string, every next token gets logit
    BOOST (all others 0); on other rows all logits are 0. Scores are then known in closed form."""

    def __init__(self, tokenizer, favoured, vocab: int = VOCAB) -> None:
        super().__init__()
        self.tokenizer, self.favoured, self.vocab = tokenizer, set(favoured), vocab
        self.weight = nn.Parameter(torch.zeros(1))  # something to hand an optimizer

    def forward(self, input_ids, attention_mask=None):
        b, t = input_ids.shape
        logits = torch.zeros(b, t, self.vocab)
        for row in range(b):
            text = self.tokenizer.decode(input_ids[row], skip_special_tokens=True)
            if any(text.endswith(f) for f in self.favoured):
                logits[row, torch.arange(t - 1), input_ids[row, 1:]] = BOOST
        return SimpleNamespace(logits=logits)


class MaskStub(nn.Module):
    """A masked LM stand-in: at the mask of row i the label token ``favoured[i]`` gets logit BOOST, all else 0."""

    def __init__(self, mask_token_id: int, label_ids, favoured, vocab: int) -> None:
        super().__init__()
        self.mask_token_id, self.label_ids, self.favoured, self.vocab = mask_token_id, label_ids, favoured, vocab
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for row, pos in enumerate((input_ids == self.mask_token_id).float().argmax(-1).tolist()):
            logits[row, pos, self.label_ids[self.favoured[row]]] = BOOST
        return SimpleNamespace(logits=logits)


class AnswerStub(nn.Module):
    """A generator stand-in whose ``generate`` appends a fixed text per row (after the prompt)."""

    def __init__(self, tokenizer, texts) -> None:
        super().__init__()
        self.tokenizer, self.texts = tokenizer, texts
        self.weight = nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, attention_mask=None, max_new_tokens=50, **kwargs):
        new = [self.tokenizer(t, add_special_tokens=False).input_ids[:max_new_tokens] for t in self.texts]
        width = max(len(n) for n in new)
        tail = torch.full((len(new), width), self.tokenizer.pad_token_id)
        for i, n in enumerate(new):
            tail[i, : len(n)] = torch.tensor(n)
        return torch.cat([input_ids, tail], dim=1)


def word_tokenizer(words):
    """A whitespace word-level tokenizer over ``words`` with pad/bos/eos/unk/mask specials (masked-LM tests)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", "<mask>", *sorted(set(words))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", mask_token="<mask>")


class Interrupt(RuntimeError):
    """Raised by :class:`StopAtStep`: stands for the process dying."""


class StopAtStep(Callback):
    """A callback that kills the fit when step ``step`` is about to start, after everything before it (the
    checkpoints of step ``step - 1`` included) is on disk: ``+callbacks.stop._target_=tests.run_helpers.StopAtStep
    +callbacks.stop.step=5``. Lightning's ModelCheckpoint saves nothing on an exception, so the run directory is
    what a SIGKILL at that moment would leave."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise Interrupt(f"stopped before step {self.step}")
