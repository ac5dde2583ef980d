"""ZO on a subset: LoRA, prefix and head-only leave only their parameters trainable, and the strategy matches MeZO.

Outputs are compared under ``torch.no_grad()``: some families (T5) take other kernels when no parameter needs a
gradient, which is not what these tests are about.
"""

import pytest
import torch

from tests import reference, tiny_models
from tests.lit_helpers import SEED, TinyTask, assert_params_equal, clone_model, loader, trainer
from tests.run_helpers import compose_run
from zo2_lightning.engine import RESIDENT_UNIT, discover_blocks
from zo2_lightning.eval import evaluate
from zo2_lightning.peft.lora import LoRALinear
from zo2_lightning.train import train
from zo2_lightning.peft.tuning import PREFIX_FAMILIES, merge_lora, tuning

EPS = 1e-3


@torch.no_grad()
def logits(model, batch):
    return tiny_models.logits(model, batch)


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------ LoRA
@pytest.mark.parametrize("arch,targets", [("opt", ("q_proj", "v_proj")), ("llama", ("q_proj", "v_proj")),
                                          ("gpt2", ("c_attn",)), ("roberta", ("query", "value"))])
def test_lora_keeps_the_output_and_the_blocks_and_trains_only_the_adapters(arch, targets):
    model, batch = tiny_models.build(arch)
    before, blocks, names = logits(model, batch), discover_blocks(model), set(model.state_dict())
    tuning(model, "lora", targets=targets)
    assert torch.equal(logits(model, batch), before)  # B = 0
    assert all(a is b for a, b in zip(discover_blocks(model), blocks, strict=True))
    layers = [m for block in blocks for m in block.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == len(blocks) * len(targets)  # every adapter sits inside a block
    assert trainable(model) == {n for n in model.state_dict() if n.endswith((".lora_A", ".lora_B"))}
    assert set(model.state_dict()) - names == trainable(model)  # base weights keep their names


def test_merge_lora_gives_back_plain_layers_with_the_same_output():
    model, batch = tiny_models.build("opt")
    tuning(model, "lora")
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            torch.nn.init.normal_(p, std=0.1)
    adapted = logits(model, batch)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert torch.allclose(logits(model, batch), adapted, atol=1e-5)
    assert not any("lora" in n for n in model.state_dict())


# ------------------------------------------------------------------ head-only
@pytest.mark.parametrize("arch,head", [("opt", {"lm_head.weight"}), ("llama", {"lm_head.weight"}),
                                       ("roberta", {"classifier.dense.weight", "classifier.dense.bias",
                                                    "classifier.out_proj.weight", "classifier.out_proj.bias"})])
def test_head_only_trains_the_head_and_unties_it(arch, head):
    model, batch = tiny_models.build(arch)
    before = logits(model, batch)
    tuning(model, "head_only")
    assert torch.equal(logits(model, batch), before)
    assert trainable(model) == head
    if arch == "opt":  # tied: the head gets its own copy, the input embeddings stay frozen
        assert model.lm_head.weight is not model.model.decoder.embed_tokens.weight
        assert not model.model.decoder.embed_tokens.weight.requires_grad and not model.config.tie_word_embeddings


def test_head_only_without_untie_trains_the_shared_matrix():
    model, _ = tiny_models.build("opt")
    tuning(model, "head_only", untie=False)
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    assert trainable(model) == {"model.decoder.embed_tokens.weight"}  # named once, where it is first reached


# ------------------------------------------------------------------ prefix
@pytest.mark.parametrize("arch", PREFIX_FAMILIES)
def test_prefix_trains_only_prefixes_which_the_output_depends_on(arch):
    model, batch = tiny_models.build(arch)
    before = logits(model, batch)
    blocks = discover_blocks(model)
    tuning(model, "prefix", num_tokens=3)
    assert all(a is b for a, b in zip(discover_blocks(model), blocks, strict=True))
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    prefixes = {n: p for n, p in model.named_parameters() if n.endswith((".prefix_keys", ".prefix_values"))}
    assert len(prefixes) == 2 * len(blocks) and all(id(p) in in_blocks for p in prefixes.values())
    assert trainable(model) == set(prefixes)
    with_prefix = logits(model, batch)
    assert not torch.allclose(with_prefix, before)  # by design: the prefix is attended to from the start
    key = next(p for n, p in prefixes.items() if n.endswith("prefix_values"))
    with torch.no_grad():
        key.add_(1.0)
    assert not torch.allclose(logits(model, batch), with_prefix)


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_prefixed_attention_stays_causal_and_agrees_across_masks_and_the_cache(arch):
    model, batch = tiny_models.build(arch)
    tuning(model, "prefix", init="random")
    ids = batch["input_ids"]
    full = logits(model, {"input_ids": ids})  # no padding: sdpa gets no mask from the model, the hook builds one
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % tiny_models.VOCAB
    assert torch.equal(logits(model, {"input_ids": changed})[:, :-1], full[:, :-1])  # nothing sees the future
    mask = torch.ones_like(ids)  # an explicit (bool) mask from the model, widened by the hook
    assert torch.allclose(logits(model, {"input_ids": ids, "attention_mask": mask}), full, atol=1e-5)
    model.set_attn_implementation("eager")  # additive float masks
    assert torch.allclose(logits(model, {"input_ids": ids}), full, atol=1e-5)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():  # incremental decoding through the model's own cache
        first = model(input_ids=ids[:, :-3], use_cache=True)
        rest = model(input_ids=ids[:, -3:], cache=first.past_key_values, use_cache=True)
    assert torch.allclose(torch.cat([first.logits, rest.logits], dim=1), full, atol=1e-5)


def test_full_leaves_the_model_as_built():
    model, _ = tiny_models.build("opt")
    assert tuning(model, "full") is model and all(p.requires_grad for p in model.parameters())


def test_refusals_name_what_is_supported():
    llama, _ = tiny_models.build("llama")
    llama.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match=r"use one of \['eager', 'sdpa'\]"):
        tuning(llama, "prefix")
    model, _ = tiny_models.build("gpt2")
    with pytest.raises(ValueError, match="supported: .*'llama'.*'opt'"):
        tuning(model, "prefix")
    with pytest.raises(ValueError, match="use one of .*'lora'.*'prefix'.*'head_only'"):
        tuning(model, "adapters")
    with pytest.raises(ValueError, match=r"takes \['r', 'alpha'"):
        tuning(model, "lora", rank=4)
    with pytest.raises(ValueError, match=r"blocks have \['c_attn'"):
        tuning(model, "lora")  # GPT-2 has no q_proj: the message names what it has


