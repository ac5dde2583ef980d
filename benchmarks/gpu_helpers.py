"""Helpers of benchmarks/gpu_offload.py: OPT shapes, cheap random fills, fit checks, bus bandwidth, link limits.

``from gpu_helpers import opt_config, meta_model, fill_, measure_bandwidth, link_bound_s`` (scripts in this
folder run with it on their path). Pure arithmetic is kept apart so tests can check it with hand numbers.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from transformers import OPTConfig, OPTForCausalLM

from zo2_lightning.engine.pinned import allocator, host_empty, registered_bytes, serving

GB = 1e9  # decimal: ZO2's table is in GB, and a decimal GB makes our figure the larger (the stricter comparison)
GIB = 2**30
CONF_MODEL = Path(__file__).resolve().parents[1] / "conf" / "model"

# ZO2 (Wang et al., 2025, arXiv 2503.12668): peak GPU memory, OPT fp16, batch 1, sequence 2048.
ZO2_PUBLISHED_GB = {"1.3b": 3.75, "2.7b": 4.14, "6.7b": 4.99, "13b": 6.18, "30b": 8.86, "66b": 12.07, "175b": 18.04}

# --smoke: the published sizes shrunk so they stay ordered and run on a CPU in seconds; more blocks than the
# streamer's device slots (prefetch + 2), so blocks are evicted and uploaded again every step, as on a GPU.
SMOKE_SHAPES = {
    "1.3b": dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, ffn_dim=128),
    "2.7b": dict(hidden_size=48, num_hidden_layers=5, num_attention_heads=2, ffn_dim=192),
}
SMOKE_VOCAB = 256


@dataclass(frozen=True)
class Precision:
    """How a run stores and computes: the parameters' dtype, the host copies' dtype, the autocast dtype."""

    param_dtype: torch.dtype
    storage_dtype: torch.dtype | None  # None: host copies in param_dtype
    autocast_dtype: torch.dtype | None  # None: compute in param_dtype
    note: str


PRECISIONS = {
    "bf16_storage": Precision(
        torch.float32, torch.bfloat16, torch.bfloat16,
        "fp32 working copy on the GPU, bf16 host copy and uploads, bf16 autocast; updates survive the 16-bit"
        " storage (seeded stochastic rounding): the strategy's precision=bf16_storage, the correct 16-bit setting"),
    "fp16_storage": Precision(
        torch.float32, torch.float16, torch.bfloat16,
        "as bf16_storage with fp16 host copies (conf precision=fp16_storage, ZO2's storage dtype)"),
    "bf16_weights": Precision(
        torch.bfloat16, None, None,
        "bf16 weights on host and GPU, bf16 compute (the strategy's precision='bf16-true'): each update runs"
        " in fp32 and is stochastically rounded back, so none is lost; the least GPU memory"),
    "fp16_weights": Precision(
        torch.float16, None, None, "as bf16_weights in fp16 (ZO2's own setting; the strategy refuses fp16 weights, which overflow)"),
}


# ---------------------------------------------------------------------------------------------- models
def opt_config(size: str, smoke: bool = False) -> OPTConfig:
    """The published OPT shape of ``size`` (from conf/model/opt-SIZE.yaml), or its --smoke miniature."""
    if smoke:
        shape = dict(SMOKE_SHAPES[size], vocab_size=SMOKE_VOCAB, max_position_embeddings=2048)
        shape["word_embed_proj_dim"] = shape["hidden_size"]
    else:
        shape = yaml.safe_load((CONF_MODEL / f"opt-{size}.yaml").read_text())["shape"]
    return OPTConfig(**shape, use_cache=False, dropout=0.0, attention_dropout=0.0)


def meta_model(cfg: OPTConfig, dtype: torch.dtype) -> OPTForCausalLM:
    """The model on the meta device (nothing allocated), in eval mode, parameters in ``dtype``."""
    with torch.device("meta"):
        model = OPTForCausalLM(cfg)
    return model.to(dtype).eval()


def fill_(
    module: torch.nn.Module, device: torch.device, generator: torch.Generator, skip: Collection[int] = ()
) -> None:
    """Give every meta parameter of ``module`` (except those whose ``id`` is in ``skip``) real values on
    ``device``, keeping the Parameter objects (the engine's ``materialize`` contract).

    Matrices: uniform in +-0.02 (drawn on ``device``: a GPU fills tens of GB in milliseconds, where a host
    fill of 30B parameters would take minutes); norm weights 1, biases 0. The loss stays finite (about
    log(vocab)).
    """
    for name, p in module.named_parameters():
        if not p.is_meta or id(p) in skip:
            continue
        value = torch.empty(p.shape, dtype=p.dtype, device=device)
        if p.dim() >= 2:
            value.uniform_(-0.02, 0.02, generator=generator)
        elif "norm" in name and name.endswith("weight"):
            value.fill_(1.0)
        else:
            value.zero_()
        torch.utils.swap_tensors(p, torch.nn.Parameter(value, requires_grad=p.requires_grad))
    if any(b.is_meta for b in module.buffers()):
        raise RuntimeError("fill_ fills parameters only; this model has meta buffers")


class HostFill:
    """``materialize`` for streamed blocks: every block's parameters become views of one host buffer, filled
    once, until the engine packs them into its (pinned) host copies.

    A fresh host tensor per parameter would cost a page fault per 4 KiB (about 1 GB/s in a VM) and a CPU
    random fill about 0.5 GB/s per core: minutes for 30B parameters. Reading one warm buffer costs a memcpy.
    Every block then holds the same values, which changes neither the timing nor the memory.

    Args:
        blocks: the (meta) blocks the buffer must serve.
        dtype: the parameters' dtype.
        source: device whose generator draws the values (a GPU draws gigabytes in milliseconds).
    """

    def __init__(self, blocks: Sequence[torch.nn.Module], dtype: torch.dtype, source: torch.device) -> None:
        mats = max(sum(p.numel() for p in b.parameters() if p.dim() >= 2) for b in blocks)
        vecs = max(p.numel() for b in blocks for p in b.parameters())
        gen = torch.Generator(device=source).manual_seed(0)
        self.random = torch.empty(mats, dtype=dtype, device=source).uniform_(-0.02, 0.02, generator=gen).cpu()
        self.ones = torch.ones(vecs, dtype=dtype)
        self.zeros = torch.zeros(vecs, dtype=dtype)

    def release(self) -> None:
        """Drop the buffer (after attach: the engine keeps its callback, it need not keep the memory)."""
        self.random = self.ones = self.zeros = None

    def __call__(self, block: torch.nn.Module) -> None:
        offset = 0
        for name, p in block.named_parameters():
            if p.dim() >= 2:
                value = self.random[offset : offset + p.numel()]
                offset += p.numel()
            else:
                value = (self.ones if "norm" in name and name.endswith("weight") else self.zeros)[: p.numel()]
            torch.utils.swap_tensors(p, torch.nn.Parameter(value.view(p.shape), requires_grad=p.requires_grad))


def block_numels(model: torch.nn.Module, blocks: Sequence[torch.nn.Module]) -> tuple[list[int], int]:
    """(parameters per block, parameters outside the blocks), tied weights counted once."""
    inside: set[int] = set()
    per_block = []
    for block in blocks:
        ps = {id(p): p.numel() for p in block.parameters()}
        inside.update(ps)
        per_block.append(sum(ps.values()))
    rest = sum(p.numel() for p in model.parameters() if id(p) not in inside)
    return per_block, rest


# ---------------------------------------------------------------------------------------------- arithmetic
def pow2ceil(n: int) -> int:
    """The smallest power of two >= n (torch's pinned-memory allocator rounds every allocation up to one)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def host_bytes_needed(block_numels_: Sequence[int], itemsize: int, pinned: bool) -> int:
    """Host bytes of the blocks' copies: one flat buffer per block, at its exact size (the engine registers its
    pinned buffers itself, see zo2_lightning/engine/pinned.py), or power-of-two rounded when pinned through
    torch's allocator (``ZO2_PINNED=torch``)."""
    sizes = [n * itemsize for n in block_numels_]
    return sum(pow2ceil(s) for s in sizes) if pinned and allocator() == "torch" else sum(sizes)


def fits_in_host(need: int, available: int | None, reserve_fraction: float = 0.1, min_reserve: int = 8 * GIB) -> bool:
    """True if ``need`` bytes leave a reserve (10% of what is available, at least 8 GiB) for the runtime."""
    if available is None:
        return True
    return need <= available - max(min_reserve, int(reserve_fraction * available))


def device_bytes_needed(block_params: int, largest_block: int, resident: int, prec: Precision, margin: int) -> int:
    """GPU bytes of an all-resident engine run: the blocks (in the storage dtype when it is narrower, plus three
    working slots of the largest block), the resident part, z and two perturbed copies of the largest block and
    of the resident part, and ``margin`` for activations."""
    work = prec.param_dtype.itemsize
    scratch = 3 * (largest_block + resident) * work
    if prec.storage_dtype is not None and prec.storage_dtype != prec.param_dtype:
        blocks = block_params * prec.storage_dtype.itemsize + 3 * largest_block * work
    else:
        blocks = block_params * work
    return blocks + resident * work + scratch + margin


def link_bound_s(up_bytes: float, down_bytes: float, bw: dict[str, float]) -> float:
    """The shortest step the bus allows: uploads and write-backs overlap (full duplex) at best, and together
    they cannot beat the measured simultaneous two-way rate. ``bw`` in GB/s, keys as measure_bandwidth's."""
    up = up_bytes / (bw["h2d_pinned"] * GB)
    down = down_bytes / (bw["d2h_pinned"] * GB)
    both = (up_bytes + down_bytes) / (bw["bidir_pinned"] * GB) if bw.get("bidir_pinned") else 0.0
    return max(up, down, both)


# ---------------------------------------------------------------------------------------------- the bus
def _best_gbps(copy: Callable[[], None], nbytes: int, reps: int, sync: Callable[[], None]) -> float:
    copy()  # warm-up
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        copy()
        sync()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / GB


def measure_bandwidth(device: torch.device, nbytes: int, reps: int = 3) -> dict[str, float]:
    """Copy rates in GB/s (best of ``reps``): pinned and pageable host->device and device->host, pinned both ways
    at once (half the buffer each way, on two streams), the same from a buffer pinned as the engine pins its host
    copies (``*_registered``: zo2_lightning/engine/pinned.py), and ``pin_alloc``, the rate at which host memory is
    pinned (allocated and touched once; it sets the build time of the streamed models). On a CPU ``device``
    these are plain host copies."""
    rates = _copy_rates(device, nbytes, reps)
    release_memory(device)  # the test buffers, pinned one included
    return rates


def _copy_rates(device: torch.device, nbytes: int, reps: int) -> dict[str, float]:
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(3)  # CUDA initialised before the clock
    t0 = time.perf_counter()
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda).fill_(1)
    pin_alloc = nbytes / (time.perf_counter() - t0) / GB
    pageable = torch.empty(nbytes, dtype=torch.uint8).fill_(2)
    out = {
        "h2d_pinned": _best_gbps(lambda: dev.copy_(pinned, non_blocking=True), nbytes, reps, sync),
        "h2d_pageable": _best_gbps(lambda: dev.copy_(pageable), nbytes, reps, sync),
        "d2h_pinned": _best_gbps(lambda: pinned.copy_(dev, non_blocking=True), nbytes, reps, sync),
        "d2h_pageable": _best_gbps(lambda: pageable.copy_(dev), nbytes, reps, sync),
    }
    if cuda:
        half = nbytes // 2
        up_s, down_s = torch.cuda.Stream(device), torch.cuda.Stream(device)

        def both() -> None:
            with torch.cuda.stream(up_s):
                dev[:half].copy_(pinned[:half], non_blocking=True)
            with torch.cuda.stream(down_s):
                pinned[half:].copy_(dev[half:], non_blocking=True)

        out["bidir_pinned"] = _best_gbps(both, 2 * half, reps, sync)
        # the engine's own pinning (an exact-size registered map, not torch's allocator): the same rates?
        odd = nbytes - nbytes // 3  # not a power of two
        with serving(device):
            registered = host_empty(odd, torch.uint8, pin=True).fill_(1)
        out["h2d_registered"] = _best_gbps(lambda: dev[:odd].copy_(registered, non_blocking=True), odd, reps, sync)
        out["d2h_registered"] = _best_gbps(lambda: registered.copy_(dev[:odd], non_blocking=True), odd, reps, sync)
    out["pin_alloc"] = pin_alloc
    return out


def release_memory(device: torch.device, host_cache: bool = True) -> None:
    """Collect garbage (engines hold reference cycles through their hooks) and hand cached memory back."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        if host_cache:  # pinned blocks cached by torch's host allocator (the API moved between versions)
            for owner, name in ((getattr(torch, "accelerator", None), "empty_host_cache"),
                                (torch._C, "_host_emptyCache"), (torch._C, "_accelerator_emptyHostCache")):
                empty_host = getattr(owner, name, None)
                if empty_host is not None:
                    empty_host()
                    break


def pinned_host_bytes() -> int:
    """Bytes of host memory pinned now: the engine's exact-size registrations plus what torch's host allocator
    holds (power-of-two rounded blocks), where torch says."""
    try:
        by_torch = int(torch.cuda.memory.host_memory_stats()["allocated_bytes.current"])
    except Exception:  # noqa: BLE001 - older torch: no host stats
        by_torch = 0
    return registered_bytes() + by_torch
