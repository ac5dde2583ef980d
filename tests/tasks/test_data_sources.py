"""Templates, reading local files or HF datasets, and MeZO / LM-BFF sampling."""

import json
import sys
import types

import numpy as np
import pytest

from zo2_lightning.tasks import TASKS
from zo2_lightning.tasks.loading import DataUnavailableError, load_split, read_records
from zo2_lightning.tasks.sampling import k_shot_sample, mezo_sample


# ----------------------------------------------------------------------------- templates (MeZO's exact strings)
def test_mezo_templates_render_the_papers_prompts():
    ex = TASKS["sst2"].make({"sentence": " a gem ", "label": 1})
    assert (ex.prompt, ex.candidates, ex.gold) == ("a gem It was", (" terrible", " great"), 1)
    ex = TASKS["rte"].make({"premise": "P.", "hypothesis": "H", "label": 1})
    assert ex.prompt == 'P.\nDoes this mean that "H" is true? Yes or No?\n' and ex.candidates[ex.gold] == "No"
    ex = TASKS["cb"].make({"premise": "P.", "hypothesis": "H", "label": 2})
    assert ex.prompt == 'Suppose P. Can we infer that "H"? Yes, No, or Maybe?\n' and ex.candidates[2] == "Maybe"
    ex = TASKS["boolq"].make({"question": "is it", "passage": "Text.", "answer": False})
    assert (ex.prompt, ex.candidates, ex.gold) == ("Text. Is it?\n", ("Yes", "No"), 1)
    ex = TASKS["copa"].make({"premise": "The man fell.", "choice1": "He slipped.", "choice2": "I laughed.",
                             "question": "cause", "label": 0})
    assert (ex.prompt, ex.candidates) == ("The man fell because ", ("he slipped.", "I laughed."))
    ex = TASKS["record"].make({"passage": "A met B.\n@highlight\nNews", "query": "@placeholder won.",
                               "entities": ["A", "B", "A"], "answers": ["B"]})
    assert (ex.prompt, ex.candidates, ex.gold) == ("A met B.\n- News\n-", (" A won.", " B won."), 1)
    ex = TASKS["squad"].make({"title": "T", "context": "C", "question": " Q? ", "answers": {"text": ["x", "y"]}})
    assert (ex.prompt, ex.answers) == ("Title: T\nContext: C\nQuestion: Q?\nAnswer:", ("x", "y"))
    ex = TASKS["drop"].make({"passage": "P", "question": "Q", "answers_spans": {"spans": ["3"]}})
    assert ex.prompt == "Passage: P\nQuestion: Q\nAnswer:" and ex.answers == ("3",)


def test_lmbff_templates_put_the_mask_where_lmbff_does():
    assert TASKS["sst2_mlm"].make({"sentence": "fine", "label": 0}).prompt == "fine It was<mask>."
    assert TASKS["mnli_mlm"].make({"premise": "A cat sat.", "hypothesis": "The cat.", "label": 2}).prompt == (
        "A cat sat?<mask>, the cat."
    )
    assert TASKS["trec_mlm"].make({"text": "Who?", "coarse_label": 3}).candidates[3] == "Human"


def test_unlabeled_rows_are_dropped():
    assert TASKS["sst2"].make({"sentence": "x", "label": -1}) is None


# ----------------------------------------------------------------------------- loading
def test_local_jsonl_and_csv_with_json_cells(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"sentence": "a", "label": 1}) + "\n")
    (tmp_path / "dev.csv").write_text('title,context,question,answers\nT,C,Q,"{""text"": [""x""]}"\n')
    assert load_split(TASKS["sst2"], "train", tmp_path) == [{"sentence": "a", "label": 1}]
    assert read_records(tmp_path / "dev.csv")[0]["answers"] == {"text": ["x"]}
    assert load_split(TASKS["squad"], "valid", tmp_path)[0]["title"] == "T"  # "valid" finds dev.csv
    assert load_split(TASKS["sst2"], "test", tmp_path) is None


