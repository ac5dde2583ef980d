"""Prompt templates and label words: one raw record in, one :class:`Example` out.

``example = TASKS["sst2"].make({"sentence": "a gem", "label": 1})``

The causal-LM tasks use the prompts and label words of MeZO (Malladi et al., 2023, ``large_models/
templates.py``, the template each task selects there); the masked-LM tasks use LM-BFF's manual templates
(Gao et al., 2021), as MeZO's RoBERTa-large experiments do. An :class:`Example` keeps the prompt and the
continuations to be scored after it (MeZO's ``verbalize`` minus its ``encode``), so tokenisation and
scoring never need to know the task.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

MASK = "<mask>"  # replaced by the tokenizer's own mask token when masked-LM prompts are tokenised

CLASSIFICATION = "classification"  # fixed label words, trained as classification over them
MULTIPLE_CHOICE = "multiple_choice"  # per-example candidates, trained by LM loss on the gold one
GENERATION = "generation"  # free answer, greedy decoding, F1/EM
MASKED = "masked"  # label words at the <mask> of a masked LM (RoBERTa)


@dataclass(frozen=True)
class Example:
    """One prompt and what is scored after it.

    Attributes:
        prompt: the text the model conditions on.
        candidates: continuations scored against each other (label words, choices); empty for generation.
        gold: index of the correct candidate (``None`` for generation).
        answers: acceptable answers for generation; the first is the training target.
    """

    prompt: str
    candidates: tuple[str, ...] = ()
    gold: int | None = None
    answers: tuple[str, ...] = ()


@dataclass(frozen=True)
class TaskSpec:
    """How a task is loaded, prompted, sampled and scored.

    Attributes:
        name: the ``task=`` name.
        kind: one of CLASSIFICATION, MULTIPLE_CHOICE, GENERATION, MASKED.
        make: raw record -> :class:`Example`, or ``None`` to drop the record (unlabeled rows).
        hf: ``(repository, config)`` of the task's Hugging Face Hub dataset, for ``datasets.load_dataset``.
        splits: our split name (``train``, ``valid``, ``test``) -> the dataset's split name.
        num_dev: MeZO's dev-set size for this task (100 where the train split is small).
        label_words: the verbalizer, for classification and masked tasks.
    """

    name: str
    kind: str
    make: Callable[[Mapping[str, Any]], Example | None]
    hf: tuple[str, str | None]
    splits: Mapping[str, str] = field(default_factory=lambda: {"train": "train", "valid": "validation"})
    num_dev: int = 500
    label_words: tuple[str, ...] = ()
    revision: str | None = None  # a branch of the repository whose files ``datasets`` can read without scripts


def _label(record: Mapping[str, Any], key: str = "label") -> int | None:
    value = record.get(key)
    if value is None or int(value) < 0:  # GLUE/SNLI mark unlabeled rows with -1
        return None
    return int(value)


def _classify(prompt: str, words: tuple[str, ...], gold: int | None, sep: str = "") -> Example | None:
    if gold is None:
        return None
    return Example(prompt, tuple(sep + w for w in words), gold)


# ----------------------------------------------------------------------------- MeZO (OPT) templates
SST2_WORDS = ("terrible", "great")
YES_NO = ("No", "Yes")  # MultiRC, WIC, WSC: label 0 -> No
RTE_WORDS = ("Yes", "No")  # label 0 = entailment
CB_WORDS = ("Yes", "No", "Maybe")  # entailment, contradiction, neutral


def sst2(r: Mapping[str, Any]) -> Example | None:
    return _classify(f"{r['sentence'].strip()} It was", SST2_WORDS, _label(r), sep=" ")


def rte(r: Mapping[str, Any]) -> Example | None:
    prompt = f"{r['premise']}\nDoes this mean that \"{r['hypothesis']}\" is true? Yes or No?\n"
    return _classify(prompt, RTE_WORDS, _label(r))


def cb(r: Mapping[str, Any]) -> Example | None:
    prompt = f"Suppose {r['premise']} Can we infer that \"{r['hypothesis']}\"? Yes, No, or Maybe?\n"
    return _classify(prompt, CB_WORDS, _label(r))


def boolq(r: Mapping[str, Any]) -> Example | None:
    """BoolQ, MeZO's default template (V3); candidates in MeZO's order ``["Yes", "No"]``."""
    question = r["question"] if r["question"].endswith("?") else r["question"] + "?"
    question = question[0].upper() + question[1:]
    answer = r["answer"] if "answer" in r else _label(r)
    if answer is None:
        return None
    return Example(f"{r['passage']} {question}\n", ("Yes", "No"), 0 if bool(answer) else 1)


def wsc(r: Mapping[str, Any]) -> Example | None:
    prompt = (
        f"{r['text']}\nIn the previous sentence, does the pronoun \"{r['span2_text'].lower()}\" refer to"
        f" {r['span1_text']}? Yes or No?\n"
    )
    return _classify(prompt, YES_NO, _label(r))


def wic(r: Mapping[str, Any]) -> Example | None:
    prompt = (
        f"Does the word \"{r['word']}\" have the same meaning in these two sentences? Yes, No?\n"
        f"{r['sentence1']}\n{r['sentence2']}\n"
    )
    return _classify(prompt, YES_NO, _label(r))


def multirc(r: Mapping[str, Any]) -> Example | None:
    prompt = (
        f"{r['paragraph']}\nQuestion: {r['question']}\nI found this answer \"{r['answer']}\". Is that correct?"
        " Yes or No?\n"
    )
    return _classify(prompt, YES_NO, _label(r))


def copa(r: Mapping[str, Any]) -> Example | None:
    premise = r["premise"].rstrip()
    premise = premise[:-1] if premise.endswith(".") else premise
    conj = {"cause": " because ", "effect": " so "}[r["question"]]

    def lower_first_word(choice: str) -> str:  # MeZO's capitalization="correct"
        words = choice.split(" ")
        words[0] = words[0] if words[0] == "I" else words[0].lower()
        return " ".join(words)

    gold = _label(r)
    if gold is None:
        return None
    return Example(premise + conj, (lower_first_word(r["choice1"]), lower_first_word(r["choice2"])), gold)


def record(r: Mapping[str, Any]) -> Example | None:
    """ReCoRD, MeZO's GPT-3 style template: the candidate is the query with the entity filled in."""
    passage = r["passage"].replace("@highlight\n", "- ")
    entities = list(dict.fromkeys(r["entities"]))  # de-duplicated, order kept
    gold = next((i for i, e in enumerate(entities) if e in set(r["answers"])), None)
    if gold is None:
        return None
    candidates = tuple(" " + r["query"].replace("@placeholder", e) for e in entities)
    return Example(f"{passage}\n-", candidates, gold, tuple(r["answers"]))


