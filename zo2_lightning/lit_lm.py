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
from zo2_lightning.tasks.scoring import (
    choice_scores,
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
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        max_new_tokens: int = 50,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.max_new_tokens = max_new_tokens
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
        extra = {"use_cache": False} if _takes_use_cache(self.model) else {}
        return self.model(**{k: batch[k] for k in _MODEL_INPUTS}, **extra).logits

    def loss(self, batch: dict) -> torch.Tensor:
        """The training loss of a batch: LM loss, or cross-entropy over candidate / label-word scores."""
        logits = self.logits(batch)
        if batch["kind"] == "lm":
            return lm_loss(logits, batch["labels"])
        scores = choice_scores(logits, batch) if batch["kind"] == "choice" else masked_scores(logits, batch)
        return classification_loss(scores, batch["gold"])

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
            metrics["loss"].update(lm_loss(self.logits(batch), batch["labels"]))
            self.log(f"{stage}/loss", metrics["loss"], batch_size=size)
            return
        logits = self.logits(batch)
        scores = choice_scores(logits, batch) if batch["kind"] == "choice" else masked_scores(logits, batch)
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


def _takes_use_cache(model: nn.Module) -> bool:
    return "use_cache" in inspect.signature(model.forward).parameters
