"""The built-in synthetic task: token sequences from a small random Markov chain, no files, no tokenizer.

``dm = SyntheticDataModule(vocab_size=16, seq_len=32)`` (``task=synthetic``, the default run).

Each sequence walks a fixed random chain over ``vocab_size`` token ids (starting at ``first_token``, so the
byte tokenizer's special ids stay unused): the next token is the current one's successor with probability
``p_follow`` and uniform otherwise. A random-init model starts near ``ln(model vocab)`` nats per token; the
first thing even zeroth-order training learns is to stop predicting the unused part of the vocabulary,
so the loss visibly falls within a few hundred steps; the chain's structure is there to learn after that.
The optimal loss is the chain's entropy rate, reported by :meth:`SyntheticDataModule.entropy_rate`.
"""

from __future__ import annotations

import math

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from zo2_lightning.tasks.order import train_loader


class SyntheticDataModule(L.LightningDataModule):
    """Sequences from a seeded random Markov chain.

    Args:
        vocab_size: number of distinct tokens the chain uses.
        first_token: id of the chain's first token (ids ``first_token .. first_token + vocab_size - 1``).
        seq_len: tokens per sequence.
        num_train: training sequences.
        num_val: validation (and test) sequences.
        batch_size: sequences per step.
        p_follow: probability that a token is followed by its successor in the chain.
        seed: seed of the chain, of the sequences and of the training order.
    """

    kind = "lm"

    def __init__(
        self,
        *,
        vocab_size: int = 16,
        first_token: int = 5,
        seq_len: int = 32,
        num_train: int = 4096,
        num_val: int = 256,
        batch_size: int = 16,
        p_follow: float = 0.8,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.vocab_size, self.first_token, self.seq_len = vocab_size, first_token, seq_len
        self.num_train, self.num_val, self.batch_size = num_train, num_val, batch_size
        self.p_follow, self.seed = p_follow, seed
        self.sets: dict[str, TensorDataset] = {}

    def entropy_rate(self) -> float:
        """The best achievable loss in nats per token (after the first token)."""
        p_next = self.p_follow + (1 - self.p_follow) / self.vocab_size
        p_other = (1 - self.p_follow) / self.vocab_size
        return -(p_next * math.log(p_next) + (self.vocab_size - 1) * p_other * math.log(p_other))

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``(n, seq_len)`` token ids from the chain."""
        successor = torch.randperm(self.vocab_size, generator=torch.Generator().manual_seed(self.seed))
        seqs = torch.empty(n, self.seq_len, dtype=torch.long)
        seqs[:, 0] = torch.randint(self.vocab_size, (n,), generator=generator)
        for t in range(1, self.seq_len):
            follow = torch.rand(n, generator=generator) < self.p_follow
            uniform = torch.randint(self.vocab_size, (n,), generator=generator)
            seqs[:, t] = torch.where(follow, successor[seqs[:, t - 1]], uniform)
        return seqs + self.first_token

    def setup(self, stage: str | None = None) -> None:
        """Draw the train and validation sequences (once)."""
        if self.sets:
            return
        gen = torch.Generator().manual_seed(self.seed + 1)
        self.sets = {"train": TensorDataset(self.sample(self.num_train, gen)),
                     "val": TensorDataset(self.sample(self.num_val, gen))}

    @staticmethod
    def _collate(rows: list[tuple[torch.Tensor]]) -> dict:
        ids = torch.stack([r[0] for r in rows])
        return {"kind": "lm", "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def train_dataloader(self) -> DataLoader:
        """Shuffled by (seed, epoch), sharded over the ranks, resumable mid-epoch (:mod:`.order`)."""
        return train_loader(self.sets["train"], batch_size=self.batch_size, seed=self.seed, collate_fn=self._collate,
                            trainer=self.trainer)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.sets["val"], batch_size=self.batch_size, collate_fn=self._collate)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