# ------------------------------------------------------------------ the strategy on a subset
@pytest.mark.parametrize("arch,mode,kw", [("opt", "lora", {}), ("gpt2", "lora", {"targets": ("c_attn",)}),
                                          ("llama", "prefix", {}), ("opt", "prefix", {}), ("opt", "head_only", {})],
                         ids=["opt-lora", "gpt2-lora", "llama-prefix", "opt-prefix", "opt-head_only"])
def test_zo2_offload_on_the_subset_equals_the_in_memory_reference(arch, mode, kw):
    model = tuning(tiny_models.build(arch)[0], mode, **kw)
    units = {unit for unit, _ in reference.seed_index(model).values()}
    assert (units == {RESIDENT_UNIT}) == (mode == "head_only")  # adapters and prefixes stream with their block
    batches = tiny_models.batches(arch, 3)
    task = TinyTask(model=model, lr=5e-3)
    expected, initial = clone_model(task), clone_model(task)
    trainer(max_steps=3).fit(task, loader(batches))
    reference.mezo_reference(expected, batches, tiny_models.loss, seed=SEED, eps=EPS, lr=5e-3)
    assert_params_equal(task.model, expected, initial)  # every trainable tensor moved, all equal the reference
    frozen = {n: p for n, p in initial.named_parameters() if not p.requires_grad}
    assert all(torch.equal(p, frozen[n]) for n, p in task.model.named_parameters() if n in frozen)
    task.model.eval()  # as the reference left its model (OPT's dropout)
    assert torch.equal(logits(task.model, batches[0]), logits(expected, batches[0]))  # the hooks outlive the fit


# ------------------------------------------------------------------ Hydra
@pytest.mark.parametrize("mode", ["lora", "prefix", "head_only"])
def test_the_tuning_config_trains_a_few_steps(mode, tmp_path):
    cfg = compose_run(tmp_path, [f"tuning={mode}", "trainer=debug", "trainer.max_steps=2",
                                 "trainer.limit_val_batches=0", "callbacks=none", "logger=none"])
    assert cfg.tuning.mode == mode
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 2 and metrics["zo/projected_grad"] != 0.0
    model = objects["model"]
    handed = [p for group in objects["trainer"].optimizers[0].param_groups for p in group["params"]]
    assert {id(p) for p in handed} == {id(p) for p in model.parameters() if p.requires_grad}
    assert 0 < len(handed) < len(list(model.parameters()))


@pytest.mark.parametrize("mode", ["lora", "prefix"])
def test_eval_with_the_same_tuning_reproduces_the_checkpoints_test_score(mode, tmp_path):
    overrides = [f"tuning={mode}", "trainer=debug"]
    cfg = compose_run(tmp_path / "train", [*overrides, "trainer.max_steps=2", "test=true"])
    metrics, _ = train(cfg)
    ckpt = next((tmp_path / "train" / "run" / "checkpoints").glob("*.ckpt"))
    evaluated, _ = evaluate(compose_run(tmp_path / "eval", [*overrides, f"ckpt_path={ckpt}"], "eval"))
    assert evaluated["test/loss"] == metrics["test/loss"]  # the adapters / prefixes came back from the checkpoint


def test_the_lora_targets_error_suggests_targets_that_work(tmp_path):
    """RoBERTa names its projections query/key/value: the error points at [query, value], and following it works."""
    from hydra.utils import instantiate

    from tests.run_helpers import suggested_overrides

    overrides = ["model=roberta_tiny", "tuning=lora"]
    cfg = compose_run(tmp_path, overrides)
    with pytest.raises(ValueError, match="no linear layer named") as err:
        instantiate(cfg.tuning, _convert_="all")(instantiate(cfg.model, _convert_="all").model)
    fix = suggested_overrides(str(err.value))
    assert fix == ["tuning.targets=[query,value]"], str(err.value)
    cfg = compose_run(tmp_path, [*overrides, *fix])
    model = instantiate(cfg.tuning, _convert_="all")(instantiate(cfg.model, _convert_="all").model)
    layers = {n.rsplit(".", 2)[-2] for n in trainable(model)}
    assert layers == {"query", "value"} and all(n.endswith(("lora_A", "lora_B")) for n in trainable(model))
