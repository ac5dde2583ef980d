"""CPU: the loss after a fixed number of steps for each ZO optimizer variant, with its extra host memory.

    python benchmarks/optimizer_variants.py                 # 300 steps of the default synthetic task each
    python benchmarks/optimizer_variants.py --steps 50 --no-save
    python benchmarks/optimizer_variants.py --only ZO-Adam  # one row

Each variant runs the default ``python -m zo2_lightning.train`` setting (tiny OPT, synthetic task, CPU, each
optimizer at its preset lr for the model unless the name gives one) with the same seed and data through ``train(cfg)``, in a process of its own
so its peak RSS is its own. The table gives the training loss at the start and the end (means of the first and
last 5 logged values), the final validation loss, forwards per step, the wall time, the bytes of optimizer state
the engine allocated (measured from its buffers) with that size relative to the trainable parameters, and the
process's peak RSS relative to MeZO-SGD's. Appends the table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

VARIANTS = {  # name -> (overrides, forwards per step)
    "MeZO-SGD (gaussian)": (["optimizer=zo_sgd"], 2),
    "MeZO-SGD, one-sided": (["optimizer=zo_sgd", "optimizer.one_sided=true"], 2),
    "ZO-SGD, Rademacher z": (["optimizer=zo_sgd", "optimizer.direction=rademacher"], 2),
    "q-SPSA, q=2": (["optimizer=zo_sgd", "optimizer.q=2"], 4),
    "ZO-SGD-Sign": (["optimizer=zo_sgd_sign"], 2),
    "ZO-SGD-Cons": (["optimizer=zo_sgd_cons"], 5),
    "ZO-SGD-MMT": (["optimizer=zo_sgd_mmt"], 2),  # preset 3e-4: lr / (1 - momentum) = ZO-SGD's 3e-3
    "ZO-SGD-MMT, lr 3e-3": (["optimizer=zo_sgd_mmt", "optimizer.lr=3e-3"], 2),  # ZO-SGD's lr: diverges
    "ZO-Adam": (["optimizer=zo_adam"], 2),  # preset 1e-2
    "ZO-Adam, lr 3e-3": (["optimizer=zo_adam", "optimizer.lr=3e-3"], 2),
}


def run_one(name: str, steps: int) -> dict:
    """In this process: train one variant; its metrics, wall time, optimizer-state bytes and peak RSS."""
    from zo2_lightning.callbacks import peak_host_rss_bytes
    from zo2_lightning.config import compose
    from zo2_lightning.engine import zo
    from zo2_lightning.train import train

    seen = {"state_bytes": 0, "trainable_bytes": 0}
    detach = zo.ZOEngine.detach

    def measuring_detach(engine: zo.ZOEngine) -> None:  # the buffers exist until the engine lets go
        if engine.spsa is not None:
            seen["state_bytes"] = max(seen["state_bytes"], engine.spsa.state.nbytes)
            units = engine._all_units()
            seen["trainable_bytes"] = sum(s.trainable_numel * s.dtype.itemsize for u in units for s in u.segments)
        detach(engine)

    zo.ZOEngine.detach = measuring_detach  # type: ignore[method-assign]
    overrides, _ = VARIANTS[name]
    with tempfile.TemporaryDirectory() as out:
        cfg = compose("train", [*overrides, f"trainer.max_steps={steps}", "callbacks=none"], out)
        t0 = time.perf_counter()
        metrics, _ = train(cfg)
        seconds = time.perf_counter() - t0
    peak_rss = peak_host_rss_bytes()
    keys = ("train/loss_start", "train/loss_end", "val/loss")
    return {"metrics": {k: float(metrics[k]) for k in keys if k in metrics}, "seconds": seconds,
            "peak_rss": peak_rss, **seen}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--only", action="append", choices=list(VARIANTS), help="run only these variants")
    ap.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_one(args.child, args.steps)), flush=True)
        return
    rows = {}
    for name in args.only or VARIANTS:
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(args.steps)],
                              capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:  # e.g. diverged: the strategy stops after 10 non-finite steps
            error = next((ln for ln in reversed(proc.stderr.splitlines()) if "Error" in ln), f"exit {proc.returncode}")
            print(f"  failed: {error}", flush=True)
            rows[name] = {"error": error.split(":")[0] if "Error" in error else error}
            continue
        rows[name] = json.loads(line[len("RESULT "):])

    from results import report  # benchmarks/results.py (scripts run from this folder)

    base_rss = rows.get("MeZO-SGD (gaussian)", {}).get("peak_rss")
    lines = [
        f"### optimizer_variants ({time.strftime('%Y-%m-%d %H:%M')}, CPU)",
        "",
        f"default train setting (tiny OPT, synthetic task, each optimizer at its preset lr unless the name gives one),"
        f" {args.steps} steps per variant, same seed and data; each variant in its own process; a run that stops"
        " (10 non-finite steps in a row: diverged) shows its error",
        "",
        "| variant | forwards/step | train loss start | train loss end | val loss | wall time (s) |"
        " optimizer state (MiB) | state / trainable params | peak RSS vs MeZO-SGD (MiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | {VARIANTS[name][1]} | {r['error']} | | | | | | |")
            continue
        m, forwards = r["metrics"], VARIANTS[name][1]
        ratio = r["state_bytes"] / r["trainable_bytes"] if r["trainable_bytes"] else float("nan")
        rss = f"{(r['peak_rss'] - base_rss) / 2**20:+.1f}" if base_rss else "n/a"
        lines.append(
            f"| {name} | {forwards} | {m.get('train/loss_start', float('nan')):.3f} |"
            f" {m.get('train/loss_end', float('nan')):.3f} | {m.get('val/loss', float('nan')):.3f} |"
            f" {r['seconds']:.1f} | {r['state_bytes'] / 2**20:.1f} | {ratio:.2f}x | {rss} |"
        )
    lines.append("")
    report(lines, save=not args.no_save)


if __name__ == "__main__":
    main()
