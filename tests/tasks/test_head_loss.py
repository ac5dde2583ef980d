"""The LM head applied only where a loss reads it equals the full-logits losses, family by family."""

import copy
import math

import pytest
import torch

from tests import reference, tiny_models
from zo2_lightning.engine import EngineOptions, ZOEngine, discover_blocks
from zo2_lightning.tasks.lm_task import LMTask
from zo2_lightning.tasks.collate import IGNORE
from zo2_lightning.tasks.head_loss import (
    PLAIN_HEAD_FAMILIES,
    chunk_positions,
    lm_loss_at,
    option_logprobs_at,
    split_head,
)
from zo2_lightning.tasks.scoring import lm_loss, option_logprobs

EPS, SEED = 1e-3, 11
DECODERS = [a for a in tiny_models.ARCHITECTURES if a in PLAIN_HEAD_FAMILIES]


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)


def test_every_plain_family_is_a_tested_architecture():
    assert set(DECODERS) == PLAIN_HEAD_FAMILIES


@pytest.mark.parametrize("arch", DECODERS)
def test_head_of_the_backbone_is_the_models_own_logits(arch):
    model, batch = tiny_models.build(arch)
    parts = split_head(model)
    assert parts is not None
    with torch.no_grad():
        hidden = parts.backbone(input_ids=batch["input_ids"]).last_hidden_state
        assert torch.equal(parts.head(hidden), model(input_ids=batch["input_ids"]).logits)


@pytest.mark.parametrize("arch", DECODERS)
@pytest.mark.parametrize("chunk", [1, 3, 10_000])
def test_chunked_lm_loss_equals_the_full_logits_loss(arch, chunk):
    model, batch = tiny_models.build(arch, batch_size=3, seq_len=12)
    labels = batch["input_ids"].clone()
    labels[0, :5] = IGNORE  # a prompt without loss
    labels[2, 9:] = IGNORE  # padding
    parts = split_head(model)
    with torch.no_grad():
        hidden = parts.backbone(input_ids=batch["input_ids"]).last_hidden_state
        got = lm_loss_at(hidden, parts.head, labels, chunk)
        want = lm_loss(model(input_ids=batch["input_ids"]).logits, labels)
    _close(got, want)


def test_nothing_labelled_gives_nan_as_the_full_loss_does():
    model, batch = tiny_models.build("opt")
    parts = split_head(model)
    labels = torch.full_like(batch["input_ids"], IGNORE)
    with torch.no_grad():
        hidden = parts.backbone(input_ids=batch["input_ids"]).last_hidden_state
        assert math.isnan(lm_loss_at(hidden, parts.head, labels, 4).item())
        assert math.isnan(lm_loss(model(input_ids=batch["input_ids"]).logits, labels).item())


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_option_logprobs_at_the_scored_positions_equal_the_full_logits_ones(arch):
    model, batch = tiny_models.build(arch, batch_size=4, seq_len=10)
    mask = torch.zeros_like(batch["input_ids"])
    mask[0, 7:] = 1
    mask[1, 5:9] = 1
    mask[2, 9] = 1
    mask[3, 1:] = 1
    parts = split_head(model)
    with torch.no_grad():
        hidden = parts.backbone(input_ids=batch["input_ids"]).last_hidden_state
        got = option_logprobs_at(hidden, parts.head, batch["input_ids"], mask)
        want = option_logprobs(model(input_ids=batch["input_ids"]).logits, batch["input_ids"], mask)
    _close(got, want)


@pytest.mark.parametrize("arch", ["bert", "roberta", "t5"])
def test_models_outside_the_plain_families_keep_their_own_forward(arch):
    model, _ = tiny_models.build(arch)
    assert split_head(model) is None


def test_a_config_that_caps_or_scales_logits_keeps_the_models_forward():
    model, _ = tiny_models.build("gemma")
    model.config.final_logit_softcapping = 30.0
    assert split_head(model) is None
    model.config.final_logit_softcapping = None
    assert split_head(model) is not None


