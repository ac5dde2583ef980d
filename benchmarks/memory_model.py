"""GPU memory of one ZO training step, predicted on the CPU: OPT 1.3B..175B at ZO2's setting, beside ZO2's figures.

    python benchmarks/memory_model.py                        # every size, the three option sets; appends to RESULTS.md
    python benchmarks/memory_model.py --sizes 1.3b 13b --no-save

ZO2's setting: 16-bit weights (bf16 here, the same bytes as ZO2's fp16), batch 1, sequence 2048, MeZO-SGD, the LM
loss over every position (the chunked LM head of ``LMTask``, 256 MiB of logits at a time).

What is computed and what is measured:

- **engine buffers** (device slots, block scratch, the parameters outside the blocks and their perturbed copies):
  computed from the full-size model's shapes on the meta device by ``zo2_lightning.engine.memory``, whose
  arithmetic ``tests/engine/test_memory.py`` holds to what the simulated device counts the engine allocating;
- **forward temporaries** (activations of every run in the lockstep, attention, the chunked head and its fp32
  loss, the deferred update's fp32 chunks): measured. The engine runs two real steps of the full-size model (both
  perturbed forwards in lockstep, the commit, then the next step with its deferred update) on the meta device,
  where every tensor has its shape and no storage, and the simulated device counts every tensor the forwards
  create for as long as it lives. Attention is counted as a fused kernel: torch's flash-attention kernel's output
  and float32 log-sum-exp, what FlashAttention keeps on a GPU; ``tests/benchmarks/test_memory_model.py`` checks the
  meta count equals what the same step allocates on the CPU at a size that fits;
- **bytes per step**: every block up once in its storage dtype, its trainable bytes back once; the link-bound
  step time is max(up, down) / bandwidth where the two directions overlap (prefetch + 2 device slots) and
  (up + down) / bandwidth where an upload waits for the write-back (prefetch + 1).

Not included, as in ``torch.cuda.max_memory_allocated``: the CUDA context and the allocator's rounding.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_helpers import GB, ZO2_PUBLISHED_GB, meta_model, opt_config  # noqa: E402
from results import report  # noqa: E402
from zo2_lightning.engine import EngineOptions, ZOEngine, discover_blocks  # noqa: E402
from zo2_lightning.engine.memory import engine_device_bytes  # noqa: E402
from zo2_lightning.tasks.collate import IGNORE  # noqa: E402
from zo2_lightning.tasks.head_loss import chunk_positions, split_head  # noqa: E402

SIZES = ("1.3b", "2.7b", "6.7b", "13b", "30b", "66b", "175b")
SEQ, BATCH, HEAD_CHUNK_MIB = 2048, 1, 256.0
#: option sets: the defaults, the README's least-memory choice, and that with each layer streamed in parts
OPTION_SETS = {
    "default": EngineOptions(),
    "least-memory": EngineOptions(regenerate_directions=True, prefetch=1, device_slots=2),
    "least-memory+split": EngineOptions(regenerate_directions=True, prefetch=1, device_slots=2, split_blocks=True),
}
GOAL = 0.75  # of ZO2's figure, for the least-memory options


# ---------------------------------------------------------------------------------------------- measured part
def lm_loss_every_position(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor,
                           chunk: int) -> torch.Tensor:
    """``tasks.head_loss.lm_loss_at`` when every position is labelled, with its row selection made by index, so it
    runs on the meta device (a boolean mask's rows depend on the data); it allocates what ``lm_loss_at`` does."""
    target = labels[:, 1:].flatten()
    keep = target != IGNORE
    rows = torch.arange(target.numel(), device=target.device)  # every row is kept
    del keep
    states = hidden[:, :-1].flatten(0, 1).index_select(0, rows)
    target = target.index_select(0, rows)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, target.numel(), chunk):
        logits = head(states[start: start + chunk]).float()
        total = total + F.cross_entropy(logits, target[start: start + chunk], reduction="sum")
    return total / target.numel()


def _fused_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """``F.scaled_dot_product_attention`` as torch's fused flash kernel runs it (the meta device would otherwise
    decompose it and materialise the seq x seq scores a GPU never holds)."""
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)
    return out


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    real = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def forward_temporaries(model: torch.nn.Module, device: torch.device, seq: int = SEQ, batch: int = BATCH,
                        steps: int = 2, head_chunk_mib: float = HEAD_CHUNK_MIB) -> int:
    """Peak bytes the forwards of ``steps`` ZO steps create, beyond the engine's own buffers, counted by the
    simulated device on ``device`` (``meta`` for any size, or ``cpu``)."""
    engine = ZOEngine(model, discover_blocks(model), device, EngineOptions(offload_device=None, simulated_device=0),
                      seed=0)
    engine.attach([list(model.parameters())])
    parts = split_head(model)
    chunk = chunk_positions(model.config.vocab_size, head_chunk_mib)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)

    def loss(key):
        hidden = parts.backbone(input_ids=ids, use_cache=False).last_hidden_state
        return lm_loss_every_position(hidden, parts.head, ids, chunk)

    cm = fused_attention() if device.type == "meta" else contextlib.nullcontext()
    try:
        with cm, torch.no_grad():
            for step in range(steps):
                engine.run_pair(loss, step, 1e-3)
                engine.commit(step, 1.0, [1e-6], [0.0])  # g's value does not change what is allocated
        return engine.ops.peak_temporaries
    finally:
        engine.detach()


