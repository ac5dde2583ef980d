"""Reading a task's raw records: from local jsonl/json/csv files, or through HF ``datasets``.

``records = load_split(TASKS["rte"], "train", data_dir="data/rte")`` reads ``data/rte/train.jsonl`` (or
``.json``/``.csv``); with ``data_dir=None`` it calls ``datasets.load_dataset("super_glue", "rte")``.

Local files use the field names of the HF dataset (``premise``, ``hypothesis``, ``label`` for RTE), one record
per line in jsonl. In csv, a cell holding JSON (``{"text": [...]}`` for SQuAD's ``answers``) is decoded.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from zo2_lightning.tasks.templates import TaskSpec

_SUFFIXES = (".jsonl", ".json", ".csv")
_ALIASES = {"valid": ("validation", "valid", "dev"), "train": ("train",), "test": ("test",)}


class DataUnavailableError(RuntimeError):
    """Raised when a split can be read neither from a local file nor through HF ``datasets``."""


def find_split_file(data_dir: str | Path, split: str) -> Path | None:
    """The file holding ``split`` in ``data_dir`` (``valid`` also matches ``validation``/``dev``), or None."""
    for stem in _ALIASES.get(split, (split,)):
        for suffix in _SUFFIXES:
            path = Path(data_dir) / f"{stem}{suffix}"
            if path.is_file():
                return path
    return None


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Read every record of one jsonl, json (a list of objects) or csv file."""
    path = Path(path)
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if path.suffix == ".json":
        return list(json.loads(path.read_text(encoding="utf-8")))
    if path.suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            return [{k: _decode_cell(v) for k, v in row.items()} for row in csv.DictReader(f)]
    raise ValueError(f"{path}: use a .jsonl, .json or .csv file.")


def _decode_cell(value: str) -> Any:
    if value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    if value.lstrip("-").isdigit():
        return int(value)
    return value


def load_split(spec: TaskSpec, split: str, data_dir: str | Path | None = None) -> list[dict[str, Any]] | None:
    """Raw records of one split.

    Args:
        spec: the task.
        split: ``train``, ``valid`` or ``test``.
        data_dir: a folder with ``{split}.jsonl|json|csv`` files; ``None`` loads ``spec.hf`` through
            HF ``datasets`` (which needs the package and either network access or its local cache).

    Returns:
        The records, or ``None`` when the task has no such split (``test`` for most MeZO tasks).

    Raises:
        DataUnavailableError: when neither source can deliver a required split; the message names the fix.
    """
    if data_dir is not None:
        path = find_split_file(data_dir, split)
        if path is not None:
            return read_records(path)
        if split == "test":
            return None
        stems = " or ".join(f"{stem}.jsonl" for stem in _ALIASES.get(split, (split,)))
        raise DataUnavailableError(
            f"No {split} split of task {spec.name!r} in {data_dir}: expected {stems} (or .json/.csv) with the"
            f" fields of the HF dataset {spec.hf[0]!r}."
        )
    if split not in spec.splits:
        return None
    try:
        import datasets
    except ImportError as err:
        raise DataUnavailableError(
            f"Task {spec.name!r}: HF datasets is not installed. `pip install zo2_lightning[data]`, or give"
            f" local files with task.data_dir=PATH (train.jsonl, validation.jsonl)."
        ) from err
    path, subset = spec.hf
    try:
        dataset = datasets.load_dataset(path, subset, split=spec.splits[split])
    except Exception as err:  # network, cache or hub errors come in many types
        raise DataUnavailableError(
            f"Task {spec.name!r}: could not load {path}/{subset} split {spec.splits[split]!r} ({err}). Without"
            f" network access give local files with task.data_dir=PATH (train.jsonl, validation.jsonl)."
        ) from err
    return [dict(row) for row in dataset]
