"""Objectives without a gradient: ``LMTask(objective="accuracy" | "f1")`` trains on minus the metric.

The values are recomputed here from the model's own outputs (candidate scores by hand, SQuAD F1 of the decoded
answers), and a real ``zo2_offload`` step is held to the SPSA estimate of the metric: its projected gradient is
``(L+ - L-) / (2 eps)`` with L+ and L- minus the metric of the parameters at theta + eps z and theta - eps z, z
regenerated from the strategy's seed as the reference MeZO does (tests/reference.py). A large eps on a tiny random
model makes the metric differ between the two perturbations, so the step is not a no-op. From the command line,
``module.objective`` also picks a prompted task's training batches (the ones its metric is computed on), and a
task whose batches cannot carry the metric is refused with the objective that fits.
"""

import copy
import functools
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from torch.utils.data import DataLoader
from torchmetrics.functional.text import squad

from hydra.errors import InstantiationException
from hydra.utils import instantiate

from tests import reference
from tests.run_helpers import compose_run, suggested_overrides
from tests.lit_helpers import SEED, trainer
from zo2_lightning import ZOSGD
from zo2_lightning.models import build_model, byte_tokenizer
from zo2_lightning.tasks.collate import ChoiceCollator, GenerateCollator, LMCollator
from zo2_lightning.tasks.lm_task import OBJECTIVES, LMTask
from zo2_lightning.tasks.order import train_loader
from zo2_lightning.tasks.scoring import first_line
from zo2_lightning.tasks.templates import Example
from zo2_lightning.tasks.toy_data import write_toy_task
from zo2_lightning.train import build, read_metric_series, train

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # some tests run no Trainer

EPS = 1.0  # a tiny random model's accuracy moves only under a large perturbation
SHAPE = dict(vocab_size=264, max_position_embeddings=128, hidden_size=32, num_hidden_layers=2,
             num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0)
WORDS = ["apple", "river", "stone", "cloud", "green", "quiet", "sharp", "seven"]


def _bundle(seed: int = 0):
    torch.manual_seed(seed)
    model, tok = build_model(arch="opt", init="random", shape=SHAPE)
    return model.eval(), tok


def _examples(n: int = 8) -> list[Example]:
    """Two-way classification prompts (label words " Yes" / " No"), the gold label alternating."""
    return [Example(prompt=f"{WORDS[i % 8]} {WORDS[(3 * i + 1) % 8]}?", candidates=(" Yes", " No"), gold=i % 2)
            for i in range(n)]


def _questions() -> list[Example]:
    """Three short questions with two acceptable answers each (a generation batch)."""
    return [Example(prompt=f"Q: {WORDS[i]} or {WORDS[i + 1]}? A:", answers=(f"{WORDS[i]}", f"{WORDS[i + 1]} x"))
            for i in range(3)]


def _accuracy(model, batch: dict) -> float:
    """The accuracy of a choice batch from the model's logits, by hand: each candidate scores the mean
    log-probability of its tokens, the highest score is the prediction."""
    logp = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float().log_softmax(-1)
    scores = torch.full((len(batch["gold"]), int(batch["num_candidates"].max())), float("-inf"))
    for r in range(batch["input_ids"].shape[0]):
        positions = batch["option_mask"][r].nonzero().flatten().tolist()
        token_logp = [logp[r, t - 1, batch["input_ids"][r, t]].item() for t in positions]
        scores[batch["owner"][r], batch["slot"][r]] = sum(token_logp) / len(token_logp)
    return (scores.argmax(-1) == batch["gold"]).float().mean().item()


def test_accuracy_objective_is_minus_the_batch_accuracy():
    model, tok = _bundle()
    batch = ChoiceCollator(tok)(_examples())
    with torch.no_grad():
        value = LMTask(model, tok, objective="accuracy").training_step(batch, 0)
        expected = _accuracy(model, batch)
        loss = LMTask(model, tok).training_step(batch, 0)
    assert value.dim() == 0 and value.dtype == torch.float32
    assert value.item() == -expected and -1.0 <= value.item() <= 0.0
    assert (value.item() * len(batch["gold"])).is_integer()  # a multiple of 1/batch
    assert loss.item() > 0  # the default objective is still the cross-entropy


def test_accuracy_objective_on_a_masked_batch_picks_the_highest_label_word_logit():
    class Fixed(torch.nn.Module):  # label word 7 wins for every example
        def forward(self, input_ids, attention_mask=None):
            logits = torch.zeros(*input_ids.shape, 16)
            logits[..., 7] = 1.0
            return type("Out", (), {"logits": logits})()

    batch = {"kind": "masked", "input_ids": torch.ones(4, 3, dtype=torch.long), "attention_mask": torch.ones(4, 3),
             "mask_pos": torch.ones(4, dtype=torch.long), "label_ids": torch.tensor([[5, 7]] * 4),
             "gold": torch.tensor([1, 0, 1, 1])}
    assert LMTask(Fixed(), objective="accuracy").training_objective(batch).item() == -0.75


