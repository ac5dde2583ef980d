"""What one row of benchmarks/gpu_offload.py runs: an OPT size's model with ``ZOEngine`` attached, one ZO step
through it, or one step of MeZO's own in-place loop.

``engine, model = build_engine(Size.of("13b", smoke=False), PRECISIONS["bf16_weights"], device, prefetch=1)``;
``step = engine_step(engine, model, ids, prec)``; ``loss_plus = step(i)``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import OPTConfig

from gpu_helpers import HostFill, Precision, block_numels, fill_, meta_model, opt_config
from zo2_lightning.engine import EngineOptions, ZOEngine, discover_blocks
from zo2_lightning.tasks.head_loss import chunk_positions, lm_loss_at, split_head

EPS, LR = 1e-3, 1e-6
HEAD_CHUNK_MIB = 256  # LMTask's default head_chunk_mib


@dataclass(frozen=True)
class Size:
    """One OPT size: its config and parameter counts (from the meta model, nothing allocated)."""

    name: str
    cfg: OPTConfig
    per_block: list[int]
    rest: int  # parameters outside the blocks (embeddings, final norm)

    @classmethod
    def of(cls, name: str, smoke: bool) -> Size:
        cfg = opt_config(name, smoke)
        model = meta_model(cfg, torch.float32)
        return cls(name, cfg, *block_numels(model, discover_blocks(model)))

    @property
    def params(self) -> int:
        return sum(self.per_block) + self.rest


def build_engine(size: Size, prec: Precision, device: torch.device, prefetch: int | None,
                 regenerate: bool = False, fewer_slots: bool = False) -> tuple[ZOEngine, Any]:
    """The model with ``ZOEngine`` attached: blocks streamed from host memory (``prefetch`` ahead) or, with
    ``prefetch=None``, everything on ``device``; ``regenerate``: no z kept on the device
    (``regenerate_directions``); ``fewer_slots``: ``prefetch + 1`` block buffers (``device_slots``)."""
    streamed = prefetch is not None
    model = meta_model(size.cfg, prec.param_dtype)
    blocks = discover_blocks(model)
    gen = torch.Generator(device=device).manual_seed(0)
    fill_(model, device, gen, skip={id(p) for b in blocks for p in b.parameters()})
    # streamed blocks are packed into host memory, so they are filled there, from one warm buffer; in-GPU ones
    # are filled where they stay
    materialize = HostFill(blocks, prec.param_dtype, device) if streamed else (lambda b: fill_(b, device, gen))
    options = EngineOptions(offload_device="cpu" if streamed else None, prefetch=prefetch or 0,
                            storage_dtype=prec.storage_dtype, force_copies=streamed and device.type == "cpu",
                            regenerate_directions=regenerate,
                            device_slots=(prefetch or 0) + 1 if fewer_slots else None)
    engine = ZOEngine(model, blocks, device, options, seed=0, materialize=materialize)
    engine.attach([list(model.parameters())])
    if streamed:
        materialize.release()  # every block is packed: the fill buffer is read no more
    return engine, model


def engine_step(engine: ZOEngine, model: Any, ids: torch.Tensor, prec: Precision) -> Callable[[int], float]:
    """One MeZO step through the engine (both forwards in lockstep, commit); returns L+. The loss is LMTask's:
    the LM head applied in chunks (zo2_lightning/tasks/head_loss.py), not over the full logits."""
    parts = split_head(model)  # the head only where the loss reads it, in chunks, as LMTask does
    chunk = chunk_positions(model.config.vocab_size, HEAD_CHUNK_MIB)

    def loss(key: Any) -> torch.Tensor:
        hidden = parts.backbone(input_ids=ids, use_cache=False).last_hidden_state  # no KV cache: training forwards
        return lm_loss_at(hidden, parts.head, ids, chunk)

    def step(i: int) -> float:
        # cache_enabled=False: autocast caches casts per tensor, but the engine rebinds a parameter's data between
        # the +eps and -eps runs, so a cached cast would hand one run the other's weights (Lightning's bf16-mixed
        # also disables the cache)
        autocast = (torch.autocast(ids.device.type, dtype=prec.autocast_dtype, cache_enabled=False)
                    if prec.autocast_dtype else contextlib.nullcontext())
        with torch.no_grad(), autocast:
            lp, lm = engine.run_pair(loss, step=i, eps=EPS)
        lp, lm = _finite(lp, lm)
        engine.commit(i, (lp - lm) / (2 * EPS), [LR], [0.0])
        return lp

    return step


def mezo_step(model: Any, ids: torch.Tensor) -> Callable[[int], float]:
    """MeZO's own loop (Malladi et al.): perturb in place +eps, forward, -2eps, forward, +eps, update, z drawn
    again from the step's seed at each pass; returns L+."""
    weights = list(model.parameters())

    def perturb(seed: int, scale: float) -> None:
        gen = torch.Generator(device=ids.device).manual_seed(seed)
        for p in weights:
            p.add_(torch.randn(p.shape, generator=gen, device=ids.device, dtype=p.dtype), alpha=scale)

    def step(i: int) -> float:
        seed = 1000 + i
        with torch.no_grad():
            perturb(seed, EPS)
            lp = model(input_ids=ids, labels=ids, use_cache=False).loss
            perturb(seed, -2 * EPS)
            lm = model(input_ids=ids, labels=ids, use_cache=False).loss
            perturb(seed, EPS)
            lp, lm = _finite(lp, lm)
            perturb(seed, -LR * (lp - lm) / (2 * EPS))
        return lp

    return step


def _finite(lp: torch.Tensor, lm: torch.Tensor) -> tuple[float, float]:
    lp, lm = float(lp), float(lm)  # a sync point, as in the strategy
    if not (math.isfinite(lp) and math.isfinite(lm)):
        raise FloatingPointError(f"non-finite loss: {lp}, {lm}")
    return lp, lm
