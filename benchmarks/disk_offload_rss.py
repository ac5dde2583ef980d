"""CPU: peak resident memory while fine-tuning a model stored on disk, against the model's size.

    python benchmarks/disk_offload_rss.py                      # 48 layers x hidden 1024: 2.4 GB of fp32 blocks
    python benchmarks/disk_offload_rss.py --layers 8 --steps 1 --no-save   # quick look

The model is built on the meta device and each block is materialized (random init) only to be written to
its file, so the full model never exists in memory. Then a few MeZO steps run with every block read from
disk for each use. The measurement runs in a fresh child process; its peak RSS (ru_maxrss) is compared with
the RSS it had before the engine attached (the runtime's own baseline: Python, torch, transformers, the
resident embeddings). Prints a table and appends it to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

from results import report  # benchmarks/results.py (scripts run from this folder)



def _rss_now_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def child(args: argparse.Namespace) -> None:
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    from zo2_lightning.engine import EngineOptions, ZOEngine, discover_blocks

    cfg = OPTConfig(vocab_size=8192, hidden_size=args.hidden, num_hidden_layers=args.layers,
                    ffn_dim=4 * args.hidden, num_attention_heads=max(1, args.hidden // 64),
                    max_position_embeddings=512, word_embed_proj_dim=args.hidden)
    with torch.device("meta"):
        model = OPTForCausalLM(cfg).eval()
    blocks = discover_blocks(model)
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    gen = torch.Generator().manual_seed(0)

    def fill(p: torch.nn.Parameter) -> None:
        value = 0.02 * torch.randn(p.shape, generator=gen) if p.dim() > 1 else torch.zeros(p.shape)
        torch.utils.swap_tensors(p, torch.nn.Parameter(value, requires_grad=p.requires_grad))

    for p in model.parameters():
        if id(p) not in in_blocks:
            fill(p)
    block_bytes = sum(p.numel() * 4 for p in model.parameters() if id(p) in in_blocks)
    baseline = _rss_now_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    ids = torch.randint(0, 8192, (1, args.seq), generator=gen)
    batch = {"input_ids": ids, "labels": ids}
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        options = EngineOptions(offload_device="disk", offload_dir=root, prefetch=0)
        engine = ZOEngine(model, blocks, torch.device("cpu"), options, seed=0,
                          materialize=lambda block: [fill(p) for p in block.parameters()])
        t0 = time.perf_counter()
        engine.attach([list(model.parameters())])
        t_attach = time.perf_counter() - t0
        times = []
        for step in range(args.steps):
            t0 = time.perf_counter()
            with torch.no_grad():
                lp, lm = engine.run_pair(lambda key: model(**batch).loss, step=step, eps=1e-3)
            engine.commit(step, (lp.item() - lm.item()) / 2e-3, [1e-6], [0.0])
            times.append(time.perf_counter() - t0)
        read, written = engine.streamer.disk.bytes_read, engine.streamer.disk.bytes_written
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(dict(block_bytes=block_bytes, baseline=baseline, peak_before=peak_before, peak=peak,
                          attach_s=t_attach, step_s=times, read=read, written=written, blocks=len(blocks))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where the block files go (default: the system temp dir)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    cmd = [sys.executable, __file__, "--child", "--layers", str(args.layers), "--hidden", str(args.hidden),
           "--seq", str(args.seq), "--steps", str(args.steps)] + (["--dir", args.dir] if args.dir else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    r = json.loads(out)
    gib = 2**30
    extra = r["peak"] - max(r["baseline"], r["peak_before"])
    lines = [
        f"### disk_offload_rss ({time.strftime('%Y-%m-%d %H:%M')}, CPU)",
        "",
        f"OPT-style model, {r['blocks']} blocks x hidden {args.hidden}, blocks stored fp32 on disk; batch 1 x seq"
        f" {args.seq}; {args.steps} MeZO steps, disk_flush_every=16",
        "",
        "| model blocks on disk | runtime baseline RSS | peak RSS | peak - baseline | (peak - baseline) / model |"
        " write-out at attach | step time | read per step |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {r['block_bytes'] / gib:.2f} GiB | {max(r['baseline'], r['peak_before']) / gib:.2f} GiB |"
        f" {r['peak'] / gib:.2f} GiB | {extra / gib:.2f} GiB | {extra / r['block_bytes']:.3f} |"
        f" {r['attach_s']:.1f} s | {sum(r['step_s']) / len(r['step_s']):.1f} s |"
        f" {r['read'] / args.steps / gib:.2f} GiB |",
        "",
    ]
    report(lines, save=not args.no_save)


if __name__ == "__main__":
    main()