class _Task(LMTask):
    """LMTask with its optimizer: ZOSGD at a given lr and eps."""

    def __init__(self, model, tok, lr: float, eps: float, **kwargs) -> None:
        super().__init__(model, tok, optimizer=functools.partial(ZOSGD, lr=lr, eps=eps), **kwargs)


def _one_step(task: LMTask, batch: dict, **kwargs) -> dict[str, float]:
    fit = trainer(max_steps=1, **kwargs)
    fit.fit(task, DataLoader([batch], batch_size=None))
    return {k: float(v) for k, v in fit.callback_metrics.items()}


def test_a_zo_step_with_the_accuracy_objective_takes_its_projected_gradient_from_the_metric():
    model, tok = _bundle(seed=3)
    batch = ChoiceCollator(tok)(_examples())
    before = copy.deepcopy(model)
    task = _Task(model, tok, lr=1e-3, eps=EPS, objective="accuracy")
    logged = _one_step(task, batch)

    index = reference.seed_index(before)
    z = reference.directions(before, SEED, step=0, index=index)
    l_plus = -reference.perturbed_loss(before, batch, _accuracy, z, EPS)
    l_minus = -reference.perturbed_loss(before, batch, _accuracy, z, -EPS)
    assert logged["zo/loss_plus"] == l_plus and logged["zo/loss_minus"] == l_minus
    assert l_plus != l_minus  # the metric moved between the two perturbations: the step is not a no-op
    g = (l_plus - l_minus) / (2 * EPS)
    assert logged["zo/projected_grad"] == pytest.approx(g, abs=1e-12)
    assert logged["train/loss"] == l_plus  # logged from the +eps run
    old, new = dict(before.named_parameters()), dict(task.model.named_parameters())
    for name in index:  # the update is the metric's: theta - lr * g * z
        assert torch.equal(new[name], old[name] - 1e-3 * (g * z[name])), name


def test_objective_names_and_batch_kinds_that_do_not_fit_are_refused_with_the_fix():
    model, tok = _bundle()
    with pytest.raises(ValueError, match=r"objective='f2'.*'loss', 'accuracy', 'f1'"):
        LMTask(model, tok, objective="f2")
    assert OBJECTIVES == ("loss", "accuracy", "f1")
    lm = LMCollator(tok)(_examples(2))
    generate = GenerateCollator(tok)(_questions())
    choice = ChoiceCollator(tok)(_examples(2))
    accuracy, f1 = LMTask(model, tok, objective="accuracy"), LMTask(model, tok, objective="f1")
    with pytest.raises(ValueError, match=r"objective='accuracy'.*kind 'lm'.*`module.objective=loss`"):
        accuracy.training_step(lm, 0)
    with pytest.raises(ValueError, match=r"objective='accuracy'.*kind 'generate'.*`module.objective=f1`"):
        accuracy.training_step(generate, 0)
    with pytest.raises(ValueError, match=r"objective='f1'.*kind 'choice'.*`module.objective=accuracy`"):
        f1.training_step(choice, 0)
    with pytest.raises(ValueError, match=r"objective='f1'.*kind 'lm'.*`module.objective=loss`"):
        f1.training_step(lm, 0)


def test_a_metric_objective_refuses_a_strategy_that_would_backpropagate_it():
    model, tok = _bundle()
    task = _Task(model, tok, lr=1e-3, eps=1e-3, objective="accuracy")
    fit = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=r"objective='accuracy' has no gradient.*zo2_offload"):
        fit.fit(task, DataLoader([ChoiceCollator(tok)(_examples(2))], batch_size=None))


def _decoded_f1(model, tok, batch: dict, max_new_tokens: int) -> float:
    """Mean SQuAD F1 (a fraction) of the greedy answers, decoded here as validation decodes them."""
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    preds = [{"prediction_text": first_line(t), "id": str(i)} for i, t in enumerate(texts)]
    target = [{"answers": {"text": a, "answer_start": [0] * len(a)}, "id": str(i)}
              for i, a in enumerate(batch["answers"])]
    return squad(preds, target)["f1"].item() / 100


class _Spell:
    """A forward hook on the LM head that makes the greedy decoding of row r spell ``scripts[r]`` token by token,
    then end-of-sequence: a random model's answers would all score F1 0. ``reset()`` before each generation."""

    def __init__(self, scripts: list[list[int]], eos: int) -> None:
        self.scripts, self.eos, self.step = scripts, eos, 0

    def reset(self) -> None:
        self.step = 0

    def __call__(self, module, args, out):
        logits = out.clone()
        for r, script in enumerate(self.scripts):
            logits[r, -1, script[self.step] if self.step < len(script) else self.eos] += 1e4
        self.step += 1
        return logits


