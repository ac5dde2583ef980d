"""Tiny local data files in each task's format: for smoke runs, tests, and as a template for your own files.

``write_toy_task("rte", "data/rte", n_train=32, n_valid=16)`` writes ``train.jsonl`` and
``validation.jsonl`` (plus ``test.jsonl`` for tasks that have one) with the HF dataset's field names, so
``task=rte task.data_dir=data/rte`` runs without network access.

The records are made up (and seeded): they exercise the pipeline, they are not the task.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zo2_lightning.tasks.templates import TASKS

_WORDS = "river stone cloud lamp quiet bright paper garden window silver music winter forest".split()


def _sentence(rng: random.Random, n: int = 6) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n)).capitalize() + "."


def _record(task: str, rng: random.Random, i: int) -> dict[str, Any]:
    s = lambda n=6: _sentence(rng, n)  # noqa: E731
    label2, label3 = rng.randrange(2), rng.randrange(3)
    makers: dict[str, Callable[[], dict[str, Any]]] = {
        "sst2": lambda: {"sentence": s(), "label": label2, "idx": i},
        "rte": lambda: {"premise": s(), "hypothesis": s(4), "label": label2, "idx": i},
        "cb": lambda: {"premise": s(), "hypothesis": s(4), "label": label3, "idx": i},
        "boolq": lambda: {"question": s(5).rstrip(".").lower(), "passage": s(10), "answer": bool(label2)},
        "wsc": lambda: {"text": s(8), "span1_text": rng.choice(_WORDS), "span2_text": "It", "label": label2},
        "wic": lambda: {"word": rng.choice(_WORDS), "sentence1": s(), "sentence2": s(), "label": label2},
        "multirc": lambda: {"paragraph": s(10), "question": s(5), "answer": s(3), "label": label2},
        "copa": lambda: {"premise": s(), "choice1": s(4), "choice2": s(4), "question": rng.choice(["cause", "effect"]),
                         "label": label2},
        "record": lambda: _record_record(rng),
        "squad": lambda: _squad_record(rng, i),
        "drop": lambda: _drop_record(rng),
        "sst2_mlm": lambda: {"sentence": s(), "label": label2},
        "sst5_mlm": lambda: {"text": s(), "label": rng.randrange(5)},
        "snli_mlm": lambda: {"premise": s(), "hypothesis": s(4), "label": label3},
        "mnli_mlm": lambda: {"premise": s(), "hypothesis": s(4), "label": label3},
        "rte_mlm": lambda: {"sentence1": s(), "sentence2": s(4), "label": label2},
        "trec_mlm": lambda: {"text": s(5).rstrip(".") + "?", "coarse_label": rng.randrange(6)},
    }
    return makers[task]()


def _record_record(rng: random.Random) -> dict[str, Any]:
    entities = rng.sample([w.capitalize() for w in _WORDS], 3)
    passage = f"{_sentence(rng, 8)} {entities[0]} and {entities[1]} met {entities[2]}.\n@highlight\n{_sentence(rng, 4)}"
    return {"passage": passage, "query": f"@placeholder was {rng.choice(_WORDS)}.", "entities": entities,
            "answers": [entities[rng.randrange(3)]]}


def _squad_record(rng: random.Random, i: int) -> dict[str, Any]:
    answer = " ".join(rng.sample(_WORDS, 2))
    context = f"{_sentence(rng, 8)} The answer is {answer}. {_sentence(rng, 5)}"
    return {"id": str(i), "title": rng.choice(_WORDS).capitalize(), "context": context,
            "question": f"What is the {rng.choice(_WORDS)}?",
            "answers": {"text": [answer], "answer_start": [context.index(answer)]}}


def _drop_record(rng: random.Random) -> dict[str, Any]:
    n = rng.randrange(2, 9)
    return {"passage": f"{_sentence(rng, 8)} There were {n} {rng.choice(_WORDS)}s.", "question": "How many were there?",
            "answers_spans": {"spans": [str(n)], "types": ["number"]}}


def write_toy_task(task: str, data_dir: str | Path, *, n_train: int = 32, n_valid: int = 16, seed: int = 0) -> Path:
    """Write small ``train``/``validation`` (and ``test`` where the task has one) jsonl files for ``task``.

    Args:
        task: a name from :data:`~zo2_lightning.tasks.templates.TASKS`.
        data_dir: the folder to write (created).
        n_train: training records.
        n_valid: validation (and test) records.
        seed: seed of the made-up content.

    Returns:
        ``data_dir`` as a Path.
    """
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; known: {sorted(TASKS)}.")
    rng = random.Random(f"{task}-{seed}")
    out = Path(data_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = {"train": n_train, "validation": n_valid}
    if "test" in TASKS[task].splits:
        splits["test"] = n_valid
    for split, n in splits.items():
        with (out / f"{split}.jsonl").open("w", encoding="utf-8") as f:
            for i in range(n):
                f.write(json.dumps(_record(task, rng, i)) + "\n")
    return out
