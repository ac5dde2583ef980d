"""GPU: peak memory and tokens/s of streamed MeZO per OPT size, against ZO2's published peak, in-GPU MeZO and the
bus's limit, all in one run of a few minutes.

    python benchmarks/gpu_offload.py --out $OUT/gpu_offload.json     # OPT 1.3b..30b, about 5 minutes on an H200
    python benchmarks/gpu_offload.py --sizes 1.3b,13b --precisions bf16_weights --steps 5
    python benchmarks/gpu_offload.py --smoke                          # CPU, tiny shapes, seconds: the same code paths
    python benchmarks/gpu_offload.py --table-from gpu_offload.json    # the table of a run that was cut off
    bash benchmarks/gpu_all.sh                                        # the GPU machine's one command: this + GPU tests

First the bus: pinned and pageable host<->device copy rates of a 1 GiB buffer, and how fast host memory pins.
Then, per OPT size (random init of the published shape, built on the meta device; the engine's ``materialize``
fills each block just before packing it, so no full-size model is ever built) and per precision
(gpu_helpers.PRECISIONS), ``ZOEngine`` runs MeZO steps (both perturbed forwards in lockstep, the deferred update
applied on the next upload) in two settings:

- ``zo2``: batch 1 x seq 2048, ZO2's memory/throughput setting;
- ``mezo``: batch 16 x seq 512, MeZO's batch (its prompts are short; 512 bounds them);

each in these modes: ``streamed`` (blocks in pinned host memory, ``prefetch`` blocks uploaded ahead),
``streamed regen`` (16-bit weights only: no z kept, each run's copy drawn afresh), ``streamed min-mem`` (regen
and ``prefetch + 1`` block buffers, so an upload waits for the write-back of the buffer it reuses), ``in-GPU``
(the same engine with everything on the GPU, where it fits) and ``MeZO ref`` (MeZO's own loop: in-place
perturbation, z regenerated from the step seed, 16-bit weights only). The engine rows take LMTask's loss (the
LM head applied in chunks of 256 MiB of logits); MeZO ref takes the model's own loss over full logits. Per row: peak
``torch.cuda.max_memory_allocated`` over the timed steps (GB = 1e9 bytes), seconds per step (``--warmup`` steps,
then the mean of ``--steps``), tokens/s (batch x seq per step, counted once although a step runs two
forwards), bytes uploaded and written back per step, and the link-bound step time (those bytes at the measured
pinned rates). Sizes whose host copies do not fit the host RAM are skipped, and so are sizes that would
overrun ``--budget-s``; a failing row (OOM, ...) is recorded and the run goes on. The rows go to ``--out`` as
JSON after every row; the table is printed and appended to benchmarks/RESULTS.md at the end (not by ``--smoke``,
which only exercises the code: its table, of a CPU, is printed and never saved).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from gpu_helpers import (  # benchmarks/gpu_helpers.py (scripts run from this folder)
    CONF_MODEL, GB, GIB, PRECISIONS, SMOKE_SHAPES, Precision, device_bytes_needed, fill_, fits_in_host,
    host_bytes_needed, link_bound_s, measure_bandwidth, meta_model, pinned_host_bytes, release_memory,
)
from gpu_steps import EPS, LR, Size, build_engine, engine_step, mezo_step  # benchmarks/gpu_steps.py
from gpu_table import render  # benchmarks/gpu_table.py
from results import report
from zo2_lightning.models import available_host_bytes

SIZES = ("1.3b", "2.7b", "6.7b", "13b", "30b")
SETTINGS = {"zo2": (1, 2048), "mezo": (16, 512)}  # name -> (batch, seq)
SMOKE_SETTINGS = {"zo2": (1, 64), "mezo": (4, 32)}


class Interrupted(BaseException):
    """SIGTERM (the wrapper's timeout): stop measuring, keep what was measured. A BaseException, so the
    per-row ``except Exception`` does not swallow it."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Interrupted(f"signal {signum}")


class Bench:
    """One run: the rows measured so far, saved as JSON after each."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device("cpu" if args.smoke else "cuda")
        self.cuda = self.device.type == "cuda"
        self.settings = SMOKE_SETTINGS if args.smoke else SETTINGS
        self.t0 = time.perf_counter()
        self.result: dict = {"meta": self._meta(), "bandwidth": None, "rows": [], "finished": False}

    # ------------------------------------------------------------------ the run
    def run(self) -> None:
        a = self.args
        meta = self.result["meta"]
        self.log(f"device {meta.get('gpu', 'cpu')}, torch {torch.__version__}, host available"
                 f" {meta['host_available_gb']:.1f} GB, budget {a.budget_s:.0f} s")
        nbytes = (16 << 20) if a.smoke else a.bw_mib << 20
        try:
            bw = measure_bandwidth(self.device, nbytes, reps=2 if a.smoke else 5)
            self.log("bus GB/s: " + ", ".join(f"{k} {v:.1f}" for k, v in bw.items()))
        except Exception as e:  # noqa: BLE001 - the rows are still worth having, without their link bound
            bw = {}
            self.log(f"bandwidth test failed: {_status(e)}")
        self.result["bandwidth"] = bw
        self.save()
        rate = None  # seconds per parameter of the last size: the estimate for the next
        for name in a.sizes:
            size = Size.of(name, a.smoke)
            pinned = host_bytes_needed(size.per_block, 2, pinned=self.cuda)  # 16-bit host copies
            estimate = max(rate * size.params if rate else 0.0, 1.5 * pinned / (bw.get("pin_alloc", 1.0) * GB))
            left = a.budget_s - self.elapsed()
            if estimate > left:
                self.skip_size(size, f"skipped: time budget (needs ~{estimate:.0f} s, {max(left, 0):.0f} s left)")
                continue
            t, measured = time.perf_counter(), self.n_ok()
            for prec in a.precisions:
                for mode in self.modes(prec):
                    if self.elapsed() > a.budget_s:
                        self.skip(size, prec, mode, "skipped: time budget")
                    else:
                        self.measure(size, prec, mode)
                    release_memory(self.device, host_cache=False)  # engines hold cycles through their hooks
            release_memory(self.device)  # this size's pinned blocks (cached by torch) are no use to the next
            if self.n_ok() > measured:  # a size skipped whole (host RAM) says nothing about the time
                rate = (time.perf_counter() - t) / size.params

    def n_ok(self) -> int:
        return sum(r["status"] == "ok" for r in self.result["rows"])

    def modes(self, prec: str) -> list[str]:
        modes = [f"streamed p{k}" for k in self.args.prefetch]
        if PRECISIONS[prec].storage_dtype is None:  # 16-bit weights: also the engine keeping no z (regen), and
            # with prefetch + 1 block buffers on top (min-mem)
            modes += [f"streamed p{self.args.prefetch[0]} {lean}" for lean in ("regen", "min-mem")]
        modes.append("in-GPU")
        return modes + (["MeZO ref"] if PRECISIONS[prec].storage_dtype is None else [])

    def measure(self, size: Size, prec_name: str, mode: str) -> None:
        """Build the model for ``mode`` and time every setting on it (or record why not)."""
        prec = PRECISIONS[prec_name]
        streamed = mode.startswith("streamed")
        why = self.wont_fit(size, prec, mode)
        if why:
            return self.skip(size, prec_name, mode, why)
        t = time.perf_counter()
        try:
            if mode == "MeZO ref":
                engine, model = None, meta_model(size.cfg, prec.param_dtype)
                fill_(model, self.device, torch.Generator(device=self.device).manual_seed(0))
            else:
                prefetch = int(mode.removeprefix("streamed p").split()[0]) if streamed else None
                engine, model = build_engine(size, prec, self.device, prefetch,
                                             regenerate=mode.endswith(("regen", "min-mem")),
                                             fewer_slots=mode.endswith("min-mem"))
        except Exception as e:  # noqa: BLE001 - recorded, and the run goes on
            return self.skip(size, prec_name, mode, _status(e))
        build_s = time.perf_counter() - t
        pinned = pinned_host_bytes() if streamed and self.cuda else None
        copies = sum(size.per_block) * (prec.storage_dtype or prec.param_dtype).itemsize
        self.log(f"{size.name} {prec_name} {mode}: built in {build_s:.1f} s"
                 + (f", {pinned / GB:.1f} GB pinned for {copies / GB:.1f} GB of block host copies"
                    if pinned is not None else ""))
        for k, setting in enumerate(self.settings):
            ids = self.batch(setting, size.cfg.vocab_size)
            step = mezo_step(model, ids) if engine is None else engine_step(engine, model, ids, prec)
            moved = (lambda: (engine.streamer.bytes_uploaded, engine.streamer.bytes_offloaded)) if streamed else None
            first = k * (self.args.warmup + self.args.steps)  # step numbers run on across settings, as in training
            row = self.timed(size, prec_name, mode, setting, step, moved, first)
            self.add(dict(row, build_s=build_s, pinned_gb=None if pinned is None else pinned / GB))

    def wont_fit(self, size: Size, prec: Precision, mode: str) -> str | None:
        """Why ``mode`` cannot run at ``size`` on this machine, or None."""
        if mode.startswith("streamed"):
            need = host_bytes_needed(size.per_block, (prec.storage_dtype or prec.param_dtype).itemsize, self.cuda)
            avail = available_host_bytes()
            if not fits_in_host(need, avail):
                return f"skipped: host copies need {need / GB:.0f} GB, {(avail or 0) / GB:.0f} GB available"
            return None
        if not self.cuda:
            return None
        if mode == "MeZO ref":
            need = size.params * prec.param_dtype.itemsize + 12 * GIB
        else:
            need = device_bytes_needed(sum(size.per_block), max(size.per_block), size.rest, prec, margin=12 * GIB)
        if need > 0.95 * torch.cuda.get_device_properties(self.device).total_memory:
            return f"skipped: needs ~{need / GB:.0f} GB on the GPU"
        return None

    def batch(self, setting: str, vocab: int) -> torch.Tensor:
        batch, seq = self.settings[setting]
        return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1)).to(self.device)

    def timed(self, size: Size, prec: str, mode: str, setting: str, step: Callable[[int], float],
              moved: Callable[[], tuple[int, int]] | None, first: int) -> dict:
        """``--warmup`` steps, then ``--steps`` timed ones; a failure becomes the row's status. ``moved`` gives the
        streamer's byte counters (streamed rows only: in-GPU copies never cross the bus)."""
        a = self.args
        sync = (lambda: torch.cuda.synchronize(self.device)) if self.cuda else (lambda: None)
        try:
            if self.cuda:
                sync()
                torch.cuda.reset_peak_memory_stats(self.device)  # persistent buffers count: peak >= allocated
            static = torch.cuda.memory_allocated(self.device) / GB if self.cuda else None
            for i in range(first, first + a.warmup):
                step(i)
            sync()
            up0, down0 = moved() if moved else (0, 0)
            t = time.perf_counter()
            for i in range(first + a.warmup, first + a.warmup + a.steps):
                loss = step(i)
            sync()
            step_s = (time.perf_counter() - t) / a.steps
            up1, down1 = moved() if moved else (0, 0)
        except Exception as e:  # noqa: BLE001 - recorded, and the run goes on
            return self.row(size, prec, mode, setting, _status(e))
        peak = torch.cuda.max_memory_allocated(self.device) / GB if self.cuda else None
        batch, seq = self.settings[setting]
        up, down = (up1 - up0) / a.steps, (down1 - down0) / a.steps
        bw = self.result["bandwidth"]
        bus = dict(up_gb_step=up / GB, down_gb_step=down / GB,
                   link_bound_s=link_bound_s(up, down, bw) if bw else None) if moved else {}
        return self.row(size, prec, mode, setting, "ok", peak_gb=peak, static_gb=static, step_s=step_s,
                        tokens_per_s=batch * seq / step_s, loss=loss, **bus)

    # ------------------------------------------------------------------ bookkeeping
    def row(self, size: Size, precision: str, mode: str, setting: str, status: str, **fields: Any) -> dict:
        batch, seq = self.settings[setting]
        return dict(size=size.name, params_b=size.params / 1e9, precision=precision, mode=mode, setting=setting,
                    batch=batch, seq=seq, status=status, peak_gb=None, static_gb=None, step_s=None,
                    tokens_per_s=None, up_gb_step=None, down_gb_step=None, link_bound_s=None, build_s=None,
                    pinned_gb=None, loss=None) | fields

    def skip(self, size: Size, precision: str, mode: str, status: str) -> None:
        for setting in self.settings:
            self.add(self.row(size, precision, mode, setting, status))

    def skip_size(self, size: Size, status: str) -> None:
        for prec in self.args.precisions:
            for mode in self.modes(prec):
                self.skip(size, prec, mode, status)

    def add(self, r: dict) -> None:
        self.result["rows"].append(r)
        self.save()
        what = f"{r['size']} {r['precision']} {r['mode']} {r['setting']}"
        if r["status"] != "ok":
            return self.log(f"{what}: {r['status']}")
        peak = "" if r["peak_gb"] is None else f"peak {r['peak_gb']:.2f} GB, "
        bus = "" if r["link_bound_s"] is None else (
            f", {r['up_gb_step']:.2f} GB up, link-bound {r['link_bound_s']:.3f} s")
        self.log(f"{what}: {peak}{r['step_s']:.3f} s/step, {r['tokens_per_s']:.0f} tok/s{bus}")

    def save(self) -> None:
        if not self.args.out:
            return
        path = Path(self.args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.result, indent=1))
        os.replace(tmp, path)  # a kill mid-write leaves the previous file whole

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} +{self.elapsed():6.1f}s] {msg}", flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def _meta(self) -> dict:
        a = self.args
        meta = dict(argv=sys.argv[1:], smoke=a.smoke, torch=torch.__version__, python=platform.python_version(),
                    cpus=os.cpu_count(), host_available_gb=(available_host_bytes() or 0) / GB,
                    settings=self.settings, warmup=a.warmup, steps=a.steps, eps=EPS, lr=LR,
                    precisions={p: PRECISIONS[p].note for p in a.precisions}, started=time.strftime("%Y-%m-%d %H:%M"))
        if self.cuda:
            props = torch.cuda.get_device_properties(self.device)
            meta.update(gpu=props.name, gpu_total_gb=props.total_memory / GB, cuda=torch.version.cuda)
        return meta


