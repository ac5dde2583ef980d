"""CPU: one rank against gloo ranks in the data-parallel, perturbation-parallel and 2-D layouts; bytes and time per
step.

    python benchmarks/distributed_scaling.py                      # 6 layers, hidden 512 (OPT-style), both tables
    python benchmarks/distributed_scaling.py --layers 2 --steps 6 # quick look
    python benchmarks/distributed_scaling.py --tables perturbation

Prints the tables and appends them to benchmarks/RESULTS.md. Every run uses ``ZO2OffloadStrategy`` on the same
model; the multi-rank runs fork their ranks with Lightning's launcher. Table ``data``: one rank with the whole
batch against two ranks with half of it each (each rank gets ``cores / 2`` threads, the one-rank run all cores, so
the machine is the same). Table ``perturbation``: every rank limited to one thread, so that on a 2-core machine
2 ranks use the cores 1 rank could not: 1 rank making both runs of a step against 2 ranks in one group making one
run each on the same batch (``perturbation_parallel=2``), 2 data-parallel ranks with half the batch each, and
4 ranks as 2 groups x 2 (2-D) with half the batch per group (4 one-thread ranks on 2 cores are oversubscribed).
Per step it records, on rank 0, the wall time between consecutive steps after ``--warmup``, the CPU time the
process spent in it (its own work, which other load on a shared machine does not inflate the way it does the
wall time), the payload of every ``torch.distributed`` collective the rank issued, and the bytes the process wrote
(``/proc/self/io``: gloo's socket writes, headers included).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import time
from typing import Any

import lightning.pytorch as L
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch.utils.data import DataLoader
from transformers import OPTConfig, OPTForCausalLM

import zo2_lightning  # noqa: F401  (registers the strategy)
from results import report  # benchmarks/results.py (scripts run from this folder)
from zo2_lightning import ZO2OffloadStrategy, ZOModule, ZOSGD

_COLLECTIVES = ("all_reduce", "all_gather", "broadcast", "barrier")


class Task(ZOModule, L.LightningModule):
    def __init__(self, model: OPTForCausalLM) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> ZOSGD:
        return ZOSGD(self.parameters(), lr=1e-6, eps=1e-3)


class StepMeter(L.Callback):
    """On every rank: time, collective payload and bytes written between consecutive step starts; with
    ``threads``, the rank's torch threads limited to that many."""

    def __init__(self, out_dir: str, threads: int | None = None) -> None:
        self.out_dir, self.threads = out_dir, threads

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        self.payload, self.marks, self.saved = 0, [], [(name, getattr(c10d, name)) for name in _COLLECTIVES]
        for name in _COLLECTIVES:  # c10d too: broadcast_object_list & co. call these through module globals
            original = getattr(c10d, name)

            @functools.wraps(original)
            def counted(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
                tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
                self.payload += sum(t.numel() * t.element_size() for t in tensors[-1:])
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
            setattr(c10d, name, counted)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        with open("/proc/self/io") as f:
            written = int(dict(line.split(": ") for line in f.read().splitlines())["wchar"])
        self.marks.append((time.perf_counter(), self.payload, written, time.process_time()))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for name, original in self.saved:
            setattr(dist, name, original)
            setattr(c10d, name, original)
        torch.save(self.marks, os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))


def model_and_data(args: argparse.Namespace, total_batch: int) -> tuple[OPTForCausalLM, list[dict]]:
    cfg = OPTConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                    ffn_dim=4 * args.hidden, num_attention_heads=args.hidden // 64, max_position_embeddings=2048,
                    word_embed_proj_dim=args.hidden)
    torch.manual_seed(0)
    model = OPTForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (total_batch * (args.steps + args.warmup + 1), args.seq), generator=g)
    return model, [{"input_ids": row, "labels": row} for row in ids]


