"""CPU: the zo2_offload training step against bare, hand-written, in-memory MeZO loops on the same model.

    python benchmarks/step_overhead.py                      # 12 layers, hidden 512 (OPT-style), ~1 s steps
    python benchmarks/step_overhead.py --layers 4 --steps 5 # quick look

Prints a table of median step times and their ratios, taken in one run (this machine is noisy: compare
ratios, not absolute times), and appends it to benchmarks/RESULTS.md. The three contenders:

- ``mezo``: MeZO's own algorithm (Malladi et al.): perturb in place +eps, forward, -2eps, forward, +eps,
  update; z regenerated from the step seed at each of the four passes.
- ``lean``: a stricter bare loop: z drawn once per step and kept in memory (one extra model copy), then the
  same four in-place passes.
- ``zo2_offload``: ``Trainer(strategy="zo2_offload").fit``: blocks packed in host buffers, lockstep
  forwards, deferred update, Lightning's loop, hooks and logging included. z is drawn twice per step (for
  the perturbation and again for the deferred update), never stored.
- ``zo2_offload+keep``: the same with ``keep_directions=True``: z kept from the perturbation to the
  update (one draw per step, one extra model-size buffer, like ``lean``).

All three run the same forwards in eval mode on the same batches; time per step is wall time between
consecutive steps after ``--warmup`` steps.
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning.pytorch as L
import torch
from transformers import OPTConfig, OPTForCausalLM

import zo2_lightning  # noqa: F401  (registers the strategy)
from results import report  # benchmarks/results.py (scripts run from this folder)
from zo2_lightning import ZO2OffloadStrategy, ZOModule, ZOSGD



def build_model(layers: int, hidden: int, vocab: int, seed: int = 0) -> OPTForCausalLM:
    cfg = OPTConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, ffn_dim=4 * hidden,
                    num_attention_heads=hidden // 64, max_position_embeddings=2048, word_embed_proj_dim=hidden)
    torch.manual_seed(seed)
    return OPTForCausalLM(cfg).eval()


def make_batches(n: int, batch: int, seq: int, vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


@torch.no_grad()
def bare_mezo(model, batches, lr, eps, keep_z: bool) -> list[float]:
    """Hand-written in-memory MeZO; returns per-step wall times."""
    params = [p for p in model.parameters() if p.requires_grad]
    times, t0 = [], time.perf_counter()
    for step, batch in enumerate(batches):
        seed = 1000 + step
        if keep_z:
            gen = torch.Generator().manual_seed(seed)
            zs = [torch.randn(p.shape, generator=gen) for p in params]

        def perturb(scale: float) -> None:
            if keep_z:
                for p, z in zip(params, zs):
                    p.add_(z, alpha=scale)
                return
            gen = torch.Generator().manual_seed(seed)
            for p in params:
                p.add_(torch.randn(p.shape, generator=gen), alpha=scale)

        perturb(eps)
        loss_plus = model(**batch).loss.item()
        perturb(-2 * eps)
        loss_minus = model(**batch).loss.item()
        perturb(eps)
        g = (loss_plus - loss_minus) / (2 * eps)
        perturb(-lr * g)
        now = time.perf_counter()
        times.append(now - t0)
        t0 = now
    return times


class _Task(ZOModule, L.LightningModule):
    def __init__(self, model, lr, eps):
        super().__init__()
        self.model, self.lr, self.eps = model, lr, eps

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return ZOSGD(self.parameters(), lr=self.lr, eps=self.eps)


class _StepTimer(L.Callback):
    def __init__(self):
        self.times, self._t0 = [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        self.times.append(now - self._t0)
        self._t0 = now


def strategy_times(model, batches, lr, eps, keep: bool = False) -> list[float]:
    timer = _StepTimer()
    trainer = L.Trainer(strategy=ZO2OffloadStrategy(seed=0, keep_directions=keep), accelerator="cpu", devices=1, max_steps=len(batches),
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timer])
    trainer.fit(_Task(model, lr, eps), torch.utils.data.DataLoader(batches, batch_size=None))
    return timer.times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="alternate the contenders this many times")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()

    batches = make_batches(args.steps, args.batch, args.seq, args.vocab)
    lr, eps = 1e-6, 1e-3
    runs = {"mezo": [], "lean": [], "zo2_offload": [], "zo2_offload+keep": []}
    for _ in range(args.rounds):  # interleaved so drift on a shared machine hits all contenders alike
        runs["mezo"] += bare_mezo(build_model(args.layers, args.hidden, args.vocab), batches, lr, eps, False)[args.warmup:]
        runs["lean"] += bare_mezo(build_model(args.layers, args.hidden, args.vocab), batches, lr, eps, True)[args.warmup:]
        model = build_model(args.layers, args.hidden, args.vocab)
        runs["zo2_offload"] += strategy_times(model, batches, lr, eps)[args.warmup:]
        model = build_model(args.layers, args.hidden, args.vocab)
        runs["zo2_offload+keep"] += strategy_times(model, batches, lr, eps, keep=True)[args.warmup:]
    n_params = sum(p.numel() for p in build_model(args.layers, args.hidden, args.vocab).parameters())
    med = {k: statistics.median(v) for k, v in runs.items()}
    lines = [
        f"### step_overhead ({time.strftime('%Y-%m-%d %H:%M')}, CPU, {torch.get_num_threads()} threads)",
        "",
        f"OPT-style model: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, {n_params / 1e6:.1f} M params;"
        f" batch {args.batch} x seq {args.seq}; {len(runs['mezo'])} timed steps each after {args.warmup} warm-up steps per round",
        "",
        "| loop | median step (ms) | zo2_offload / loop | zo2_offload+keep / loop |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name in runs:
        lines.append(f"| {name} | {1000 * med[name]:.1f} | {med['zo2_offload'] / med[name]:.3f} |"
                     f" {med['zo2_offload+keep'] / med[name]:.3f} |")
    report(lines, save=not args.no_save)


if __name__ == "__main__":
    main()
