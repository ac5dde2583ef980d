"""CPU: does every tiny model train with every ZO optimizer at its preset lr (conf/optimizer/model_preset/)?

    python benchmarks/model_presets.py                            # 4 models x 10 optimizers, 1000 steps each
    python benchmarks/model_presets.py --models tiny --steps 300 --no-save
    python benchmarks/model_presets.py --optimizers hizoo,lozo,lozo_m,sparse_mezo,fzoo

Each (model, optimizer) pair runs the default ``python -m zo2_lightning.train model=M optimizer=O`` setting (the
synthetic task, CPU, seed 42, ``trainer.max_steps`` steps) through ``train(cfg)``, with the lr its preset gives.
The table has the lr, the training loss at the start and the end (means of the first and last 5 logged values),
the last validation loss, and whether the pair converged: finite throughout and the training loss down by at least
``--min-drop``. A preset that also sets a method's own knob (HiZOO's hessian_smooth, Sparse MeZO's sparsity) shows it
after the optimizer's name. A run the strategy stops (10 non-finite steps in a row) shows its error. Runs use
``--threads`` torch threads (default 1: on a shared 2-core machine a second thread of these tiny models mostly
waits). Appends the table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

MODELS = ("tiny", "llama_tiny", "qwen_tiny", "roberta_tiny")
OPTIMIZERS = ("zo_sgd", "zo_sgd_sign", "zo_sgd_cons", "zo_sgd_mmt", "zo_adam",
              "hizoo", "lozo", "lozo_m", "sparse_mezo", "fzoo")
PRESETS = Path(__file__).resolve().parents[1] / "conf" / "optimizer" / "model_preset"


def preset_knobs(model: str, optimizer: str) -> str:
    """The keys a preset sets besides lr, as ``"key value, ..."`` ("" when it sets only the lr)."""
    from omegaconf import OmegaConf

    path = PRESETS / model / f"{optimizer}.yaml"
    preset = OmegaConf.to_container(OmegaConf.load(path)) if path.exists() else {}
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in preset.items() if k != "lr")


def run_pair(model: str, optimizer: str, steps: int) -> dict:
    """Train one pair at its preset lr; its lr, metrics and wall time, or its error."""
    from zo2_lightning.config import compose
    from zo2_lightning.train import train

    with tempfile.TemporaryDirectory() as out:
        cfg = compose("train", [f"model={model}", f"optimizer={optimizer}", f"trainer.max_steps={steps}",
                                "callbacks=none", "trainer.enable_progress_bar=false"], out)
        row = {"lr": float(cfg.optimizer.lr)}
        t0 = time.perf_counter()
        try:
            metrics, _ = train(cfg)
        except Exception as err:  # diverged: the strategy stops after 10 non-finite steps in a row
            return {**row, "error": type(err).__name__, "seconds": time.perf_counter() - t0}
    keys = ("train/loss_start", "train/loss_end", "val/loss")
    return {**row, **{k: float(metrics[k]) for k in keys if k in metrics}, "seconds": time.perf_counter() - t0}


def converged(row: dict, min_drop: float) -> bool:
    """Finite losses and a training loss down by at least ``min_drop``."""
    values = [row.get(k, math.nan) for k in ("train/loss_start", "train/loss_end", "val/loss")]
    return "error" not in row and all(math.isfinite(v) for v in values) and values[0] - values[1] >= min_drop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--steps", type=int, default=1000, help="the default run's length")
    ap.add_argument("--min-drop", type=float, default=0.5, help="training-loss drop that counts as converging")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each run")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    rows = {}
    for model in args.models.split(","):
        for optimizer in args.optimizers.split(","):
            rows[model, optimizer] = r = run_pair(model, optimizer, args.steps)
            outcome = r.get("error") or f"{r['train/loss_start']:.3f} -> {r['train/loss_end']:.3f}"
            print(f"[{time.strftime('%H:%M:%S')}] {model} {optimizer} lr {r['lr']:g}: {outcome}", flush=True)

    from results import report  # benchmarks/results.py (scripts run from this folder)

    lines = [
        f"### model_presets ({time.strftime('%Y-%m-%d %H:%M')}, CPU, {args.threads} thread(s))",
        "",
        f"default train setting (synthetic task, seed 42) per model and optimizer at its preset lr, {args.steps} steps;"
        f" converged: finite, training loss down by >= {args.min_drop}",
        "",
        "| model | optimizer | preset lr | train loss start | train loss end | val loss | converged | wall time (s) |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for (model, optimizer), r in rows.items():
        knobs = preset_knobs(model, optimizer)
        optimizer = f"{optimizer} ({knobs})" if knobs else optimizer
        if "error" in r:
            lines.append(f"| {model} | {optimizer} | {r['lr']:g} | {r['error']} | | | no | {r['seconds']:.0f} |")
            continue
        lines.append(
            f"| {model} | {optimizer} | {r['lr']:g} | {r['train/loss_start']:.3f} | {r['train/loss_end']:.3f} |"
            f" {r.get('val/loss', math.nan):.3f} | {'yes' if converged(r, args.min_drop) else 'no'} |"
            f" {r['seconds']:.0f} |"
        )
    lines.append("")
    report(lines, save=not args.no_save)


if __name__ == "__main__":
    main()