def run(args: argparse.Namespace, ranks: int, batch: int, directions: str = "shared", group: int = 1,
        threads: int | None = None) -> dict[str, float]:
    """``ranks`` ranks in groups of ``group`` (perturbation_parallel), ``batch`` examples per group and step."""
    model, data = model_and_data(args, batch * ranks // group)
    out_dir = tempfile.mkdtemp()
    strategy = ZO2OffloadStrategy(seed=0, directions=directions, perturbation_parallel=group, start_method="fork")
    saved = os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()
    if threads is not None:  # Lightning's launcher leaves the threads alone when OMP_NUM_THREADS is set
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    try:
        trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=ranks,
                            max_steps=args.steps + args.warmup + 1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[StepMeter(out_dir, threads)])
        trainer.fit(Task(model), DataLoader(data, batch_size=batch))
    finally:
        if saved[0] is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved[0]
        torch.set_num_threads(saved[1])
    marks = torch.load(os.path.join(out_dir, "rank0.pt"))[args.warmup:]
    deltas = [[b - a for a, b in zip(m0, m1)] for m0, m1 in zip(marks, marks[1:])]
    return {
        "step_ms": 1e3 * statistics.median(d[0] for d in deltas),
        "payload": statistics.median(d[1] for d in deltas),
        "written": statistics.median(d[2] for d in deltas),
        "cpu_ms": 1e3 * statistics.median(d[3] for d in deltas),  # rank 0's CPU time: its work, whatever the load
        "params": sum(p.numel() for p in model.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8, help="total batch per step (split over the ranks)")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--tables", nargs="+", choices=["data", "perturbation"], default=["data", "perturbation"])
    parser.add_argument("--no-save", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()

    b, half = args.batch, args.batch // 2
    lines = []
    if "data" in args.tables:
        rows = [(f"1 rank x batch {b}", run(args, 1, b))]
        rows.append((f"2 ranks x batch {half}, shared z", run(args, 2, half)))
        rows.append((f"2 ranks x batch {half}, independent z", run(args, 2, half, "independent")))
        lines += _table(args, "data parallel: the total batch split over the ranks; 1 rank all cores, each of 2"
                              " ranks half of them", rows)
    if "perturbation" in args.tables:
        rows = [(f"1 rank x batch {b} (both runs of a step)", run(args, 1, b, threads=1))]
        rows.append((f"2 ranks, 1 group x batch {b} (perturbation_parallel=2: one run each)",
                     run(args, 2, b, group=2, threads=1)))
        rows.append((f"2 ranks x batch {half}, shared z (data parallel)", run(args, 2, half, threads=1)))
        rows.append((f"4 ranks, 2 groups x 2, batch {half} per group (2-D)", run(args, 4, half, group=2, threads=1)))
        lines += _table(args, f"one thread per rank: the same global batch of {b} in every row; 2 ranks use 2"
                              " cores, 4 ranks share them", rows)
    report(lines, save=not args.no_save)


def _table(args: argparse.Namespace, what: str, rows: list[tuple[str, dict[str, float]]]) -> list[str]:
    base, base_cpu, params = rows[0][1]["step_ms"], rows[0][1]["cpu_ms"], rows[0][1]["params"]
    lines = [
        f"### distributed_scaling ({time.strftime('%Y-%m-%d %H:%M')}, CPU, {os.cpu_count()} cores, gloo)",
        "",
        f"OPT-style model: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, {params / 1e6:.1f} M"
        f" params ({4 * params / 2**20:.0f} MiB fp32); seq {args.seq}; {what}; median of {args.steps} steps after"
        f" {args.warmup} warm-up steps",
        "",
        "| run | median step (ms) | step / 1-rank step | rank 0 CPU per step (ms) | CPU / 1-rank CPU |"
        " collective payload per step (B) | bytes written per step (B) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in rows:
        lines.append(f"| {name} | {r['step_ms']:.1f} | {r['step_ms'] / base:.3f} | {r['cpu_ms']:.1f} |"
                     f" {r['cpu_ms'] / base_cpu:.3f} | {r['payload']:.0f} | {r['written']:.0f} |")
    return [*lines, ""]


if __name__ == "__main__":
    main()
