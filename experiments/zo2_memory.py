"""python experiments/zo2_memory.py [--sizes 1.3b,2.7b,6.7b,13b,30b,66b,175b] [--methods zo2,mezo] [--out DIR]

Hardware: one CUDA GPU, and host memory for the whole model (fp16: 2 bytes per parameter, 350 GB for
OPT-175B). Smoke form (CPU, tiny shapes, seconds): ``python experiments/zo2_memory.py --smoke``.

Reproduces ZO2's GPU-memory table (Wang et al., 2025, arXiv 2503.12668): peak working-device memory of ZO2
(blocks streamed from the CPU, ``offload=cpu_overlap``) against in-GPU MeZO (``offload=none``) for random-init
OPT of the published shapes, 16-bit weights (bf16 here, fp16 in ZO2), batch 1, sequence 2048 (``conf/experiment/zo2_memory.yaml``); and the
throughput (tokens/s) of both on the same setting. MeZO stops with "oom" once the model outgrows the GPU; ZO2
reports OPT-175B in about 18 GB. Writes ``zo2_memory.csv``/``.md`` and one run folder per point under --out;
``python experiments/summarize.py DIR`` plots memory and tokens/s against model size.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from zo2_lightning.reproduce import run_config, write_table

SIZES = ("1.3b", "2.7b", "6.7b", "13b", "30b", "66b", "175b")
METHODS = {"zo2": "offload=cpu_overlap", "mezo": "offload=none"}
# The published shapes shrunk for a CPU smoke run: hidden / 64 and layers / 8, so sizes stay ordered.
SMOKE_SHAPES = {"1.3b": (32, 3), "2.7b": (40, 4), "6.7b": (64, 4), "13b": (80, 5)}


def overrides_for(size: str, method: str, precision: str, smoke: bool) -> list[str]:
    """The Hydra overrides of one table cell."""
    overrides = ["experiment=zo2_memory", f"model=opt-{size}", METHODS[method], f"precision={precision}"]
    if smoke:
        hidden, layers = SMOKE_SHAPES[size]
        overrides += [
            "trainer=cpu", "trainer.max_steps=3", "trainer.limit_val_batches=0",
            "task.seq_len=32", "task.num_train=8", "task.num_val=0",
            f"model.shape.hidden_size={hidden}", f"model.shape.word_embed_proj_dim={hidden}",
            f"model.shape.ffn_dim={4 * hidden}", f"model.shape.num_hidden_layers={layers}",
            "model.shape.num_attention_heads=2", "model.shape.vocab_size=264",
        ]
    return overrides


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the grid and write the table; returns its rows."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--methods", default="zo2,mezo")
    parser.add_argument("--precision", default="bf16_true",
                        help="a conf/precision option (bf16_true: 16-bit weights end to end, as ZO2's fp16;"
                             " fp16_storage: fp32 working copies, twice the GPU bytes)")
    parser.add_argument("--out", default="results/zo2_memory")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, fp32")
    args = parser.parse_args(argv)
    sizes = [s for s in args.sizes.split(",") if s]
    if args.smoke:
        sizes = [s for s in sizes if s in SMOKE_SHAPES][:2] or list(SMOKE_SHAPES)[:2]
        args.precision = "fp32"
    rows = []
    for size in sizes:
        for method in args.methods.split(","):
            out = f"{args.out}/runs/opt-{size}_{method}"
            result = run_config(overrides_for(size, method, args.precision, args.smoke), out)
            row = {"model": f"opt-{size}", "method": method, "params_b": result.get("params", 0) / 1e9,
                   **{k.removeprefix("perf/run_"): v for k, v in result.items() if k.startswith("perf/run_")},
                   "status": result["status"]}
            rows.append(row)
            print(f"opt-{size} {method}: {row.get('peak_mem_gb', float('nan')):.3f} GB peak,"
                  f" {row.get('tokens_per_s', float('nan')):.1f} tokens/s ({row['status']})")
    columns = ["model", "method", "params_b", "peak_mem_gb", "tokens_per_s", "step_time_s",
               "gb_uploaded_per_step", "gb_offloaded_per_step", "status"]
    print(write_table(rows, columns, f"{args.out}/zo2_memory.csv"))
    return rows


if __name__ == "__main__":
    main()