def _status(e: BaseException) -> str:
    if isinstance(e, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)):
        return "oom"
    return f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=None, help=f"comma list (default {','.join(SIZES)}; --smoke: 1.3b,2.7b)")
    ap.add_argument("--precisions", default="bf16_weights",
                    help=f"comma list of {sorted(PRECISIONS)} (bf16_weights: ZO2's 16-bit setting)")
    ap.add_argument("--prefetch", default="1", help="comma list of streamed prefetch depths")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per row (default 3; --smoke: 1)")
    ap.add_argument("--budget-s", type=float, default=390.0, help="start no size that would end after this")
    ap.add_argument("--bw-mib", type=int, default=1024, help="buffer size of the bandwidth test")
    default_out = os.path.join(os.environ["OUT"], "gpu_offload.json") if os.environ.get("OUT") else None
    ap.add_argument("--out", default=default_out, help="JSON of the rows, rewritten after each (default $OUT/...)")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU, tiny shapes, short sequences: the code paths only (never appended to RESULTS.md)")
    ap.add_argument("--table-from", default=None, help="render the table of a saved JSON and exit")
    ap.add_argument("--no-save", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    args.sizes = [s for s in (args.sizes or ("1.3b,2.7b" if args.smoke else ",".join(SIZES))).split(",") if s]
    args.precisions = [p for p in args.precisions.split(",") if p]
    args.prefetch = [int(k) for k in args.prefetch.split(",") if k]
    args.steps = args.steps or (1 if args.smoke else 3)
    args.no_save = args.no_save or args.smoke  # a smoke run measures nothing: it never writes RESULTS.md
    unknown = [p for p in args.precisions if p not in PRECISIONS]
    if unknown:
        ap.error(f"unknown precisions {unknown}: use {sorted(PRECISIONS)}")
    known = SMOKE_SHAPES if args.smoke else [p.stem.removeprefix("opt-") for p in CONF_MODEL.glob("opt-*.yaml")]
    if any(s not in known for s in args.sizes):
        ap.error(f"unknown sizes {[s for s in args.sizes if s not in known]}: use {sorted(known)}")
    if not (args.smoke or args.table_from) and not torch.cuda.is_available():
        ap.error("no CUDA device: run with --smoke for the CPU form")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Run (or, with --table-from, only render) and return the result dict (meta, bandwidth, rows)."""
    args = parse_args(argv)
    if args.table_from:
        result = json.loads(Path(args.table_from).read_text())
        table = report(render(result), save=not (args.no_save or result["meta"].get("smoke")))
        Path(args.table_from).with_suffix(".md").write_text(table)
        return result
    bench = Bench(args)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    threads = torch.get_num_threads()
    if args.smoke:  # tiny ops: a second thread only waits for a core on a busy machine (10 ms a matmul)
        torch.set_num_threads(1)
    try:
        bench.run()
        bench.result["finished"] = True
    except Interrupted as e:
        bench.log(f"interrupted ({e}): writing what was measured")
        bench.result["interrupted"] = str(e)
    finally:
        torch.set_num_threads(threads)
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        bench.result["elapsed_s"] = bench.elapsed()
        bench.save()
    table = report(render(bench.result), save=not args.no_save)
    if args.out:
        Path(args.out).with_suffix(".md").write_text(table)  # the table alone, to paste into RESULTS.md
    bench.result["rendered"] = True  # gpu_all.sh renders the JSON itself when a kill came before this
    bench.save()
    return bench.result


if __name__ == "__main__":
    main()
