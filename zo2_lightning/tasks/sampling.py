"""Which records a run trains, validates and tests on: MeZO's sampling and LM-BFF's k-shot sampling.

``train, dev, test = mezo_sample(train_records, valid_records, num_train=1000, num_dev=500, num_eval=1000,
seed=0)``; ``train, dev = k_shot_sample(examples, k=16, seed=42)``.

MeZO (``large_models/tasks.py``, ``sample_subset``) draws ``num_train + num_dev`` training records from
``numpy.random.permutation`` under ``np.random.seed(train_set_seed)``, keeps the last ``num_dev`` as the dev
set, and tests on ``num_eval`` validation records drawn the same way with seed 0. The legacy
``RandomState(seed).permutation`` below draws exactly what that global-state code draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def sample_subset(items: Sequence[T], num: int | None, seed: int) -> list[T]:
    """The first ``num`` items of a seeded permutation (all of them, permuted, when ``num`` is None)."""
    index = np.random.RandomState(seed).permutation(len(items)).tolist()
    return [items[i] for i in (index if num is None else index[:num])]


def mezo_sample(
    train: Sequence[T],
    valid: Sequence[T],
    *,
    num_train: int = 1000,
    num_dev: int | None = 500,
    num_eval: int | None = 1000,
    seed: int = 0,
) -> tuple[list[T], list[T], list[T]]:
    """MeZO's train / dev / test split.

    Args:
        train: the task's training records (already turned into examples or not).
        valid: the task's validation records; MeZO tests on these (SuperGLUE test labels are hidden).
        num_train: training examples.
        num_dev: dev examples, taken from the end of the training sample (None: no dev set).
        num_eval: test examples drawn from ``valid`` with seed 0 (None: all of them).
        seed: MeZO's ``train_set_seed``.

    Returns:
        ``(train, dev, test)``. A small training split gives fewer training examples, never fewer dev ones,
        as in MeZO (COPA: 400 records -> 300 train + 100 dev).
    """
    drawn = sample_subset(train, num_train + (num_dev or 0), seed)
    if num_dev:
        train_part, dev_part = drawn[:-num_dev], drawn[-num_dev:]
    else:
        train_part, dev_part = drawn, []
    test_part = sample_subset(valid, num_eval, 0) if num_eval is not None else list(valid)
    return train_part, dev_part, test_part


def k_shot_sample(items: Sequence[T], labels: Sequence[int], *, k: int, seed: int) -> tuple[list[T], list[T]]:
    """LM-BFF's few-shot split: ``k`` training and ``k`` dev examples per label, disjoint.

    Args:
        items: the training records.
        labels: the label of each record.
        k: examples per label in each of train and dev (MeZO's RoBERTa runs: 16 and 512).
        seed: the data seed (LM-BFF uses 13, 21, 42, 87, 100).

    Returns:
        ``(train, dev)`` in the order drawn.
    """
    train: list[T] = []
    dev: list[T] = []
    taken: dict[int, int] = {}
    for i in np.random.RandomState(seed).permutation(len(items)).tolist():
        n = taken.get(labels[i], 0)
        if n < k:
            train.append(items[i])
        elif n < 2 * k:
            dev.append(items[i])
        taken[labels[i]] = n + 1
    return train, dev
