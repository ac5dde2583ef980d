"""Reading a task's raw records: from local jsonl/json/csv/parquet files, or through HF ``datasets``.

``records = load_split(TASKS["rte"], "train", data_dir="data/rte")`` reads ``data/rte/train.jsonl`` (or
``.json``/``.csv``/``.parquet``, or the Hub's parquet shards ``train-00000-of-00001.parquet``...); with
``data_dir=None`` it calls ``datasets.load_dataset("aps/super_glue", "rte", split="train")``.

Local files use the field names of the task's Hub dataset (``premise``, ``hypothesis``, ``label`` for RTE), one
record per line in jsonl. In csv, a cell holding JSON (``{"text": [...]}`` for SQuAD's ``answers``) is decoded.
A folder of a downloaded Hub repository works as it is: point ``data_dir`` at the folder holding the task's
shards (``glue/sst2`` of ``nyu-mll/glue``, ``data`` of ``google/boolq``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from zo2_lightning.tasks.templates import TaskSpec

_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
_ALIASES = {"valid": ("validation", "valid", "dev"), "train": ("train",), "test": ("test",)}


class DataUnavailableError(RuntimeError):
    """Raised when a split can be read neither from local files nor through HF ``datasets``."""


def find_split_files(data_dir: str | Path, split: str) -> list[Path]:
    """The files holding ``split`` in ``data_dir`` (``valid`` also matches ``validation``/``dev``), or ``[]``.

    One ``{name}.jsonl|json|csv|parquet`` file, else the Hub's parquet shards ``{name}-*.parquet`` in name order.
    """
    folder = Path(data_dir)
    for stem in _ALIASES.get(split, (split,)):
        for suffix in _SUFFIXES:
            if (folder / f"{stem}{suffix}").is_file():
                return [folder / f"{stem}{suffix}"]
        shards = sorted(folder.glob(f"{stem}-*.parquet"))
        if shards:
            return shards
    return []


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Read every record of one jsonl, json (a list of objects), csv or parquet file."""
    path = Path(path)
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if path.suffix == ".json":
        return list(json.loads(path.read_text(encoding="utf-8")))
    if path.suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            return [{k: _decode_cell(v) for k, v in row.items()} for row in csv.DictReader(f)]
    if path.suffix == ".parquet":
        return _read_parquet(path)
    raise ValueError(f"{path}: use a .jsonl, .json, .csv or .parquet file.")


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise DataUnavailableError(
            f"{path}: reading parquet needs pyarrow. `pip install zo2_lightning[data]` (or pyarrow), or convert the"
            " file to jsonl."
        ) from err
    return pq.read_table(path).to_pylist()  # structs become dicts, lists lists: the rows `datasets` yields


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
        data_dir: a folder with ``{split}.jsonl|json|csv|parquet`` files or the Hub's ``{split}-*.parquet``
            shards; ``None`` loads ``spec.hf`` through HF ``datasets`` (which needs the package and either
            network access or its local cache).

    Returns:
        The records, or ``None`` when the task has no such split (``test`` for most MeZO tasks).

    Raises:
        DataUnavailableError: when neither source can deliver a required split; the message names the fix.
    """
    repo, config = spec.hf
    if data_dir is not None:
        paths = find_split_files(data_dir, split)
        if paths:
            return [record for path in paths for record in read_records(path)]
        if split == "test":
            return None
        stems = " or ".join(f"{stem}.jsonl" for stem in _ALIASES.get(split, (split,)))
        raise DataUnavailableError(
            f"No {split} split of task {spec.name!r} in {data_dir}: expected {stems} (or .json/.csv/.parquet, or the"
            f" Hub's {_ALIASES.get(split, (split,))[0]}-*.parquet shards) with the fields of the Hub dataset {repo!r}."
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
    where = f"{repo}" + (f" config {config!r}" if config else "") + (f" at {spec.revision!r}" if spec.revision else "")
    try:
        dataset = datasets.load_dataset(repo, config, split=spec.splits[split], revision=spec.revision)
    except Exception as err:  # network, cache or hub errors come in many types
        raise DataUnavailableError(
            f"Task {spec.name!r}: could not load {where} split {spec.splits[split]!r} ({err}). Without network"
            f" access give local files with task.data_dir=PATH (train.jsonl, validation.jsonl, or the folder of"
            f" the repository's {spec.splits[split]}-*.parquet files)."
        ) from err
    return [dict(row) for row in dataset]
