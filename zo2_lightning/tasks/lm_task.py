"""The LightningModule that fine-tunes a Hugging Face LM on the tasks of :mod:`zo2_lightning.tasks`.

``module = LMTask(model, tokenizer, optimizer=functools.partial(ZOSGD, lr=1e-6, eps=1e-3))``; the
``module/`` config builds it and ``zo2_lightning.train`` hands it to ``Trainer(strategy="zo2_offload")``.

``training_step`` returns an ordinary scalar loss; the ``zo2_offload`` strategy runs it at +eps and -eps.
Validation and test score each batch as its ``kind`` says (see :mod:`zo2_lightning.tasks.collate`) and
log torchmetrics: ``{stage}/acc`` for choice and masked tasks, ``{stage}/f1`` and ``{stage}/em`` (SQuAD
normalisation, in percent) for generation, ``{stage}/loss`` for plain LM batches; ``{stage}/score`` is the
task's headline number in percent (accuracy or F1), which experiments select checkpoints by.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import lightning.pytorch as L
import torch
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.text import SQuAD
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from zo2_lightning.module import ZOModule
from zo2_lightning.tasks.head_loss import HeadParts, chunk_positions, lm_loss_at, option_logprobs_at, split_head
from zo2_lightning.tasks.scoring import (
    choice_scores,
    choice_table,
    classification_loss,
    first_line,
    lm_loss,
    masked_scores,
)

_MODEL_INPUTS = ("input_ids", "attention_mask")


class LMTask(ZOModule, L.LightningModule):
    """A Hugging Face causal or masked LM trained by zeroth order on prompted tasks or plain text.

    Args:
        model: the Hugging Face model.
        tokenizer: its tokenizer (decodes generated answers).
        optimizer: ``params -> Optimizer`` (a ``functools.partial`` of :class:`~zo2_lightning.ZOSGD`).
        scheduler: ``optimizer -> LRScheduler``, stepped every optimizer step; ``None``: constant lr (MeZO).
        max_new_tokens: decoding budget for generation batches.
        head_chunk_mib: LM and choice losses apply the head only at the positions they read, in chunks whose
            logits stay under this many MiB (decoder families of :mod:`.tasks.head_loss`; others, and ``None``,
            take the model's full logits). The loss is the same up to float summation order.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        max_new_tokens: int = 50,
        head_chunk_mib: float | None = 256.0,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.max_new_tokens = max_new_tokens
        if head_chunk_mib is not None and not head_chunk_mib > 0:
            raise ValueError(f"head_chunk_mib must be a positive number of MiB or None (full logits), got"
                             f" {head_chunk_mib!r}")
        self.head_chunk_mib = head_chunk_mib
        # One set per stage: Lightning resets a metric logged as an object at the end of its epoch.
        self.metrics = nn.ModuleDict(
            {stage: nn.ModuleDict({"acc": MeanMetric(), "score": MeanMetric(), "loss": MeanMetric(), "squad": SQuAD()})
             for stage in ("val", "test")}
        )

    # ------------------------------------------------------------------ scoring
    def logits(self, batch: dict) -> torch.Tensor:
        """The model's logits for a batch (only ``input_ids`` and ``attention_mask`` are passed; a decoder is
        told not to build a KV cache, which a scoring forward never reads and which every lockstep run would
        otherwise hold until the step ends)."""
        return _forward(self.model, batch).logits

    def loss(self, batch: dict) -> torch.Tensor:
        """The training loss of a batch: LM loss, or cross-entropy over candidate / label-word scores."""
        if batch["kind"] == "lm":
            return self._lm_loss(batch)
        return classification_loss(self._scores(batch), batch["gold"])

    def _head_parts(self) -> HeadParts | None:
        return None if self.head_chunk_mib is None else split_head(self.model)

    def _hidden(self, parts: HeadParts, batch: dict) -> torch.Tensor:
        return _forward(parts.backbone, batch).last_hidden_state

    def _lm_loss(self, batch: dict) -> torch.Tensor:
        parts = self._head_parts()
        if parts is None:
            return lm_loss(self.logits(batch), batch["labels"])
        vocab = getattr(parts.head, "out_features", None) or self.model.config.vocab_size
        chunk = chunk_positions(vocab, self.head_chunk_mib)
        return lm_loss_at(self._hidden(parts, batch), parts.head, batch["labels"], chunk)

    def _scores(self, batch: dict) -> torch.Tensor:
        """``(B, C)`` candidate scores of a choice or masked batch."""
        parts = self._head_parts() if batch["kind"] == "choice" else None
        if parts is not None:
            per_row = option_logprobs_at(self._hidden(parts, batch), parts.head, batch["input_ids"],
                                         batch["option_mask"])
            return choice_table(per_row, batch)
        logits = self.logits(batch)
        return choice_scores(logits, batch) if batch["kind"] == "choice" else masked_scores(logits, batch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def _eval_step(self, batch: dict, stage: str) -> None:
        metrics = self.metrics[stage]
        size = batch["input_ids"].shape[0]
        if batch["kind"] == "generate":
            self._score_generation(batch, metrics["squad"])
            return
        if batch["kind"] == "lm":
            metrics["loss"].update(self._lm_loss(batch))
            self.log(f"{stage}/loss", metrics["loss"], batch_size=size)
            return
        scores = self._scores(batch)
        correct = (scores.argmax(-1) == batch["gold"]).float()
        metrics["acc"].update(correct)
        metrics["score"].update(correct * 100)
        self.log(f"{stage}/acc", metrics["acc"], prog_bar=True, batch_size=correct.shape[0])
        self.log(f"{stage}/score", metrics["score"], batch_size=correct.shape[0])

    def _score_generation(self, batch: dict, squad: SQuAD) -> None:
        prompt_len = batch["input_ids"].shape[1]
        out = self.model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        texts = self.tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
        preds = [{"prediction_text": first_line(t), "id": str(i)} for i, t in enumerate(texts)]
        target = [{"answers": {"text": list(a), "answer_start": [0] * len(a)}, "id": str(i)}
                  for i, a in enumerate(batch["answers"])]
        squad.update(preds, target)

    def _log_generation(self, stage: str) -> None:
        squad = self.metrics[stage]["squad"]
        if squad.total > 0:
            result = squad.compute()
            self.log(f"{stage}/f1", result["f1"])
            self.log(f"{stage}/em", result["exact_match"])
            self.log(f"{stage}/score", result["f1"])
        squad.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_generation("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_generation("test")

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise ValueError("LMTask needs an optimizer factory, e.g. optimizer=partial(ZOSGD, lr=1e-6).")
        optimizer = self.optimizer_factory(params=[p for p in self.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _forward(model: nn.Module, batch: dict) -> Any:
    """``model`` on the batch's ``input_ids`` and ``attention_mask``, asking for no KV cache where it takes
    ``use_cache`` (see :meth:`LMTask.logits`)."""
    extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    return model(**{k: batch[k] for k in _MODEL_INPUTS}, **extra)
