"""Every task: a small local file -> batches -> scores equal to closed-form expectations -> metrics.

The stand-in models (tests/run_helpers.py) favour one continuation per example, chosen by the test: the gold
one for most examples and a wrong one for every third, so the expected accuracy is known by hand.
"""

import math

import pytest
import torch

from tests.run_helpers import (
    BOOST,
    AnswerStub,
    MaskStub,
    TeacherStub,
    favoured_logprob,
    plain_logprob,
    word_tokenizer,
)
from zo2_lightning.tasks.lm_task import LMTask
from zo2_lightning.models import byte_tokenizer
from zo2_lightning.tasks import TASKS, PromptDataModule
from zo2_lightning.tasks.loading import read_records
from zo2_lightning.tasks.templates import CLASSIFICATION, GENERATION, MASKED, MULTIPLE_CHOICE
from zo2_lightning.tasks.toy_data import write_toy_task

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # no Trainer here

CAUSAL_CHOICE = [t for t, s in TASKS.items() if s.kind in (CLASSIFICATION, MULTIPLE_CHOICE)]
MASKED_TASKS = [t for t, s in TASKS.items() if s.kind == MASKED]


def _datamodule(task, tmp_path, tokenizer):
    data_dir = write_toy_task(task, tmp_path / task, n_train=24, n_valid=12)
    dm = PromptDataModule(task, tokenizer, data_dir=str(data_dir), num_train=12, num_dev=6, num_eval=6, k=2,
                          batch_size=6, eval_batch_size=6)
    dm.setup()
    return dm


def _choose(examples):
    """Favour the gold candidate, except for every third example (then the next one): expected accuracy known."""
    return [ex.gold if i % 3 != 2 else (ex.gold + 1) % len(ex.candidates) for i, ex in enumerate(examples)]


@pytest.mark.parametrize("task", CAUSAL_CHOICE)
def test_choice_scores_match_the_closed_form(task, tmp_path):
    tok = byte_tokenizer()
    dm = _datamodule(task, tmp_path, tok)
    examples = dm.splits["test"]
    chosen = _choose(examples)
    stub = TeacherStub(tok, [ex.prompt + ex.candidates[c] for ex, c in zip(examples, chosen)])
    module = LMTask(stub, tok)
    batch = next(iter(dm.test_dataloader()))
    assert batch["kind"] == "choice" and batch["gold"].tolist() == [ex.gold for ex in examples]

    from zo2_lightning.tasks.scoring import choice_scores

    scores = choice_scores(module.logits(batch), batch)
    expected = torch.full_like(scores, float("-inf"))
    for i, ex in enumerate(examples):
        for j in range(len(ex.candidates)):
            expected[i, j] = favoured_logprob() if j == chosen[i] else plain_logprob()
    torch.testing.assert_close(scores, expected)
    assert scores.argmax(-1).tolist() == chosen

    module.test_step(batch, 0)  # accuracy through the metric the run logs
    right = sum(c == ex.gold for c, ex in zip(chosen, examples))
    assert module.metrics["test"]["acc"].compute().item() == pytest.approx(right / len(examples))
    assert module.metrics["test"]["score"].compute().item() == pytest.approx(100 * right / len(examples))


@pytest.mark.parametrize("task", CAUSAL_CHOICE)
def test_training_batches_carry_mezos_loss(task, tmp_path):
    tok = byte_tokenizer()
    dm = _datamodule(task, tmp_path, tok)
    examples = dm.splits["train"][:6]
    stub = TeacherStub(tok, [ex.prompt + ex.candidates[ex.gold] for ex in examples])
    batch = dm.train_collator()(examples)
    loss = LMTask(stub, tok).loss(batch).item()
    if TASKS[task].kind == CLASSIFICATION:  # cross-entropy over the label words' scores
        assert batch["kind"] == "choice"
        n = len(examples[0].candidates)
        f, p = favoured_logprob(), plain_logprob()
        assert loss == pytest.approx(-(f - math.log(math.exp(f) + (n - 1) * math.exp(p))), abs=1e-6)
    else:  # LM loss on the gold continuation only: every labelled token is favoured
        assert batch["kind"] == "lm"
        n_labelled = (batch["labels"] != -100).sum().item()
        assert n_labelled == sum(len(ex.candidates[ex.gold].encode()) for ex in examples)
        assert loss == pytest.approx(-favoured_logprob(), abs=1e-6)


