"""The memory model and the parts it plans: the engine's device bytes predicted from shapes equal what the simulated
device counts, component by component; blocks cut into parts train exactly as the reference numbers them."""

import pytest
import torch
import transformers as tf

from tests import reference, tiny_models
from zo2_lightning.engine import EngineOptions, ZOEngine, discover_blocks
from zo2_lightning.engine.blocks import split_blocks
from zo2_lightning.engine.memory import engine_device_bytes

EPS, LR = 1e-3, 1e-2


def _opt(layers=4):
    cfg = tf.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers, ffn_dim=96, num_attention_heads=4,
                       max_position_embeddings=64, word_embed_proj_dim=32)
    torch.manual_seed(0)
    return tf.OPTForCausalLM(cfg).eval()


def test_split_blocks_cut_a_layer_into_its_attention_and_mlp_and_leave_its_norms_resident():
    model = _opt()
    names = {id(m): n for n, m in model.named_modules()}
    units = split_blocks(discover_blocks(model))
    assert [names[id(u)] for u in units[:3]] == [f"model.decoder.layers.0.{p}" for p in ("self_attn", "fc1", "fc2")]
    assert len(units) == 3 * 4
    t5 = tiny_models.build("t5")[0]  # parts inside a nested ModuleList: self-attention, (cross-attention,) MLP
    assert len(split_blocks(discover_blocks(t5))) == 2 * 2 + 2 * 3


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_split_blocks_train_exactly_as_the_reference_numbering_the_parts(arch):
    model, _ = tiny_models.build(arch)
    expected = tiny_models.build(arch)[0]
    batches = tiny_models.batches(arch, 3)
    engine = ZOEngine(model, discover_blocks(model), torch.device("cpu"),
                      EngineOptions(split_blocks=True, force_copies=True, prefetch=0), seed=5)
    engine.attach([list(model.parameters())])
    for step, batch in enumerate(batches):
        with torch.no_grad():
            lp, lm = engine.run_pair(lambda key, batch=batch: tiny_models.loss(model, batch), step, EPS)
        engine.commit(step, (lp.item() - lm.item()) / (2 * EPS), [LR], [0.0])
    engine.detach()
    reference.mezo_reference(expected, batches, tiny_models.loss, seed=5, eps=EPS, lr=LR,
                             units=split_blocks(discover_blocks(expected)))
    for (n, p), (_, e) in zip(model.named_parameters(), expected.named_parameters()):
        assert torch.equal(p, e), n


OPTION_SETS = {
    "default": (dict(), 1),
    "least-memory": (dict(regenerate_directions=True, prefetch=1, device_slots=2), 1),
    "split": (dict(split_blocks=True, regenerate_directions=True, prefetch=1, device_slots=2), 1),
    "q2-keep-resident": (dict(keep_directions=True, resident_blocks=1, prefetch=0), 2),
    "bf16-storage": (dict(storage_dtype="bf16"), 1),
}


@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_the_memory_model_equals_what_the_simulated_device_allocates(name):
    kwargs, q = OPTION_SETS[name]
    options = EngineOptions(simulated_device=0, **kwargs)
    model = _opt()
    blocks = discover_blocks(model)
    predicted = engine_device_bytes(model, blocks, options, q=q, device=torch.device("cpu"))
    engine = ZOEngine(model, blocks, torch.device("cpu"), options, seed=5)
    engine.attach([list(model.parameters())])
    ids = torch.randint(3, 64, (2, 8))
    with torch.no_grad():
        engine.run_directions(lambda key: model(input_ids=ids, labels=ids).loss, 0, EPS, [5 + d for d in range(q)])
    components = engine.device_bytes()
    counted = engine.ops.engine_bytes()  # what the device saw allocated by the engine, outside the forwards
    engine.detach()
    assert {k: v for k, v in components.items() if v} == {k: v for k, v in predicted.items()
                                                          if v and k != "resident/frozen"}
    assert counted == sum(predicted.values())
