"""Streamed forwards equal the stock forward; detach gives the module back exactly as it was."""

import pytest
import torch

from tests import tiny_models
from zo2_lightning.engine import EngineOptions, ZOEngine, discover_blocks


@pytest.mark.parametrize("force_copies", [False, True], ids=["in-place", "copied"])
@pytest.mark.parametrize("arch", tiny_models.ARCHITECTURES)
def test_streamed_eval_forward_equals_stock(arch, force_copies):
    model, batch = tiny_models.build(arch)
    with torch.no_grad():
        expected = tiny_models.logits(model, batch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = ZOEngine(model, discover_blocks(model), torch.device("cpu"), EngineOptions(force_copies=force_copies))
    engine.attach()
    with torch.no_grad():
        streamed = tiny_models.logits(model, batch)
        again = tiny_models.logits(model, batch)
    engine.detach()
    assert torch.equal(streamed, expected)
    assert torch.equal(again, expected)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_detach_restores_hooks_devices_and_own_storage(tmp_path):
    model, batch = tiny_models.build("opt")
    blocks = discover_blocks(model)
    engine = ZOEngine(model, blocks, torch.device("cpu"), EngineOptions(force_copies=True))
    engine.attach([list(model.parameters())])
    assert all(len(b._forward_pre_hooks) == 1 for b in blocks)
    # while attached, block parameters are views of one flat host buffer per block
    w0 = blocks[0].fc1.weight
    assert w0.untyped_storage().data_ptr() == blocks[0].fc2.weight.untyped_storage().data_ptr()
    engine.detach()
    assert all(len(b._forward_pre_hooks) == 0 for b in blocks)
    ptrs = [p.untyped_storage().data_ptr() for p in model.parameters()]
    assert len(set(ptrs)) == len(ptrs)  # every parameter owns its storage again
    assert all(p.device.type == "cpu" for p in model.parameters())
    model.save_pretrained(tmp_path)  # safetensors refuses shared storage: this is the user-facing check
    assert (tmp_path / "model.safetensors").exists()


def test_blocks_called_out_of_order_still_stream():
    model, batch = tiny_models.build("t5")
    with torch.no_grad():
        expected = model.generate(batch["input_ids"], max_new_tokens=4, do_sample=False)
    engine = ZOEngine(model, discover_blocks(model), torch.device("cpu"), EngineOptions(force_copies=True))
    engine.attach()
    with torch.no_grad():  # generation re-enters the decoder blocks once per new token
        got = model.generate(batch["input_ids"], max_new_tokens=4, do_sample=False)
    engine.detach()
    assert torch.equal(got, expected)