@pytest.mark.parametrize("task", MASKED_TASKS)
def test_masked_label_word_logits_pick_the_favoured_label(task, tmp_path):
    records = read_records(write_toy_task(task, tmp_path / "words") / "train.jsonl")
    words = [w for r in records for v in r.values() if isinstance(v, str) for w in v.replace("?", " ").split()]
    tok = word_tokenizer(words + list(TASKS[task].label_words) + ["It", "was", ".", ",", "?", ":"])
    dm = _datamodule(task, tmp_path, tok)
    examples = dm.splits["test"]
    chosen = _choose(examples)
    batch = next(iter(dm.test_dataloader()))
    label_ids = [tok.convert_tokens_to_ids(w) for w in TASKS[task].label_words]
    assert batch["label_ids"][0].tolist() == label_ids  # each label word is its own token
    module = LMTask(MaskStub(tok.mask_token_id, label_ids, chosen, vocab=len(tok)), tok)

    from zo2_lightning.tasks.scoring import masked_scores

    expected = torch.zeros(len(examples), len(label_ids))
    expected[torch.arange(len(examples)), torch.tensor(chosen)] = BOOST
    torch.testing.assert_close(masked_scores(module.logits(batch), batch), expected)
    module.test_step(batch, 0)
    right = sum(c == ex.gold for c, ex in zip(chosen, examples))
    assert module.metrics["test"]["acc"].compute().item() == pytest.approx(right / len(examples))


@pytest.mark.parametrize("task", [t for t, s in TASKS.items() if s.kind == GENERATION])
def test_generation_is_scored_by_squad_f1_and_em(task, tmp_path):
    tok = byte_tokenizer()
    dm = _datamodule(task, tmp_path, tok)
    examples = dm.splits["test"][:2]
    batch = dm.eval_collator()(examples)
    assert batch["kind"] == "generate" and (batch["input_ids"][:, -1] != tok.pad_token_id).all()  # left-padded
    gold0, gold1 = examples[0].answers[0], examples[1].answers[0]
    # row 0: the exact answer, then a newline and junk (cut); row 1: one right word plus one wrong one
    texts = [f" {gold0}\nnot part of it", f" {gold1.split()[0]} zebra"]
    module = LMTask(AnswerStub(tok, texts), tok)
    module.test_step(batch, 0)
    result = module.metrics["test"]["squad"].compute()
    gold1_words = len(gold1.split())
    f1_row1 = 2 * (1 / 2) * (1 / gold1_words) / ((1 / 2) + (1 / gold1_words))  # precision 1/2, recall 1/len
    assert result["exact_match"].item() == pytest.approx(50.0)
    assert result["f1"].item() == pytest.approx(100 * (1.0 + f1_row1) / 2)

    train = dm.train_collator()(examples)  # trained on " answer\n" after the prompt
    assert (train["labels"] != -100).sum().item() == sum(len(f" {ex.answers[0]}\n".encode()) for ex in examples)


def test_scoring_forwards_build_no_kv_cache():
    """A decoder's scoring forward would otherwise build a KV cache that every lockstep run holds to the end."""
    from tests import tiny_models

    model, batch = tiny_models.build("opt")
    seen = []
    model.register_forward_hook(lambda m, args, out: seen.append(out.past_key_values))
    LMTask(model).logits({"input_ids": batch["input_ids"], "attention_mask": torch.ones_like(batch["input_ids"])})
    assert seen == [None]