def squad(r: Mapping[str, Any]) -> Example | None:
    answers = r["answers"]["text"] if isinstance(r["answers"], Mapping) else r["answers"]
    if not answers:
        return None
    prompt = f"Title: {r['title']}\nContext: {r['context']}\nQuestion: {r['question'].strip()}\nAnswer:"
    return Example(prompt, answers=tuple(answers))


def drop(r: Mapping[str, Any]) -> Example | None:
    spans = r["answers_spans"]["spans"] if "answers_spans" in r else r["answers"]
    if not spans:
        return None
    return Example(f"Passage: {r['passage']}\nQuestion: {r['question'].strip()}\nAnswer:", answers=tuple(spans))


# ----------------------------------------------------------------------------- LM-BFF (RoBERTa) templates
SST5_WORDS = ("terrible", "bad", "okay", "good", "great")
NLI3_WORDS = ("Yes", "Maybe", "No")  # entailment, neutral, contradiction (GLUE MNLI / SNLI label order)
RTE2_WORDS = ("Yes", "No")  # entailment, not_entailment
# LM-BFF's TREC words, ordered by the HF ``trec`` coarse labels ABBR, ENTY, DESC, HUM, LOC, NUM.
TREC_WORDS = ("Expression", "Entity", "Description", "Human", "Location", "Number")


def _lower_first(s: str) -> str:
    return s[:1].lower() + s[1:]


def _sentiment_masked(words: tuple[str, ...]) -> Callable[[Mapping[str, Any]], Example | None]:
    def make(r: Mapping[str, Any]) -> Example | None:  # *cls**sent_0*_It_was*mask*.*sep+*
        text = r.get("sentence", r.get("text", ""))
        return _classify(f"{text.strip()} It was{MASK}.", words, _label(r))

    return make


