"""CPU: do 16-bit weights lose MeZO updates? fp32 vs bf16 storage / bf16 weights, round-to-nearest vs stochastic.

    python benchmarks/storage_precision.py                   # 4 seeds x 400 steps, ~5 minutes on 2 idle cores
    python benchmarks/storage_precision.py --seeds 0 --steps 50 --no-save

A tiny OPT-style model fits a fixed set of token sequences with MeZO-SGD on its blocks (the resident
embeddings and head, always fp32, stay frozen) at a small learning rate, so that
a typical update (lr * |g * z|) sits below half a bf16 ulp of a typical weight. The engine (no Lightning)
streams the blocks with their host copies in fp32, in bf16 with round-to-nearest write-back, and in bf16
with seeded stochastic rounding (fp32 working copies); then with the whole model in bf16 (``bf16-weights``:
precision='bf16-true', compute in bf16, each update in fp32 rounded back to the bf16 weights) with either
rounding; within a seed, every variant starts from the same weights and sees the same data and directions.
Each seed draws its own model, batch and directions, so the table gives each figure as the mean and the
standard deviation over the seeds (a ratio of two small loss drops moves from one draw to the next).
Prints the table and appends it to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import OPTConfig, OPTForCausalLM

from results import report  # benchmarks/results.py (scripts run from this folder)
from zo2_lightning.engine import EngineOptions, ZOEngine, discover_blocks


def build(seed: int = 0) -> OPTForCausalLM:
    cfg = OPTConfig(vocab_size=128, hidden_size=64, num_hidden_layers=4, ffn_dim=256, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=64, dropout=0.0)
    torch.manual_seed(seed)
    model = OPTForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    for block in discover_blocks(model):  # every variant starts from the same bf16-representable weights
        for p in block.parameters():
            if not p.data.any():  # zero-initialised biases: give them a pretrained model's small spread
                p.data = 0.02 * torch.randn(p.shape, generator=g)
            p.data = p.data.to(torch.bfloat16).float()
    return model


@torch.no_grad()
def loss_of(model, batch) -> float:
    return model(**batch).loss.item()


def train(storage: str, steps: int, lr: float, eps: float, batch: dict, seed: int) -> tuple[float, float, float]:
    model = build(seed)
    weights16 = storage.startswith("bf16-weights")
    if weights16:
        model.to(torch.bfloat16)  # the blocks' values are bf16-representable already: the same starting point
    dtype = None if storage == "fp32" or weights16 else torch.bfloat16
    options = EngineOptions(storage_dtype=dtype, stochastic_rounding=not storage.endswith("nearest"))
    engine = ZOEngine(model, discover_blocks(model), torch.device("cpu"), options, seed=7 + seed)
    # only the streamed blocks are trained: the resident part (embeddings, head, final norm) is always fp32,
    # so training it too would hide what block storage does
    engine.attach([[p for b in discover_blocks(model) for p in b.parameters()]])
    start = loss_of(model, batch)
    t0 = time.perf_counter()
    for step in range(steps):
        with torch.no_grad():
            lp, lm = engine.run_pair(lambda s: model(**batch).loss, step=step, eps=eps)
        engine.commit(step, (lp.item() - lm.item()) / (2 * eps), [lr], [0.0])
    elapsed = time.perf_counter() - t0
    engine.flush()
    end = loss_of(model, batch)
    engine.detach()
    return start, end, elapsed / steps


VARIANTS = ("fp32", "bf16-nearest", "bf16-stochastic", "bf16-weights-nearest", "bf16-weights-stochastic")


def spread(values: list[float], digits: int) -> str:
    """``mean ± std`` over the seeds (the sample standard deviation; the mean alone for one seed)."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--seeds", default="0,1,2,3", help="comma list: each draws the model, the batch, the directions")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    seeds = [int(x) for x in args.seeds.split(",") if x]
    runs: dict[str, list[tuple[float, float, float]]] = {v: [] for v in VARIANTS}
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 128, (8, 24), generator=g)
        batch = {"input_ids": ids, "labels": ids}
        for variant in VARIANTS:
            runs[variant].append(train(variant, args.steps, args.lr, args.eps, batch, seed))
        print(f"seed {seed}: " + ", ".join(f"{v} {runs[v][-1][0] - runs[v][-1][1]:+.5f}" for v in VARIANTS),
              flush=True)
    fp32 = runs["fp32"]
    lines = [
        f"### storage_precision ({time.strftime('%Y-%m-%d %H:%M')}, CPU)",
        "",
        f"tiny OPT (4 layers, hidden 64), {args.steps} MeZO steps, lr {args.lr}, eps {args.eps}, fixed batch 8 x 24;"
        f" {len(seeds)} seeds ({args.seeds}: model, batch and directions), mean ± standard deviation over them",
        "",
        "bf16-nearest / -stochastic: fp32 working weights, bf16 host copies; bf16-weights-*: the model in bf16"
        " (precision='bf16-true'), its own start loss; loss drop = start - end, share = drop / fp32's drop of the"
        " same seed",
        "",
        "| block storage | loss drop | end / fp32 end | share of fp32's loss drop | ms/step |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, results in runs.items():
        drops = [start - end for start, end, _ in results]
        shares = [d / (f[0] - f[1]) if f[0] != f[1] else float("nan") for d, f in zip(drops, fp32)]
        ends = [r[1] / f[1] for r, f in zip(results, fp32)]
        lines.append(f"| {name} | {spread(drops, 5)} | {spread(ends, 5)} | {spread(shares, 2)} |"
                     f" {spread([1000 * r[2] for r in results], 1)} |")
    report(lines, save=not args.no_save)


if __name__ == "__main__":
    main()
