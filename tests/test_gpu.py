"""On a CUDA device: pinned host buffers, real uploads on side streams, same results as in memory.

Skipped without CUDA (see conftest.py); run with ``pytest -m gpu`` on a GPU machine.
"""

import pytest
import torch

from tests import reference, tiny_models
from tests.lit_helpers import SEED, TinyTask, loader, trainer
from zo2_lightning.engine import EngineOptions, ZOEngine, discover_blocks

pytestmark = pytest.mark.gpu
EPS = 1e-3


def _to(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


@pytest.mark.parametrize("register_all", [False, True], ids=["pinned", "all-registered"])
@pytest.mark.parametrize("arch", ["opt", "llama", "t5"])
def test_streamed_cuda_forward_equals_the_resident_cuda_forward(arch, register_all, monkeypatch):
    """Streamed forwards equal the all-on-GPU ones. ``all-registered``: every host copy, however small, pinned by
    the engine's own registration (engine/pinned.py), and nothing left registered after detach()."""
    import gc

    from zo2_lightning.engine import pinned

    if register_all:
        monkeypatch.setattr(pinned, "MIN_REGISTER_BYTES", 0)
    before = pinned.registered_bytes()
    model, batch = tiny_models.build(arch)
    batch = _to(batch, "cuda")
    with torch.no_grad():
        expected = tiny_models.logits(model.to("cuda"), batch)
    model.cpu()
    engine = ZOEngine(model, discover_blocks(model), torch.device("cuda"), EngineOptions(prefetch=2))
    engine.attach()
    host = [f for flats in engine.streamer.host for f in flats]
    assert all(f.is_pinned() for f in host)
    if register_all:
        pages = sum(-(-f.numel() * f.element_size() // pinned.PAGE) * pinned.PAGE for f in host)
        assert pinned.registered_bytes() - before == pages
    with torch.no_grad():
        got = tiny_models.logits(model, batch)
    engine.detach()
    del engine, host
    gc.collect()
    assert torch.equal(got, expected)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert pinned.registered_bytes() == before


@pytest.mark.parametrize("resident_blocks", [0, 1])
def test_cuda_lockstep_equals_sequential_perturbed_forwards(resident_blocks):
    model, batch = tiny_models.build("llama")
    index = reference.seed_index(model)
    options = EngineOptions(resident_blocks=resident_blocks)
    engine = ZOEngine(model, discover_blocks(model), torch.device("cuda"), options, seed=SEED)
    engine.attach([list(model.parameters())])
    cuda_batch = _to(batch, "cuda")
    with torch.no_grad():
        plus, minus = engine.run_pair(lambda s: tiny_models.loss(model, cuda_batch), step=0, eps=EPS)
    engine.detach()
    ref = model.to("cuda")
    z = {n: t.to("cuda") for n, t in reference.directions(model, SEED, 0, index).items()}
    # z is drawn on the working device by the engine: regenerate it there for the comparison
    gen = torch.Generator("cuda")
    from zo2_lightning.engine import derive_seed

    params = dict(ref.named_parameters())
    for n, (unit, j) in index.items():
        gen.manual_seed(derive_seed(SEED, 0, unit, j))
        z[n] = torch.randn(params[n].shape, generator=gen, device="cuda")
    assert torch.equal(plus, reference.perturbed_loss(ref, cuda_batch, tiny_models.loss, z, EPS))
    assert torch.equal(minus, reference.perturbed_loss(ref, cuda_batch, tiny_models.loss, z, -EPS))


def test_fit_on_cuda_streams_and_returns_the_module_to_the_cpu():
    task = TinyTask("opt", lr=1e-3)
    trainer(force_copies=False, accelerator="gpu", max_steps=3, precision="bf16-mixed").fit(
        task, loader(tiny_models.batches("opt", 3))
    )
    assert all(p.device.type == "cpu" for p in task.parameters())
    assert all(torch.isfinite(p).all() for p in task.parameters())


def test_adam_state_kept_on_the_host_equals_state_kept_on_the_device():
    """Streamed blocks keep ZO-Adam's moments in pinned host memory and bring them up for each update: the run
    equals the all-on-device one (offload=None), where the moments never move, bitwise."""
    from tests.lit_helpers import clone_model
    from zo2_lightning import ZO2OffloadStrategy, ZOAdam

    batches = tiny_models.batches("llama", 3)
    streamed = TinyTask("llama", lr=1e-3, eps=EPS, optimizer=ZOAdam)
    resident = TinyTask("llama", lr=1e-3, eps=EPS, optimizer=ZOAdam, model=clone_model(streamed))
    for task, offload in ((streamed, "cpu"), (resident, None)):
        strategy = ZO2OffloadStrategy(seed=SEED, offload_device=offload)
        trainer(strategy=strategy, accelerator="gpu", max_steps=3).fit(task, loader(batches))
    for (n, p), (_, q) in zip(streamed.model.named_parameters(), resident.model.named_parameters()):
        assert torch.equal(p.cpu(), q.cpu()), n


def test_exact_size_pinned_buffer_is_page_locked_and_copies_asynchronously():
    """A registered buffer (not a power of two) is pinned in torch's eyes, round-trips through the GPU on side
    streams, and is unregistered when its last view goes."""
    import gc

    from zo2_lightning.engine import pinned

    before = pinned.registered_bytes()
    numel = (3 << 20) + 5  # 12 MiB + 20 B: torch's allocator would pin 16 MiB
    host = pinned.host_empty(numel, torch.float32, pin=True)
    assert host.is_pinned()
    assert pinned.registered_bytes() - before == -(-numel * 4 // pinned.PAGE) * pinned.PAGE  # whole pages
    host.copy_(torch.arange(numel, dtype=torch.float32))
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        dev = host.to("cuda", non_blocking=True)
        dev.mul_(2)
        back = pinned.host_zeros(numel, torch.float32, pin=True)
        back.copy_(dev, non_blocking=True)
    side.synchronize()
    assert torch.equal(back, 2 * torch.arange(numel, dtype=torch.float32))
    del host, back, dev
    gc.collect()
    assert pinned.registered_bytes() == before