def _nli_masked(words: tuple[str, ...], a: str, b: str) -> Callable[[Mapping[str, Any]], Example | None]:
    def make(r: Mapping[str, Any]) -> Example | None:  # *cls**sent-_0*?*mask*,*+sentl_1**sep+*
        return _classify(f"{r[a].strip()[:-1]}?{MASK}, {_lower_first(r[b].strip())}", words, _label(r))

    return make


def trec_masked(r: Mapping[str, Any]) -> Example | None:  # *cls**mask*:*+sent_0**sep+*
    gold = _label(r, "coarse_label" if "coarse_label" in r else "label")
    return _classify(f"{MASK}: {r['text'].strip()}", TREC_WORDS, gold)


def _spec(name: str, kind: str, make: Callable, hf: tuple[str, str | None], **kw: Any) -> TaskSpec:
    return TaskSpec(name=name, kind=kind, make=make, hf=hf, **kw)


_TEST = {"train": "train", "valid": "validation", "test": "test"}
# The maintained Hub repositories of the datasets MeZO and LM-BFF loaded by their legacy names (glue, super_glue,
# boolq, squad, drop, trec): the same rows and field names, stored as parquet/json files that current `datasets`
# reads (it no longer runs loading scripts). CogComp/trec still ships a script: its parquet export branch is read.
GLUE, SUPER_GLUE = "nyu-mll/glue", "aps/super_glue"
TASKS: dict[str, TaskSpec] = {
    s.name: s
    for s in [
        _spec("sst2", CLASSIFICATION, sst2, (GLUE, "sst2"), label_words=SST2_WORDS),
        _spec("rte", CLASSIFICATION, rte, (SUPER_GLUE, "rte"), label_words=RTE_WORDS),
        _spec("cb", CLASSIFICATION, cb, (SUPER_GLUE, "cb"), num_dev=100, label_words=CB_WORDS),
        _spec("boolq", CLASSIFICATION, boolq, ("google/boolq", None), label_words=("Yes", "No")),
        _spec("wsc", CLASSIFICATION, wsc, (SUPER_GLUE, "wsc.fixed"), label_words=YES_NO),
        _spec("wic", CLASSIFICATION, wic, (SUPER_GLUE, "wic"), label_words=YES_NO),
        _spec("multirc", CLASSIFICATION, multirc, (SUPER_GLUE, "multirc"), label_words=YES_NO),
        _spec("copa", MULTIPLE_CHOICE, copa, (SUPER_GLUE, "copa"), num_dev=100),
        _spec("record", MULTIPLE_CHOICE, record, (SUPER_GLUE, "record")),
        _spec("squad", GENERATION, squad, ("rajpurkar/squad", None)),
        _spec("drop", GENERATION, drop, ("ucinlp/drop", None)),
        # RoBERTa-large (masked LM) tasks of MeZO's medium-model experiments, LM-BFF templates.
        _spec("sst2_mlm", MASKED, _sentiment_masked(SST2_WORDS), (GLUE, "sst2"), label_words=SST2_WORDS),
        _spec("sst5_mlm", MASKED, _sentiment_masked(SST5_WORDS), ("SetFit/sst5", None), splits=_TEST,
              label_words=SST5_WORDS),
        _spec("snli_mlm", MASKED, _nli_masked(NLI3_WORDS, "premise", "hypothesis"), ("stanfordnlp/snli", None),
              splits=_TEST, label_words=NLI3_WORDS),
        _spec("mnli_mlm", MASKED, _nli_masked(NLI3_WORDS, "premise", "hypothesis"), (GLUE, "mnli"),
              splits={"train": "train", "valid": "validation_matched"}, label_words=NLI3_WORDS),
        _spec("rte_mlm", MASKED, _nli_masked(RTE2_WORDS, "sentence1", "sentence2"), (GLUE, "rte"),
              label_words=RTE2_WORDS),
        _spec("trec_mlm", MASKED, trec_masked, ("CogComp/trec", None), splits=_TEST, label_words=TREC_WORDS,
              revision="refs/convert/parquet"),
    ]
}
