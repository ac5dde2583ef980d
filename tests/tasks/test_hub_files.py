"""Task data in the Hub repositories' own formats, read without a network: parquet shards in a task folder, and
``datasets.load_dataset`` on a local copy laid out like the repositories (``nyu-mll/glue``'s config folders,
``google/boolq``'s ``data/``, ``rajpurkar/squad``'s single named config).

The rows are the toy records (tasks/toy_data.py), which carry each repository's field names; written to parquet
by pyarrow they take the repositories' column types: a struct for SQuAD's ``answers`` and DROP's
``answers_spans``, lists for ReCoRD's ``entities``, a bool for BoolQ's ``answer``, int64 labels.
"""

import dataclasses

import pytest

from zo2_lightning.models import byte_tokenizer
from zo2_lightning.tasks import TASKS, PromptDataModule
from zo2_lightning.tasks.loading import load_split, read_records
from zo2_lightning.tasks.toy_data import write_toy_task

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

SPLIT_FILES = {"train": "train", "valid": "validation", "test": "test"}


def _write_shards(records, folder, split, shards=1):
    """``{split}-0000i-of-0000n.parquet`` files, as the Hub's parquet repositories name them."""
    folder.mkdir(parents=True, exist_ok=True)
    size = -(-len(records) // shards)
    for i in range(shards):
        table = pa.Table.from_pylist(records[i * size : (i + 1) * size])
        pq.write_table(table, folder / f"{split}-{i:05d}-of-{shards:05d}.parquet")


def _to_parquet(jsonl_dir, parquet_dir, shards=2):
    for path in jsonl_dir.glob("*.jsonl"):
        _write_shards(read_records(path), parquet_dir, path.stem, shards)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_parquet_shards_give_the_same_examples_as_jsonl(task, tmp_path):
    jsonl = write_toy_task(task, tmp_path / "jsonl", n_train=24, n_valid=12)
    _to_parquet(jsonl, tmp_path / "parquet")
    assert sorted(p.name for p in (tmp_path / "parquet").glob("train-*")) == [
        "train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]

    def splits(data_dir):
        dm = PromptDataModule(task, byte_tokenizer(), data_dir=str(data_dir), num_train=12, num_dev=6, num_eval=6, k=2)
        dm.setup()
        return dm.splits

    from_jsonl, from_parquet = splits(jsonl), splits(tmp_path / "parquet")
    assert from_parquet == from_jsonl and from_parquet["train"]  # same records, same order, same sample


def test_parquet_keeps_the_repositories_column_types(tmp_path):
    records = read_records(write_toy_task("squad", tmp_path / "squad") / "train.jsonl")
    _write_shards(records, tmp_path / "hub", "train")
    assert pq.read_schema(tmp_path / "hub" / "train-00000-of-00001.parquet").field("answers").type == pa.struct(
        [("text", pa.list_(pa.string())), ("answer_start", pa.list_(pa.int64()))])
    assert load_split(TASKS["squad"], "train", tmp_path / "hub") == records
    boolq = read_records(write_toy_task("boolq", tmp_path / "boolq") / "train.jsonl")
    _write_shards(boolq, tmp_path / "boolq_hub", "train")
    assert {type(r["answer"]) for r in load_split(TASKS["boolq"], "train", tmp_path / "boolq_hub")} == {bool}


# ----------------------------------------------------------------------------- through `datasets`, offline
@pytest.fixture
def offline_datasets(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return datasets


def _readme(path, configs):
    """A dataset card whose YAML maps each config to its folder, as the parquet repositories' cards do."""
    lines = ["---", "configs:"]
    for name, folder in configs.items():
        lines += [f"- config_name: {name}", "  data_files:"]
        lines += [f"  - split: {split}\n    path: {folder}/{split}-*" for split in ("train", "validation")]
    path.write_text("\n".join(lines + ["---", ""]))


@pytest.mark.parametrize(("task", "layout"), [
    ("sst2", {"sst2": "sst2", "rte": "rte"}),  # nyu-mll/glue: one folder per config, the card lists them
    ("record", {"record": "record", "copa": "copa"}),  # aps/super_glue: the same layout
    ("squad", {"plain_text": "plain_text"}),  # rajpurkar/squad: one named config, loaded with config None
    ("boolq", None),  # google/boolq, ucinlp/drop: data/{split}-*.parquet, no config list
    ("drop", None),
])
def test_load_dataset_reads_a_local_copy_laid_out_like_the_repository(task, layout, tmp_path, offline_datasets):
    toy = write_toy_task(task, tmp_path / "toy", n_train=8, n_valid=4)
    repo = tmp_path / "repo"
    folder = repo / (next(iter(layout.values())) if layout else "data")
    for split in ("train", "validation"):
        _write_shards(read_records(toy / f"{split}.jsonl"), folder, split)
    if layout:
        for other in list(layout.values())[1:]:  # another config's files must not leak into this one
            _write_shards([{"x": 1}], repo / other, "train")
            _write_shards([{"x": 1}], repo / other, "validation")
        _readme(repo / "README.md", layout)
    spec = TASKS[task]
    local = dataclasses.replace(spec, hf=(str(repo), spec.hf[1]))  # the repository id -> its local copy
    for split, name in (("train", "train"), ("valid", "validation")):
        assert load_split(local, split) == read_records(toy / f"{name}.jsonl"), split