# ---------------------------------------------------------------------------------------------- computed part
def step_traffic(model: torch.nn.Module, options: EngineOptions) -> tuple[int, int]:
    """Bytes one step moves: every streamed block up in its storage dtype, its trainable bytes back."""
    blocks = discover_blocks(model)
    params = [p for b in blocks for p in b.parameters()]
    width = (lambda p: (options.storage_dtype or p.dtype).itemsize)  # noqa: E731
    up = sum(p.numel() * width(p) for p in params)
    down = sum(p.numel() * width(p) for p in params if p.requires_grad)
    return up, down


def link_bound_s(up: int, down: int, options: EngineOptions, bandwidth: float) -> float:
    overlap = options.slot_count >= options.prefetch + 2  # a spare slot lets uploads run beside write-backs
    return (max(up, down) if overlap else up + down) / bandwidth


def predict(size: str) -> dict[str, dict]:
    """Per option set: the components (bytes), the total, and the traffic of one step at ``size``."""
    model = meta_model(opt_config(size), torch.bfloat16)
    temporaries = forward_temporaries(model, torch.device("meta"))
    blocks = discover_blocks(model)
    out = {}
    for name, options in OPTION_SETS.items():
        parts = engine_device_bytes(model, blocks, options)
        parts["temporaries"] = temporaries
        up, down = step_traffic(model, options)
        out[name] = {"parts": parts, "total": sum(parts.values()), "up": up, "down": down, "options": options}
    return out


def tables(sizes: list[str]) -> list[str]:
    rows = {size: predict(size) for size in sizes}
    lines = [f"OPT, bf16 weights, batch {BATCH} x seq {SEQ}, MeZO-SGD, LM loss on every position (chunked head,"
             f" {HEAD_CHUNK_MIB:.0f} MiB); GB = 1e9 bytes. Options: "
             + "; ".join(f"{n}: {_describe(o)}" for n, o in OPTION_SETS.items()), "",
             "| OPT | ZO2 (GB) | " + " | ".join(f"{n} (GB) | / ZO2" for n in OPTION_SETS) + " |",
             "| --- | ---: | " + " | ".join("---: | ---:" for _ in OPTION_SETS) + " |"]
    for size, per in rows.items():
        zo2 = ZO2_PUBLISHED_GB[size]
        cells = " | ".join(f"{per[n]['total'] / GB:.2f} | {per[n]['total'] / GB / zo2:.2f}" for n in OPTION_SETS)
        lines.append(f"| {size} | {zo2:.2f} | {cells} |")
    lines += ["", "Where the bytes go (GB): engine buffers computed from the shapes, temporaries measured (meta run of"
              " the real step)", "",
              "| OPT | options | slots | block scratch | resident params | resident copies + z | temporaries |"
              " total |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for size, per in rows.items():
        for name in OPTION_SETS:
            p = per[name]["parts"]
            scratch = sum(v for k, v in p.items() if k.startswith("scratch/"))
            copies = p["resident/copies"] + p["resident/z"]
            resident = p["resident/params"] + p["resident/frozen"]
            lines.append(f"| {size} | {name} | {p['slots'] / GB:.2f} | {scratch / GB:.2f} | {resident / GB:.2f} |"
                         f" {copies / GB:.2f} | {p['temporaries'] / GB:.2f} | {per[name]['total'] / GB:.2f} |")
    lines += ["", "Bytes per step and the link-bound step time they imply (overlapped directions where a spare slot"
              " lets uploads run beside write-backs)", "",
              "| OPT | up (GB) | back (GB) | default @25 GB/s | @55 GB/s | least-memory @25 GB/s | @55 GB/s |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for size, per in rows.items():
        d, m = per["default"], per["least-memory"]
        times = [link_bound_s(r["up"], r["down"], r["options"], bw * 1e9) for r in (d, m) for bw in (25, 55)]
        lines.append(f"| {size} | {d['up'] / GB:.1f} | {d['down'] / GB:.1f} | "
                     + " | ".join(f"{t:.2f} s" for t in times) + " |")
    misses = [f"{s} ({n})" for s, per in rows.items() for n in OPTION_SETS if n != "default"
              and per[n]["total"] / GB > GOAL * ZO2_PUBLISHED_GB[s]]
    lines += ["", f"Goal for the least-memory options: <= {GOAL} x ZO2 at every size: "
              + ("met by both least-memory sets." if not misses else "missed at " + ", ".join(misses) + ".")]
    return lines


def _describe(o: EngineOptions) -> str:
    bits = [f"prefetch {o.prefetch}", f"{o.slot_count} slots"]
    if o.regenerate_directions:
        bits.append("regenerate_directions")
    if o.split_blocks:
        bits.append("split_blocks")
    return ", ".join(bits)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="*", default=list(SIZES), choices=SIZES)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    report(tables(args.sizes), save=not args.no_save)


if __name__ == "__main__":
    main()
