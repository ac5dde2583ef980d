"""CPU: the ZO methods side by side at an equal budget of forward passes, over seeds, on two tasks.

    python benchmarks/zo_methods.py                         # 13 methods x 2 tasks x 3 seeds, 600 forwards each (13 min)
    python benchmarks/zo_methods.py --quick --no-save       # 60 forwards, 1 seed: a smoke run (under a minute)
    python benchmarks/zo_methods.py --budget 2000           # the same at 2000 forwards each (39 min)
    python benchmarks/zo_methods.py --only MeZO-SGD --only FZOO --tasks synthetic --seeds 2 --budget 300

Every method gets the same number of training forward passes (``--budget``): ``budget // forwards per step``
steps, so MeZO-SGD (2 forwards a step) runs 300 steps of a 600 budget, HiZOO (3) 200, q-SPSA with q=2 (4) 150,
ZO-SGD-Cons (5) 120 and FZOO with q=8 (9) 66. Each runs the default ``python -m zo2_lightning.train`` setting
(tiny random-init OPT, CPU, fp32) with the optimizer at its preset lr for the model
(conf/optimizer/model_preset/tiny/, chosen on the synthetic task; the same lr on both tasks), on two tasks:

* ``synthetic``: the default task (next-token loss on a small Markov chain); the metric is the validation loss.
* ``sst2``: ``task=sst2`` from local files this script writes (the SST-2 format and prompt, ``<sentence> It was``
  then `` terrible`` / `` great``) with a learnable signal: each sentence is five words from its label's word list.
  The project's toy SST-2 files (zo2_lightning.tasks.toy_data) have random labels, so nothing can be learned from
  them; sentences of three label words and three neutral ones reached a dev accuracy of 0.575 in 1000 MeZO steps.
  The metric is the dev-set accuracy (``val/acc``, 200 examples, chance 0.5).

A run is one (task, method, seed) in a process of its own, forked from this one after the imports (which take
longer than a short run), with one torch thread; ``--jobs`` of them at a time (default 2, one per core of a 2-core
machine; ``--jobs 1`` for the quietest step times). The seeds (``seed=42, 43, ...``) set the initial weights, the
directions and the data order; every method sees the same ones. Per task and method the table gives the forwards
per step (counted: calls of the model's first block in training steps, divided by the steps), the steps, the final
training loss (the mean of the logged losses over the last 10% of the steps, each the loss of the step's first
perturbed run) and the validation metric after the last step as mean +- standard deviation over the seeds, the median step time
relative to MeZO-SGD's in the same invocation (and per forward pass), and the bytes of optimizer state the engine
allocated per trainable parameter (measured from its buffers: fp32 moments are 4 bytes each). A run that stops
(10 non-finite steps in a row: diverged) is left out of the means and counted. Appends the tables to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import multiprocessing.connection
import random
import statistics
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

METHODS = {  # name -> overrides of the default run (each optimizer at its preset lr for the model)
    "MeZO-SGD": ["optimizer=zo_sgd"],
    "MeZO-SGD, one-sided": ["optimizer=zo_sgd", "optimizer.one_sided=true"],
    "ZO-SGD, Rademacher z": ["optimizer=zo_sgd", "optimizer.direction=rademacher"],
    "q-SPSA, q=2": ["optimizer=zo_sgd", "optimizer.q=2"],
    "ZO-SGD-Sign": ["optimizer=zo_sgd_sign"],
    "ZO-SGD-Cons": ["optimizer=zo_sgd_cons"],
    "ZO-SGD-MMT": ["optimizer=zo_sgd_mmt"],
    "ZO-Adam": ["optimizer=zo_adam"],
    "HiZOO": ["optimizer=hizoo"],
    "LOZO": ["optimizer=lozo"],
    "LOZO-M": ["optimizer=lozo_m"],
    "Sparse MeZO": ["optimizer=sparse_mezo"],
    "FZOO": ["optimizer=fzoo"],
}
#: forwards per training step of each method (the budget divides by these; each run also counts its own)
FORWARDS = {"MeZO-SGD": 2, "MeZO-SGD, one-sided": 2, "ZO-SGD, Rademacher z": 2, "q-SPSA, q=2": 4, "ZO-SGD-Sign": 2,
            "ZO-SGD-Cons": 5, "ZO-SGD-MMT": 2, "ZO-Adam": 2, "HiZOO": 3, "LOZO": 2, "LOZO-M": 2, "Sparse MeZO": 2,
            "FZOO": 9}
BASELINE = "MeZO-SGD"
TASKS = ("synthetic", "sst2")
METRIC = {"synthetic": ("val/loss", "val loss"), "sst2": ("val/acc", "val accuracy")}

#: the learnable SST-2 stand-in: a sentence is SENTENCE_WORDS words from its label's list (label 1: ' great')
LABEL_WORDS = {0: "dark cold bitter grey stormy harsh".split(), 1: "bright warm gentle golden sunny sweet".split()}
SENTENCE_WORDS = 5
SST2_SIZES = {"num_train": 1000, "num_dev": 200, "valid": 200}


def write_sentiment(data_dir: str | Path, num_train: int = 1200, num_valid: int = 200, seed: int = 0) -> Path:
    """Write ``train.jsonl`` and ``validation.jsonl`` in SST-2's fields (``sentence``, ``label``) whose label is
    learnable from any word of the sentence; ``task=sst2 task.data_dir=DIR`` reads them."""
    rng = random.Random(seed)
    out = Path(data_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", num_train), ("validation", num_valid)):
        with (out / f"{split}.jsonl").open("w", encoding="utf-8") as f:
            for i in range(n):
                label = rng.randrange(2)
                sentence = " ".join(rng.choices(LABEL_WORDS[label], k=SENTENCE_WORDS)).capitalize() + "."
                f.write(json.dumps({"sentence": sentence, "label": label, "idx": i}) + "\n")
    return out


def task_overrides(task: str, data_dir: str | Path | None) -> list[str]:
    """The overrides that select ``task`` (``sst2`` reads the files :func:`write_sentiment` wrote to ``data_dir``)."""
    if task == "synthetic":
        return []
    if task == "sst2":
        if data_dir is None:
            raise ValueError("task sst2 needs data_dir: the folder write_sentiment() wrote")
        return ["task=sst2", f"task.data_dir={data_dir}", f"task.num_train={SST2_SIZES['num_train']}",
                f"task.num_dev={SST2_SIZES['num_dev']}", f"task.num_eval={SST2_SIZES['valid']}",
                "task.eval_batch_size=32"]
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def steps_for(method: str, budget: int) -> int:
    """Training steps of ``method`` within ``budget`` forward passes (at least one)."""
    return max(1, budget // FORWARDS[method])


def run_row(method: str, task: str, seed: int, budget: int, data_dir: str | Path | None = None,
            extra: Sequence[str] = ()) -> dict:
    """In this process: train ``method`` on ``task`` with ``seed`` for ``budget`` forwards; its row.

    Returns:
        ``method, task, seed, lr, steps, forwards_per_step`` (counted), ``train_loss``, ``metric`` (the task's
        validation metric), ``step_time_s`` (median over the steps after the first two), ``state_bytes`` and
        ``trainable_params``; a run that raised has ``error`` (the exception's type) instead of the results.
    """
    from zo2_lightning.config import compose
    from zo2_lightning.engine import zo
    from zo2_lightning.train import read_metric_series, train

    seen = {"state_bytes": 0, "trainable_params": 0}
    detach = zo.ZOEngine.detach

    def measuring_detach(engine: zo.ZOEngine) -> None:  # the buffers exist until the engine lets go
        if engine.spsa is not None:
            seen["state_bytes"] = max(seen["state_bytes"], engine.spsa.state.nbytes)
            seen["trainable_params"] = sum(s.trainable_numel for u in engine._all_units() for s in u.segments)
        detach(engine)

    steps = steps_for(method, budget)
    row: dict = {"method": method, "task": task, "seed": seed, "steps": steps}
    zo.ZOEngine.detach = measuring_detach  # type: ignore[method-assign]
    try:
        with tempfile.TemporaryDirectory() as out:
            cfg = compose("train", [
                *METHODS[method], *task_overrides(task, data_dir), f"seed={seed}", f"trainer.max_steps={steps}",
                f"trainer.val_check_interval={steps}", "trainer.log_every_n_steps=1", "callbacks=perf_monitor",
                "trainer.enable_progress_bar=false", *extra], out)
            row["lr"] = float(cfg.optimizer.lr)
            calls = _count_block_calls()
            try:
                metrics, objects = train(cfg)
            except Exception as err:  # diverged: the strategy stops after 10 non-finite steps in a row
                return {**row, "error": type(err).__name__}
            finally:
                calls.remove()
            csv = Path(objects["loggers"][0].log_dir) / "metrics.csv"
            losses = [v for _, v in read_metric_series(csv, "train/loss")]
            times = [v for _, v in read_metric_series(csv, "perf/step_time_s")]
    finally:
        zo.ZOEngine.detach = detach  # type: ignore[method-assign]
    tail = losses[-max(1, len(losses) // 10):]
    return {**row, "forwards_per_step": calls.count / steps, "train_loss": sum(tail) / len(tail),
            "metric": float(metrics.get(METRIC[task][0], math.nan)),
            "step_time_s": statistics.median(times[2:] or times), **seen}


class _count_block_calls:  # noqa: N801 - used like a function
    """Counts the calls of the first transformer block of the model ``train`` builds next while its trainer is in a
    training step: one per forward pass, whichever way the engine schedules the runs (the model is in eval mode
    throughout a ZO run, so ``trainer.training`` tells training forwards from validation ones)."""

    def __init__(self) -> None:
        from zo2_lightning import train as train_module

        self.count = 0
        self._module, self._build, self._handle = train_module, train_module.build, None

        def counting_build(cfg):
            objects = self._build(cfg)
            trainer = objects["trainer"]

            def hook(module, args, output) -> None:
                self.count += trainer.training

            self._handle = objects["module"].zo_blocks()[0].register_forward_hook(hook)
            return objects

        train_module.build = counting_build

    def remove(self) -> None:
        self._module.build = self._build
        if self._handle is not None:
            self._handle.remove()


def _child(conn, method: str, task: str, seed: int, budget: int, data_dir: str | None) -> None:
    """A forked run: one torch thread, the row (or the error) sent back through ``conn``."""
    import torch

    torch.set_num_threads(1)
    try:
        row = run_row(method, task, seed, budget, data_dir)
    except Exception:
        row = {"method": method, "task": task, "seed": seed, "error": traceback.format_exc().splitlines()[-1]}
    conn.send(row)
    conn.close()


def run_all(jobs: list[tuple[str, str, int]], budget: int, data_dir: str | None, parallel: int = 1) -> list[dict]:
    """Every (task, method, seed) of ``jobs`` in a forked process of its own, ``parallel`` at a time; the rows in
    the order of ``jobs``."""
    ctx = multiprocessing.get_context("fork")
    rows: dict[int, dict] = {}
    running: dict = {}  # receiving end -> (index, process)
    t0 = time.perf_counter()
    pending = list(enumerate(jobs))
    while pending or running:
        while pending and len(running) < parallel:
            i, (task, method, seed) = pending.pop(0)
            receive, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(send, method, task, seed, budget, data_dir))
            proc.start()
            send.close()
            running[receive] = (i, proc)
        for receive in multiprocessing.connection.wait(list(running)):
            i, proc = running.pop(receive)
            task, method, seed = jobs[i]
            try:
                row = receive.recv()
            except EOFError:  # the process died without a word
                row = {"method": method, "task": task, "seed": seed, "error": "died"}
            proc.join()
            if proc.exitcode not in (0, None) and "error" not in row:
                row["error"] = f"exit {proc.exitcode}"
            rows[i] = row
            print(f"[{time.strftime('%H:%M:%S')}] {len(rows)}/{len(jobs)} {task} {method} seed {seed}: {_outcome(row)}"
                  f" ({time.perf_counter() - t0:.0f} s so far)", flush=True)
    return [rows[i] for i in range(len(jobs))]


def _outcome(row: dict) -> str:
    if "error" in row:
        return row["error"]
    return (f"{row['steps']} steps, {row['forwards_per_step']:g} forwards/step, train {row['train_loss']:.3f},"
            f" {METRIC[row['task']][1]} {row['metric']:.3f}, {1000 * row['step_time_s']:.1f} ms/step")


def _mean_std(values: list[float], digits: int = 3) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(task: str, rows: list[dict], budget: int, seeds: list[int]) -> list[str]:
    """The markdown table of one task: a line per method, in METHODS order."""
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        if r["task"] == task:
            by_method.setdefault(r["method"], []).append(r)
    ok = {m: [r for r in rs if "error" not in r] for m, rs in by_method.items()}

    def step_time(m: str) -> float:
        return statistics.mean(r["step_time_s"] for r in ok[m]) if ok.get(m) else math.nan

    base = step_time(BASELINE) if BASELINE in ok else math.nan
    base_fwd = base / FORWARDS[BASELINE]
    metric_name = METRIC[task][1]
    lines = [
        f"{task}: {budget} training forwards per run, seeds {', '.join(map(str, seeds))}; mean ± std over the seeds"
        f" that finished",
        "",
        f"| method | lr | forwards/step | steps | final train loss | {metric_name} | step time / MeZO-SGD |"
        " per forward / MeZO-SGD | optimizer state (B / trainable param) | diverged |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for method in METHODS:
        if method not in by_method:
            continue
        good, runs = ok[method], by_method[method]
        failed = [r for r in runs if "error" in r]
        diverged = f"{len(failed)}/{len(runs)}" + (f" ({failed[0]['error']})" if failed else "")
        if not good:
            lines.append(f"| {method} | {runs[0].get('lr', math.nan):g} | {FORWARDS[method]} |"
                         f" {runs[0].get('steps', '')} | n/a | n/a | n/a | n/a | n/a | {diverged} |")
            continue
        forwards = statistics.mean(r["forwards_per_step"] for r in good)
        t = step_time(method)
        state = statistics.mean(r["state_bytes"] / r["trainable_params"] for r in good if r["trainable_params"])
        state_text = f"{state:.2f}" if state == 0 or state >= 0.01 else f"{state:.1e}"
        lines.append(
            f"| {method} | {good[0]['lr']:g} | {forwards:g} | {good[0]['steps']} |"
            f" {_mean_std([r['train_loss'] for r in good])} | {_mean_std([r['metric'] for r in good])} |"
            f" {t / base:.2f} | {t / forwards / base_fwd:.2f} | {state_text} | {diverged} |"
        )
    lines.append("")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=int, default=600, help="training forward passes per run")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per method and task (42, 43, ...)")
    ap.add_argument("--only", action="append", choices=list(METHODS), help="run only these methods")
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time, one core each (1: the quietest timings)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 60 forwards, 1 seed")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.budget, args.seeds = 60, 1
    tasks = [t for t in args.tasks.split(",") if t]
    for t in tasks:
        if t not in TASKS:
            ap.error(f"unknown task {t!r}; known: {', '.join(TASKS)}")
    methods = args.only or list(METHODS)
    seeds = [42 + i for i in range(args.seeds)]

    import torch

    import zo2_lightning.train  # noqa: F401  the imports every forked run shares

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as data:
        data_dir = str(write_sentiment(Path(data) / "sst2", SST2_SIZES["num_train"] + SST2_SIZES["num_dev"],
                                       SST2_SIZES["valid"]))
        jobs = [(task, method, seed) for task in tasks for method in methods for seed in seeds]
        print(f"{len(jobs)} runs: {len(methods)} methods x {len(tasks)} tasks x {len(seeds)} seeds,"
              f" {args.budget} forwards each", flush=True)
        t0 = time.perf_counter()
        rows = run_all(jobs, args.budget, data_dir, args.jobs)
        seconds = time.perf_counter() - t0

    from results import report  # benchmarks/results.py (scripts run from this folder)

    lines = [
        f"### zo_methods ({time.strftime('%Y-%m-%d %H:%M')}, CPU, 1 thread per run, {args.jobs} at a time,"
        f" {seconds / 60:.1f} min)",
        "",
        "default train setting (tiny random-init OPT, fp32), each optimizer at its preset lr for the model, the same"
        f" budget of {args.budget} training forward passes per run (steps = budget // forwards per step); each run"
        " in its own process; final train loss: mean over the last 10% of the steps; step time: median per run,"
        " mean over the seeds, relative to MeZO-SGD's in this invocation",
        "",
    ]
    for task in tasks:
        lines += table(task, rows, args.budget, seeds)
    report(lines, save=not args.no_save)


if __name__ == "__main__":
    main()