def test_chunk_positions_keep_one_chunk_under_the_budget():
    assert chunk_positions(50272, 256) == 256 * 2**20 // (10 * 50272)  # 533 positions
    assert chunk_positions(128256, 256) == 209
    assert chunk_positions(10**9, 1) == 1


def _lm_batch(arch):
    _, batch = tiny_models.build(arch, batch_size=3, seq_len=12)
    ids = batch["input_ids"]
    labels = ids.clone()
    labels[:, :4] = IGNORE
    return {"kind": "lm", "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _choice_batch(arch):
    _, batch = tiny_models.build(arch, batch_size=4, seq_len=10)
    ids = batch["input_ids"]
    mask = torch.zeros_like(ids)
    mask[:, 7:] = 1
    return {"kind": "choice", "input_ids": ids, "attention_mask": torch.ones_like(ids), "option_mask": mask,
            "owner": torch.tensor([0, 0, 1, 1]), "slot": torch.tensor([0, 1, 0, 1]), "gold": torch.tensor([0, 1]),
            "num_candidates": torch.tensor([2, 2])}


@pytest.mark.parametrize("kind", ["lm", "choice"])
def test_lmtask_loss_is_the_same_with_and_without_the_chunked_head(kind):
    model, _ = tiny_models.build("opt")
    batch = _lm_batch("opt") if kind == "lm" else _choice_batch("opt")
    with torch.no_grad():
        chunked = LMTask(model, head_chunk_mib=1e-3).loss(batch)  # 1 KiB: one position per chunk
        full = LMTask(model, head_chunk_mib=None).loss(batch)
    _close(chunked, full)


def test_lmtask_refuses_a_non_positive_budget():
    model, _ = tiny_models.build("opt")
    with pytest.raises(ValueError, match="head_chunk_mib must be a positive number"):
        LMTask(model, head_chunk_mib=0)


@pytest.mark.parametrize("arch", ["opt", "gpt2", "llama"])
def test_the_split_head_in_lockstep_equals_sequential_perturbed_forwards(arch):
    """The head called outside the model's forward still reads each run's own perturbed weights (it may be tied
    to the embeddings): L+ and L- equal the same loss on perturbed copies of the model, bitwise."""
    model, _ = tiny_models.build(arch)
    batch = _lm_batch(arch)
    z = reference.directions(model, SEED, step=3, index=reference.seed_index(model))
    expect = []
    for sign in (1, -1):
        clone = copy.deepcopy(model)
        with torch.no_grad():
            for name, p in clone.named_parameters():
                p.copy_(p + sign * EPS * z[name])
            expect.append(LMTask(clone, head_chunk_mib=1e-3).loss(batch))
    task = LMTask(model, head_chunk_mib=1e-3)
    engine = ZOEngine(model, discover_blocks(model), torch.device("cpu"), EngineOptions(force_copies=True), seed=SEED)
    engine.attach([list(model.parameters())])
    with torch.no_grad():
        plus, minus = engine.run_pair(lambda key: task.loss(batch), step=3, eps=EPS)
    engine.detach()
    assert torch.equal(plus, expect[0]) and torch.equal(minus, expect[1])
    assert not torch.equal(plus, minus)


def test_opt_with_a_projected_embedding_dim_is_split_where_its_logits_are():
    """OPT-350m's shape: word_embed_proj_dim != hidden, so the decoder projects in and out around the blocks;
    the head still reads the backbone's last hidden state."""
    import transformers as tf

    cfg = tf.OPTConfig(vocab_size=64, hidden_size=32, word_embed_proj_dim=16, num_hidden_layers=2, ffn_dim=64,
                       num_attention_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    model = tf.OPTForCausalLM(cfg).eval()
    assert model.model.decoder.project_out is not None
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    parts = split_head(model)
    with torch.no_grad():
        hidden = parts.backbone(input_ids=ids).last_hidden_state
        assert torch.equal(parts.head(hidden), model(input_ids=ids).logits)
        _close(lm_loss_at(hidden, parts.head, ids, 5), lm_loss(model(input_ids=ids).logits, ids))