def test_a_missing_local_split_names_the_expected_files(tmp_path):
    with pytest.raises(DataUnavailableError, match="validation.jsonl"):
        load_split(TASKS["rte"], "valid", tmp_path)


def test_hf_datasets_is_used_without_a_data_dir(monkeypatch):
    calls = []

    def load_dataset(path, name=None, split=None, revision=None):
        calls.append((path, name, split, revision))
        return [{"premise": "p", "hypothesis": "h", "label": 0}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_split(TASKS["rte"], "valid")[0]["premise"] == "p"
    load_split(TASKS["trec_mlm"], "test")
    assert calls == [("aps/super_glue", "rte", "validation", None),
                     ("CogComp/trec", None, "test", "refs/convert/parquet")]  # its main branch is a loading script


def test_every_task_names_a_maintained_hub_repository_not_a_legacy_script_name():
    """`datasets` 4+ runs no loading scripts: the canonical names (glue, super_glue, squad, drop...) are gone."""
    repos = {spec.hf[0] for spec in TASKS.values()}
    assert all("/" in repo for repo in repos), sorted(repos)
    assert {"nyu-mll/glue", "aps/super_glue", "google/boolq", "rajpurkar/squad", "ucinlp/drop"} <= repos


def test_unreachable_hf_datasets_points_at_local_files(monkeypatch):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(DataUnavailableError, match="task.data_dir"):
        load_split(TASKS["cb"], "train")


# ----------------------------------------------------------------------------- sampling
def test_mezo_sampling_draws_what_mezos_global_numpy_code_draws():
    train, valid = list(range(5000)), list(range(3000, 4000))
    got_train, got_dev, got_test = mezo_sample(train, valid, num_train=1000, num_dev=500, num_eval=1000, seed=7)
    np.random.seed(7)  # MeZO: with temp_seed(seed): np.random.permutation(len)[:num]
    drawn = [train[i] for i in np.random.permutation(len(train)).tolist()[:1500]]
    np.random.seed(0)
    test = [valid[i] for i in np.random.permutation(len(valid)).tolist()[:1000]]
    assert (got_train, got_dev, got_test) == (drawn[:1000], drawn[1000:], test)


def test_mezo_sampling_of_a_small_train_split_keeps_the_dev_set_whole():
    train, dev, test = mezo_sample(list(range(400)), list(range(100)), num_train=1000, num_dev=100, seed=0)
    assert (len(train), len(dev), len(test)) == (300, 100, 100)  # COPA in MeZO
    assert not set(train) & set(dev)


def test_k_shot_sampling_takes_k_per_label_for_train_and_dev():
    labels = [i % 3 for i in range(90)]
    train, dev = k_shot_sample(list(range(90)), labels, k=4, seed=13)
    for part in (train, dev):
        assert sorted(labels[i] for i in part) == sorted([0, 1, 2] * 4)
    assert not set(train) & set(dev)
    assert (train, dev) == k_shot_sample(list(range(90)), labels, k=4, seed=13)
    assert train != k_shot_sample(list(range(90)), labels, k=4, seed=21)[0]


def test_a_task_file_with_missing_fields_names_the_record_and_field(tmp_path):
    from zo2_lightning.tasks.datamodules import build_examples

    records = [{"premise": "p", "hypothesis": "h", "label": 0}, {"premise": "p", "label": 1}]
    with pytest.raises(ValueError, match=r"record 1 .*'hypothesis'"):
        build_examples(TASKS["rte"], records)


def test_an_empty_task_file_is_refused_with_the_fix(tmp_path):
    from zo2_lightning.models import byte_tokenizer
    from zo2_lightning.tasks.datamodules import PromptDataModule

    (tmp_path / "train.jsonl").write_text("")
    (tmp_path / "validation.jsonl").write_text(json.dumps({"sentence": "a", "label": 1}) + "\n")
    dm = PromptDataModule(task="sst2", tokenizer=byte_tokenizer(), data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="no usable .*task.data_dir"):
        dm.setup("fit")
