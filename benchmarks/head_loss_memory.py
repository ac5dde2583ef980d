"""CPU: memory and time of one ZO step's loss with the LM head over full logits vs in chunks (LMTask's default).

    python benchmarks/head_loss_memory.py            # OPT (vocab 50272) and Llama-3 (128256) heads, 2 settings
    python benchmarks/head_loss_memory.py --quick --no-save

Each row runs in a fresh child process: a 2-layer decoder with a real vocabulary (hidden 256, so the head, not
the blocks, is what costs) attached to ``ZOEngine``, then one ZO step (L+ and L- in lockstep) of
``LMTask.loss`` on a plain LM batch, with ``head_chunk_mib=None`` (the model's full logits, widened to fp32,
log-softmax) or 256 (the head applied 256 MiB of logits at a time). The figure is the step's transient host
memory: peak RSS during the step (VmHWM, reset just before it) minus RSS before it; the same bytes would be GPU
memory on a GPU. Also: seconds per step (median of ``--steps``) and both losses, which must agree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from results import report  # benchmarks/results.py (scripts run from this folder)

MODELS = {"opt": 50272, "llama3": 128256}  # name -> vocabulary size
SETTINGS = {"zo2 1x2048": (1, 2048), "mezo 16x512": (16, 512)}
QUICK_SETTINGS = {"1x512": (1, 512)}


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def child(args: argparse.Namespace) -> None:
    import torch
    import transformers as tf

    from zo2_lightning.engine import ZOEngine, discover_blocks
    from zo2_lightning.tasks.lm_task import LMTask

    torch.manual_seed(0)
    vocab = MODELS[args.model]
    if args.model == "opt":
        cfg = tf.OPTConfig(vocab_size=vocab, hidden_size=256, num_hidden_layers=2, ffn_dim=1024,
                           num_attention_heads=4, max_position_embeddings=2048, word_embed_proj_dim=256)
        model = tf.OPTForCausalLM(cfg)
    else:
        cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=256, num_hidden_layers=2, intermediate_size=1024,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                             tie_word_embeddings=False)
        model = tf.LlamaForCausalLM(cfg)
    model.eval()
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    batch = {"kind": "lm", "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    task = LMTask(model, head_chunk_mib=None if args.chunk_mib <= 0 else args.chunk_mib)
    engine = ZOEngine(model, discover_blocks(model), torch.device("cpu"), seed=0)
    engine.attach([list(model.parameters())])
    times, transient, losses = [], [], None
    for step in range(args.steps + 1):  # the first is a warm-up: its time is not counted
        before = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM (the peak) to the current RSS
        t = time.perf_counter()
        with torch.no_grad():
            plus, minus = engine.run_pair(lambda key: task.loss(batch), step=step, eps=1e-3)
        if step:
            times.append(time.perf_counter() - t)
        transient.append((_status_kib("VmHWM") - before) * 1024)
        losses = losses or (plus.item(), minus.item())
    engine.detach()
    print(json.dumps({"transient": max(transient), "s_per_step": statistics.median(times), "losses": losses}))


def measure(model: str, batch: int, seq: int, chunk_mib: float, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", model, "--batch", str(batch), "--seq", str(seq),
           "--chunk-mib", str(chunk_mib), "--steps", str(steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="opt", choices=sorted(MODELS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--chunk-mib", type=float, default=256.0, help="LMTask.head_chunk_mib; <= 0: full logits")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one short setting, OPT only")
    parser.add_argument("--no-save", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    if args.child:
        return child(args)
    settings = QUICK_SETTINGS if args.quick else SETTINGS
    models = ["opt"] if args.quick else list(MODELS)
    lines = [
        "### LM head over full logits vs in chunks: one ZO step's transient memory (CPU)",
        "",
        f"2-layer decoders, hidden 256, real vocabularies; peak RSS during a step (L+ and L- in lockstep) minus RSS"
        f" before it (the most over all steps); seconds: median of {args.steps} steps after a warm-up.",
        "",
        "| model (vocab) | batch x seq | full logits MiB | chunked (256 MiB) MiB | ratio | full s/step | chunked"
        " s/step | L+ full / chunked |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model in models:
        for name, (batch, seq) in settings.items():
            full = measure(model, batch, seq, 0, args.steps)
            chunked = measure(model, batch, seq, args.chunk_mib, args.steps)
            if "error" in full or "error" in chunked:
                lines.append(f"| {model} ({MODELS[model]}) | {name} | {full.get('error', '')} |"
                             f" {chunked.get('error', '')} | | | | |")
                continue
            lines.append(
                f"| {model} ({MODELS[model]}) | {name} | {full['transient'] / 2**20:.0f} |"
                f" {chunked['transient'] / 2**20:.0f} | {chunked['transient'] / full['transient']:.2f} |"
                f" {full['s_per_step']:.2f} | {chunked['s_per_step']:.2f} |"
                f" {full['losses'][0]:.6f} / {chunked['losses'][0]:.6f} |"
            )
            print(lines[-1], flush=True)
    report(lines, save=not args.no_save)


if __name__ == "__main__":
    main()
