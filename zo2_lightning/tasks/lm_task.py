"""The LightningModule that fine-tunes a Hugging Face LM on the tasks of :mod:`zo2_lightning.tasks`.

``module = LMTask(model, tokenizer, optimizer=functools.partial(ZOSGD, lr=1e-6, eps=1e-3))``; the
``module/`` config builds it and ``zo2_lightning.train`` hands it to ``Trainer(strategy="zo2_offload")``.

``training_step`` returns an ordinary scalar loss; the ``zo2_offload`` strategy runs it at +eps and -eps.
With ``objective="accuracy"`` or ``"f1"`` it returns minus that metric of the batch instead (MeZO's
non-differentiable objectives): SPSA needs only the objective's value, never its gradient.
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
from torchmetrics.functional.text import squad as squad_scores
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
#: What ``training_step`` can return: the loss, or minus a metric that has no gradient (zeroth order only).
OBJECTIVES = ("loss", "accuracy", "f1")
_SCORED_KINDS = ("choice", "masked")  # batches with options to pick from: what accuracy is computed on


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
        objective: what ``training_step`` returns (see :meth:`training_objective`): ``"loss"`` (cross-entropy
            or LM loss), ``"accuracy"`` (minus the batch's accuracy; choice and masked batches) or ``"f1"``
            (minus the mean SQuAD F1 of the greedy answers, as a fraction; generation batches). The metrics
            have no gradient, so they train only under a zeroth-order strategy (``zo2_offload``).

    Raises:
        ValueError: for a ``head_chunk_mib`` that is not positive, or an ``objective`` not in :data:`OBJECTIVES`.
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
        objective: str = "loss",
    ) -> None:
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective={objective!r}: use one of {', '.join(map(repr, OBJECTIVES))}"
                             " (e.g. `module.objective=accuracy`).")
        self.objective = objective
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

    def _correct(self, batch: dict) -> torch.Tensor:
        """``(B,)`` 1.0 where the highest-scoring candidate of a choice or masked batch is the gold one, else 0.0."""
        return (self._scores(batch).argmax(-1) == batch["gold"]).float()

    def training_objective(self, batch: dict) -> torch.Tensor:
        """What a training step minimises, as a 0-dim float tensor: lower is better for every objective.

        ``"loss"``: :meth:`loss`. ``"accuracy"``: minus the fraction of examples whose highest-scoring candidate
        is the gold one, scored as validation scores them (in ``[-1, 0]``). ``"f1"``: minus the mean SQuAD F1 of
        the greedy answers, as validation computes it but as a fraction (in ``[-1, 0]``); a perturbed run whose
        answers end sooner makes fewer forwards than the other, which the lockstep allows (a finished run drops
        out). Neither metric has a gradient: they train only by zeroth order.

        Raises:
            ValueError: the batch's kind has no such metric (accuracy needs candidates to pick from, F1 needs a
                generation batch); the message names the objective that fits.
        """
        if self.objective == "loss":
            return self.loss(batch)
        kind = batch["kind"]
        if self.objective == "accuracy":
            if kind not in _SCORED_KINDS:
                raise ValueError(
                    f"objective='accuracy' picks the highest-scoring candidate, but this training batch is of kind"
                    f" {kind!r}, which has no candidates{_kind_note(kind)}. Use `module.objective="
                    f"{_OBJECTIVE_OF.get(kind, 'loss')}` for it; accuracy fits classification, multiple-choice and"
                    " masked-LM tasks."
                )
            return -self._correct(batch).mean()
        if kind != "generate":
            raise ValueError(
                f"objective='f1' scores greedy-decoded answers, but this training batch is of kind {kind!r}"
                f"{_kind_note(kind)}. Use `module.objective={_OBJECTIVE_OF.get(kind, 'loss')}` for it; F1 fits"
                " generation batches (kind 'generate': prompts and their answers)."
            )
        f1 = squad_scores(*self._squad_inputs(batch))["f1"]  # percent
        return -(f1.float() / 100).to(batch["input_ids"].device)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """The batch's :meth:`training_objective`, logged as ``train/loss`` (minus the metric for ``accuracy`` and
        ``f1``)."""
        loss = self.training_objective(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def on_fit_start(self) -> None:
        """Refuse a metric objective under a strategy that would backpropagate it (it has no gradient).

        Raises:
            ValueError: ``objective`` is not ``"loss"`` and the trainer's strategy is not ``zo2_offload``.
        """
        from zo2_lightning.strategy import ZO2OffloadStrategy

        if self.objective != "loss" and not isinstance(self.trainer.strategy, ZO2OffloadStrategy):
            raise ValueError(
                f"objective={self.objective!r} has no gradient: it trains only by zeroth order, under"
                f" Trainer(strategy='zo2_offload') (or 'zo2_resident'), not {type(self.trainer.strategy).__name__};"
                " or use `module.objective=loss`."
            )

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
        correct = self._correct(batch)
        metrics["acc"].update(correct)
        metrics["score"].update(correct * 100)
        self.log(f"{stage}/acc", metrics["acc"], prog_bar=True, batch_size=correct.shape[0])
        self.log(f"{stage}/score", metrics["score"], batch_size=correct.shape[0])

    def _score_generation(self, batch: dict, metric: SQuAD) -> None:
        metric.update(*self._squad_inputs(batch))

    def _answers(self, batch: dict) -> list[str]:
        """The greedy answers of a ``generate`` batch (left-padded prompts), each up to its first newline."""
        prompt_len = batch["input_ids"].shape[1]
        out = self.model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        texts = self.tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
        return [first_line(t) for t in texts]

    def _squad_inputs(self, batch: dict) -> tuple[list[dict], list[dict]]:
        """``(preds, target)`` of a generation batch, as torchmetrics' SQuAD takes them."""
        preds = [{"prediction_text": a, "id": str(i)} for i, a in enumerate(self._answers(batch))]
        target = [{"answers": {"text": list(a), "answer_start": [0] * len(a)}, "id": str(i)}
                  for i, a in enumerate(batch["answers"])]
        return preds, target

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


#: Why a batch kind has no metric an objective asks for, and the objective that fits it.
_KIND_NOTE = {
    "lm": "plain text, or the gold continuation that multiple-choice and generation tasks train on by LM loss",
    "generate": "prompts to answer by greedy decoding",
    "choice": "candidates scored after a prompt",
    "masked": "label words scored at the mask",
}
_OBJECTIVE_OF = {"lm": "loss", "generate": "f1", "choice": "accuracy", "masked": "accuracy"}


def _kind_note(kind: str) -> str:
    return f" ({_KIND_NOTE[kind]})" if kind in _KIND_NOTE else ""


def _forward(model: nn.Module, batch: dict) -> Any:
    """``model`` on the batch's ``input_ids`` and ``attention_mask``, asking for no KV cache where it takes
    ``use_cache`` (see :meth:`LMTask.logits`)."""
    extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    return model(**{k: batch[k] for k in _MODEL_INPUTS}, **extra)