def test_f1_objective_is_minus_the_mean_squad_f1_of_the_greedy_answers():
    model, tok = _bundle()
    questions = [Example(prompt="Q: red fruit? A:", answers=("apple",)),
                 Example(prompt="Q: two? A:", answers=("river stone",)),
                 Example(prompt="Q: number? A:", answers=("seven", "7"))]
    batch = GenerateCollator(tok)(questions)
    spell = _Spell([tok(text, add_special_tokens=False).input_ids for text in (
        " apple\njunk",  # exact once cut at the newline: F1 1
        " river cloud",  # one of two words right: precision 1/2, recall 1/2, F1 1/2
        " zebra",  # wrong: F1 0
    )], tok.eos_token_id)
    handle = model.lm_head.register_forward_hook(spell)
    try:
        with torch.no_grad():
            spell.reset()
            value = LMTask(model, tok, objective="f1", max_new_tokens=16).training_step(batch, 0)
            spell.reset()
            expected = _decoded_f1(model, tok, batch, max_new_tokens=16)
    finally:
        handle.remove()
    assert expected == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert value.dim() == 0 and value.dtype == torch.float32
    assert value.item() == pytest.approx(-expected, abs=1e-6)


def _perturbed_copy(model, z: dict, scale: float):
    """A copy of ``model`` at theta + scale * z, as the strategy's runs see it."""
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in moved.named_parameters():
            if name in z:
                p.add_(scale * z[name])
    return moved


def test_a_zo_step_with_the_f1_objective_scores_each_perturbation_by_its_own_answers():
    """The end-of-sequence embedding is scaled up so that, at eps = 1, the +eps run ends its answer after a token
    or two and the -eps run decodes its whole budget: the two runs make different numbers of forwards."""
    model, tok = _bundle()
    with torch.no_grad():
        model.model.decoder.embed_tokens.weight[tok.eos_token_id] *= 50  # tied to the head: favours </s>
    before = copy.deepcopy(model)
    z = reference.directions(before, SEED, step=0, index=reference.seed_index(before))
    prompt = Example(prompt="Q: apple? A:", answers=("x",))
    probe = GenerateCollator(tok)([prompt])
    with torch.no_grad():
        outs = {s: _perturbed_copy(before, z, s * EPS).generate(
            input_ids=probe["input_ids"], attention_mask=probe["attention_mask"], max_new_tokens=8,
            do_sample=False, pad_token_id=tok.pad_token_id)[0, probe["input_ids"].shape[1]:] for s in (1, -1)}
    assert (outs[1] == tok.eos_token_id).any() and not (outs[-1] == tok.eos_token_id).any()
    answer_minus = first_line(tok.decode(outs[-1], skip_special_tokens=True))
    assert answer_minus.strip()
    batch = GenerateCollator(tok)([Example(prompt=prompt.prompt, answers=(answer_minus,))])  # -eps answers right

    task = _Task(model, tok, lr=1e-3, eps=EPS, objective="f1", max_new_tokens=8)
    logged = _one_step(task, batch)
    l_plus = -_decoded_f1(_perturbed_copy(before, z, EPS), tok, batch, max_new_tokens=8)
    assert logged["zo/loss_minus"] == -1.0 and logged["zo/loss_plus"] == pytest.approx(l_plus) and l_plus > -1.0
    assert logged["zo/projected_grad"] == pytest.approx((l_plus + 1.0) / (2 * EPS))


def test_module_objective_accuracy_trains_a_classification_task_from_the_command_line(tmp_path):
    data_dir = write_toy_task("sst2", tmp_path / "data", n_train=16, n_valid=4)
    overrides = ["task=sst2", f"task.data_dir={data_dir}", "task.num_train=8", "task.num_dev=4", "task.num_eval=4",
                 "task.batch_size=4", "task.max_length=64", "trainer=debug", "trainer.max_steps=2",
                 "callbacks=none", "module.objective=accuracy", "optimizer.eps=1.0"]
    metrics, objects = train(compose_run(tmp_path, overrides))
    assert objects["module"].objective == "accuracy" and objects["trainer"].global_step == 2
    losses = [v for _, v in read_metric_series(Path(objects["loggers"][0].log_dir) / "metrics.csv", "train/loss")]
    assert losses and all(-1.0 <= v <= 0.0 and (4 * v).is_integer() for v in losses)  # minus an accuracy of 4


