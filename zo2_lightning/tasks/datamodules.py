"""LightningDataModules for the prompted tasks and for plain causal-LM text.

``dm = PromptDataModule("rte", tokenizer, data_dir="data/rte")`` (the ``task/`` configs build it);
``TextFileDataModule("corpus.txt", tokenizer, block_size=512)`` for causal-LM fine-tuning on a text file.

A prompted task's three splits (MeZO sampling by default, LM-BFF's k-shot sampling on request) feed
``fit`` (train + dev, as validation) and ``test``. Validation and test batches are scored as the task's kind
says (:mod:`.collate`); training batches carry what the module's ``objective`` is computed on: for ``loss``
(the default) MeZO's losses, classification over the label words for classification and masked tasks and LM
loss on the gold continuation for multiple choice and generation; for ``accuracy`` and ``f1`` the batches
validation scores, since the metric is computed on them.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from zo2_lightning.tasks.collate import ChoiceCollator, GenerateCollator, LMCollator, MaskedCollator
from zo2_lightning.tasks.lm_task import OBJECTIVES
from zo2_lightning.tasks.loading import load_split
from zo2_lightning.tasks.order import train_loader
from zo2_lightning.tasks.sampling import k_shot_sample, mezo_sample, sample_subset
from zo2_lightning.tasks.templates import (
    CLASSIFICATION,
    GENERATION,
    MASKED,
    MULTIPLE_CHOICE,
    TASKS,
    Example,
    TaskSpec,
)

#: The task kinds whose validation batches carry each metric objective: accuracy needs candidates to pick from
#: (label words or per-example choices), F1 needs answers to decode.
METRIC_KINDS = {"accuracy": (CLASSIFICATION, MULTIPLE_CHOICE, MASKED), "f1": (GENERATION,)}


def build_examples(spec: TaskSpec, records: list[dict] | None) -> list[Example]:
    """Apply the task's template to each record, dropping the ones it rejects (unlabeled rows).

    Raises:
        ValueError: a record lacks a field the template needs (names the record and the field).
    """
    examples = []
    for i, record in enumerate(records or []):
        try:
            example = spec.make(record)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"Task {spec.name!r}: record {i} ({sorted(record)[:8]}) does not fit the task's template ({err!r})."
                f" Each record needs the fields of the Hub dataset {spec.hf[0]!r}; see"
                " zo2_lightning/tasks/templates.py for what the template reads."
            ) from err
        if example is not None:
            examples.append(example)
    return examples


class PromptDataModule(L.LightningDataModule):
    """One of the MeZO / LM-BFF prompted tasks.

    Args:
        task: a name from :data:`~zo2_lightning.tasks.templates.TASKS` (``sst2``, ``rte``, ..., ``sst2_mlm``).
        tokenizer: the model's tokenizer.
        data_dir: folder with ``train``/``validation``(/``test``) jsonl, json, csv or parquet files (or the Hub's
            ``train-*.parquet`` shards); ``None`` loads the task's Hub dataset through HF ``datasets``.
        sampling: ``mezo`` (``num_train``/``num_dev``/``num_eval``) or ``k_shot`` (``k`` per label); ``None``:
            ``k_shot`` for masked tasks, ``mezo`` for the others.
        num_train: MeZO training examples.
        num_dev: MeZO dev examples (``None``: the task's MeZO default, 500, or 100 for CB and COPA).
        num_eval: test examples (MeZO: drawn from the validation split with seed 0).
        k: examples per label for ``k_shot`` (16 or 512 in MeZO's RoBERTa runs).
        data_seed: MeZO's ``train_set_seed`` / LM-BFF's data seed; also seeds the training order.
        batch_size: training examples per step (MeZO: 16).
        eval_batch_size: examples per validation/test batch (``None``: ``batch_size``).
        max_length: longest sequence in tokens (longer ones lose tokens on the left).
        max_new_tokens: decoding budget for generation tasks.
        num_workers: DataLoader workers.
        objective: the module's training objective (``module.objective``, which the ``task/`` configs
            interpolate), choosing the training batches: ``loss`` gives MeZO's (see :meth:`train_collator`),
            ``accuracy`` and ``f1`` the batches validation scores, which carry the metric.

    Raises:
        ValueError: an unknown ``task``, ``sampling`` or ``objective``, or a metric the task's batches do not
            carry (``f1`` on a task with candidates, ``accuracy`` on a generation task); the message names the
            objective that fits.
    """

    def __init__(
        self,
        task: str,
        tokenizer: PreTrainedTokenizerBase,
        *,
        data_dir: str | None = None,
        sampling: str | None = None,
        num_train: int = 1000,
        num_dev: int | None = None,
        num_eval: int | None = 1000,
        k: int = 16,
        data_seed: int = 0,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        max_length: int = 2048,
        max_new_tokens: int = 50,
        num_workers: int = 0,
        objective: str = "loss",
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"Unknown task {task!r}; known: {sorted(TASKS)}.")
        self.spec = TASKS[task]
        self.objective = _check_objective(self.spec, objective)
        sampling = sampling or ("k_shot" if self.spec.kind == MASKED else "mezo")
        if sampling not in ("mezo", "k_shot"):
            raise ValueError(f"sampling={sampling!r}: use 'mezo' or 'k_shot'.")
        self.tokenizer = tokenizer
        self.data_dir = data_dir
        self.sampling = sampling
        self.num_train, self.num_eval, self.k, self.data_seed = num_train, num_eval, k, data_seed
        self.num_dev = self.spec.num_dev if num_dev is None else num_dev
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.max_length = max_length
        self.max_new_tokens = max_new_tokens
        self.num_workers = num_workers
        self.splits: dict[str, list[Example]] = {}

    @property
    def kind(self) -> str:
        """The task's kind (classification, multiple_choice, generation, masked)."""
        return self.spec.kind

    def setup(self, stage: str | None = None) -> None:
        """Load, template and sample the three splits (once)."""
        if self.splits:
            return
        load = lambda split: load_split(self.spec, split, self.data_dir)  # noqa: E731
        train = build_examples(self.spec, load("train"))
        if not train:
            raise ValueError(
                f"Task {self.spec.name!r}: the train split{f' in {self.data_dir}' if self.data_dir else ''} has no"
                " usable (labeled) records: the file is empty or every record was dropped. Point task.data_dir"
                " at the task's files."
            )
        valid = build_examples(self.spec, load("valid"))
        if self.sampling == "mezo":
            train, dev, test = mezo_sample(
                train, valid, num_train=self.num_train, num_dev=self.num_dev, num_eval=self.num_eval,
                seed=self.data_seed,
            )
        else:
            train, dev = k_shot_sample(train, [ex.gold for ex in train], k=self.k, seed=self.data_seed)
            test_records = load("test")
            pool = build_examples(self.spec, test_records) if test_records else valid
            test = sample_subset(pool, self.num_eval, 0) if self.num_eval is not None else pool
        if not train:
            raise ValueError(
                f"Task {self.spec.name!r} has no training examples left after sampling (dev takes {len(dev)}):"
                " lower task.num_dev or task.k, or give more training records."
            )
        self.splits = {"train": train, "dev": dev, "test": test}

    # ------------------------------------------------------------------ collators
    def train_collator(self):
        """The collator of training batches: for ``objective="loss"`` the loss MeZO trains the task with, for a
        metric objective the validation batches (:meth:`eval_collator`) that the metric is computed on."""
        if self.objective != "loss":
            return self.eval_collator()
        if self.kind == MASKED:
            return MaskedCollator(self.tokenizer, self.spec.label_words, self.max_length)
        if self.kind == CLASSIFICATION:
            return ChoiceCollator(self.tokenizer, self.max_length)
        return LMCollator(self.tokenizer, self.max_length)

    def eval_collator(self):
        """The collator of validation/test batches (how the task is scored)."""
        if self.kind == MASKED:
            return MaskedCollator(self.tokenizer, self.spec.label_words, self.max_length)
        if self.kind == GENERATION:
            return GenerateCollator(self.tokenizer, self.max_length - self.max_new_tokens)
        return ChoiceCollator(self.tokenizer, self.max_length)

    def _eval_loader(self, split: str) -> DataLoader | list:
        examples = self.splits[split]
        if not examples:
            return []
        return DataLoader(examples, batch_size=self.eval_batch_size, collate_fn=self.eval_collator(),
                          num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        """Shuffled by (data_seed, epoch), sharded over the ranks, resumable mid-epoch (:mod:`.order`)."""
        return train_loader(self.splits["train"], batch_size=self.batch_size, seed=self.data_seed,
                            collate_fn=self.train_collator(), num_workers=self.num_workers, trainer=self.trainer)

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader("dev")

    def test_dataloader(self) -> DataLoader | list:
        return self._eval_loader("test")


def _check_objective(spec: TaskSpec, objective: str) -> str:
    """``objective`` if the task's validation batches carry it (every task carries ``loss``).

    Raises:
        ValueError: ``objective`` is not in :data:`~zo2_lightning.tasks.lm_task.OBJECTIVES`, or the task's
            batches do not carry the metric; names the objective that fits the task.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r}: use one of {', '.join(map(repr, OBJECTIVES))}"
                         " (`module.objective=loss`, the default, trains on the task's loss).")
    if objective == "loss" or spec.kind in METRIC_KINDS[objective]:
        return objective
    fits = next(name for name, kinds in METRIC_KINDS.items() if spec.kind in kinds)
    why = ("its answers are decoded, not picked from candidates" if spec.kind == GENERATION
           else "it picks its answer from candidates and decodes no free answer")
    raise ValueError(
        f"objective={objective!r} does not fit task {spec.name!r}, a {spec.kind.replace('_', '-')} task: {why}."
        f" Use `module.objective={fits}` (or `module.objective=loss`); accuracy fits classification,"
        " multiple-choice and masked-LM tasks, f1 fits generation tasks (SQuAD, DROP)."
    )


class _Blocks(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor, block_size: int) -> None:
        self.ids, self.block_size = ids, block_size

    def __len__(self) -> int:
        return max(0, (len(self.ids) - 1) // self.block_size)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.ids[i * self.block_size : (i + 1) * self.block_size]


def _lm_batch(rows: list[torch.Tensor]) -> dict:
    input_ids = torch.stack(rows)
    return {"kind": "lm", "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}


class TextFileDataModule(L.LightningDataModule):
    """Causal-LM fine-tuning on a plain text file, cut into fixed-length blocks.

    Args:
        path: a UTF-8 text file.
        tokenizer: the model's tokenizer.
        block_size: tokens per training sequence.
        batch_size: sequences per step.
        val_fraction: share of the blocks (taken from the end of the file) held out for validation and test.
        num_workers: DataLoader workers.
        seed: seed of the training order.
    """

    def __init__(
        self,
        path: str,
        tokenizer: PreTrainedTokenizerBase,
        *,
        block_size: int = 512,
        batch_size: int = 8,
        val_fraction: float = 0.1,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.path, self.tokenizer, self.block_size = Path(path), tokenizer, block_size
        self.batch_size, self.val_fraction, self.num_workers, self.seed = batch_size, val_fraction, num_workers, seed
        self.kind = "lm"
        self.train_set: _Blocks | None = None
        self.val_set: _Blocks | None = None

    def setup(self, stage: str | None = None) -> None:
        """Tokenise the file once and split its blocks into train and held-out parts."""
        if self.train_set is not None:
            return
        ids = torch.tensor(self.tokenizer(self.path.read_text(encoding="utf-8")).input_ids)
        n_blocks = (len(ids) - 1) // self.block_size
        n_val = max(1, int(n_blocks * self.val_fraction)) if n_blocks > 1 else 0
        cut = (n_blocks - n_val) * self.block_size
        if n_blocks - n_val < 1:
            raise ValueError(f"{self.path} has {len(ids)} tokens: too short for block_size={self.block_size}.")
        self.train_set = _Blocks(ids[:cut], self.block_size)
        self.val_set = _Blocks(ids[cut:], self.block_size)

    def train_dataloader(self) -> DataLoader:
        """Shuffled by (seed, epoch), sharded over the ranks, resumable mid-epoch (:mod:`.order`)."""
        return train_loader(self.train_set, batch_size=self.batch_size, seed=self.seed, collate_fn=_lm_batch,
                            num_workers=self.num_workers, trainer=self.trainer)

    def val_dataloader(self) -> DataLoader | list:
        if not len(self.val_set):
            return []
        return DataLoader(self.val_set, batch_size=self.batch_size, collate_fn=_lm_batch, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()