# From the command line: the module's objective picks the training batches (task.objective interpolates it).
METRIC_RUNS = [  # task, objective, the training batches' kind, extra overrides
    ("squad", "f1", "generate", ["task.num_train=8", "task.num_dev=4", "task.max_new_tokens=4"]),
    ("copa", "accuracy", "choice", ["task.num_train=8", "task.num_dev=4"]),
    ("sst2_mlm", "accuracy", "masked", ["model=roberta_tiny", "task.k=4"]),
]


@pytest.mark.parametrize("task,objective,kind,extra", METRIC_RUNS, ids=[f"{t}-{o}" for t, o, _, _ in METRIC_RUNS])
def test_module_objective_trains_each_task_kind_on_the_batches_its_metric_is_computed_on(
        task, objective, kind, extra, tmp_path):
    """``task=squad module.objective=f1`` (MeZO's SQuAD objective), ``task=copa module.objective=accuracy`` and a
    masked-LM task: every step logs minus the metric of a batch of 4, as ``train/loss``."""
    data_dir = write_toy_task(task, tmp_path / "data", n_train=32, n_valid=4)
    overrides = [f"task={task}", f"task.data_dir={data_dir}", "task.num_eval=4", "task.batch_size=4",
                 "task.max_length=128", "trainer=debug", "trainer.max_steps=2", "trainer.limit_val_batches=0",
                 "callbacks=none", f"module.objective={objective}", "optimizer.eps=1.0", *extra]
    metrics, objects = train(compose_run(tmp_path, overrides))
    datamodule = objects["datamodule"]
    assert objects["module"].objective == datamodule.objective == objective
    assert objects["trainer"].global_step == 2
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["kind"] == kind and len(batch["gold"] if "gold" in batch else batch["answers"]) == 4
    losses = [v for _, v in read_metric_series(Path(objects["loggers"][0].log_dir) / "metrics.csv", "train/loss")]
    assert len(losses) == 2 and all(-1.0 <= v <= 0.0 for v in losses)  # minus a fraction, never an LM loss
    if objective == "accuracy":
        assert all((4 * v).is_integer() for v in losses)  # minus an accuracy of 4 examples


@pytest.mark.parametrize("task", ["squad", "copa"])
def test_objective_loss_keeps_training_multiple_choice_and_generation_on_the_lm_loss(task, tmp_path):
    """The default objective keeps MeZO's batches: LM loss on the gold continuation, as :class:`LMCollator` builds
    them, in the same order; the metric objectives switch to the validation batches."""
    data_dir = write_toy_task(task, tmp_path / "data", n_train=8, n_valid=4)
    tok = byte_tokenizer()

    def first_datamodule(*overrides: str):
        cfg = compose_run(tmp_path, [f"task={task}", f"task.data_dir={data_dir}", "task.num_dev=2",
                                     "task.batch_size=4", *overrides])
        datamodule = instantiate(cfg.task, tokenizer=tok, _convert_="all")
        datamodule.setup("fit")
        return datamodule

    datamodule = first_datamodule()
    batch = next(iter(datamodule.train_dataloader()))
    mezo = train_loader(datamodule.splits["train"], batch_size=4, seed=datamodule.data_seed,
                        collate_fn=LMCollator(tok, datamodule.max_length))
    expected = next(iter(mezo))
    assert batch["kind"] == expected["kind"] == "lm"
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(batch[key], expected[key]), key
    objective, kind = {"squad": ("f1", "generate"), "copa": ("accuracy", "choice")}[task]
    assert next(iter(first_datamodule(f"module.objective={objective}").train_dataloader()))["kind"] == kind


@pytest.mark.parametrize("overrides,fix", [
    (["task=sst2", "module.objective=f1"], "module.objective=accuracy"),  # classification: candidates, no answers
    (["task=squad", "module.objective=accuracy"], "module.objective=f1"),  # generation: answers, no candidates
    (["task=synthetic", "module.objective=accuracy"], "module.objective=loss"),  # plain text: neither
], ids=["f1-sst2", "accuracy-squad", "accuracy-synthetic"])
def test_objective_a_task_cannot_carry_is_refused_before_training_with_the_fix(overrides, fix, tmp_path):
    """F1 on a task with candidates, accuracy on one with free answers or on plain text: refused when the run is
    built, before any step, naming the objective that fits (the first override in backticks)."""
    task = overrides[0].split("=")[1]
    if task != "synthetic":
        overrides = [*overrides, f"task.data_dir={write_toy_task(task, tmp_path / 'data', n_train=4, n_valid=2)}"]
    with pytest.raises((ValueError, InstantiationException), match=r"objective='(f1|accuracy)'") as err:
        build(compose_run(tmp_path, overrides))  # a datamodule's refusal comes in Hydra's wrapper
    assert suggested_overrides(str(err.value))[0] == fix
