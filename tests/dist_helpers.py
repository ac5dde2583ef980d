"""Multi-rank CPU fits inside pytest: ranks forked by Lightning's launcher (gloo), results read back from files.

``ranks = fit_ranks(out_dir, task, loader, devices=2)`` runs ``Trainer(strategy=ZO2OffloadStrategy(...,
start_method="fork"), devices=2).fit`` and returns, per rank, what :class:`RankRecorder` wrote: the final
parameters, and the traffic of every step counted twice, independently: by wrapping the ``torch.distributed``
collectives (payload bytes per call) and by the kernel's count of bytes the process wrote (``/proc/self/io``,
which sees gloo's socket writes however they were issued).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
import torch.nn.functional as F
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader, DistributedSampler
from transformers import OPTConfig, OPTForCausalLM

from tests import tiny_models
from tests.lit_helpers import SEED, TinyTask, zo_strategy
from zo2_lightning import ZO2OffloadStrategy

#: every tensor collective of torch.distributed; the object ones (broadcast_object_list, ...) call these
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter", "send", "recv",
               "isend", "irecv", "barrier")


class CollectiveCounter:
    """Wraps the torch.distributed collectives of this process and logs ``(name, payload bytes)`` per call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self._saved: list[tuple[Any, str, Any]] = []

    def install(self) -> None:
        for name in COLLECTIVES:
            original = getattr(c10d, name)
            wrapped = self._wrap(name, original)
            for namespace in (dist, c10d):  # c10d: the object collectives call these through module globals
                self._saved.append((namespace, name, getattr(namespace, name)))
                setattr(namespace, name, wrapped)

    def uninstall(self) -> None:
        for namespace, name, original in reversed(self._saved):
            setattr(namespace, name, original)
        self._saved.clear()

    def _wrap(self, name: str, original: Any) -> Any:
        @functools.wraps(original)
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, _payload(args, kwargs)))
            return original(*args, **kwargs)

        return counted


def _payload(args: tuple, kwargs: dict) -> int:
    """Bytes this rank contributes: its input tensor, the last tensor argument (``all_reduce(t)``,
    ``broadcast(t)``, ``all_gather(outputs, t)``, ``all_gather_into_tensor(out, t)``, ...)."""
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors[-1:])


def _bytes_written() -> int:
    with open("/proc/self/io") as f:
        return int(dict(line.split(": ") for line in f.read().splitlines())["wchar"])


class RankRecorder(L.Callback):
    """On every rank: count the traffic between consecutive steps; at teardown write it and the parameters."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.counter, self.marks, self.setup_mark = CollectiveCounter(), [], _bytes_written()
        self.counter.install()  # before strategy.setup: the initial weight broadcast is counted too

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.marks.append((len(self.counter.calls), _bytes_written()))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.counter.uninstall()
        calls = self.counter.calls
        steps = [calls[a:b] for (a, _), (b, _) in zip(self.marks, self.marks[1:])]  # full steps only
        written = [b - a for (_, a), (_, b) in zip(self.marks, self.marks[1:])]
        torch.save({
            "params": {n: p.detach().clone() for n, p in pl_module.model.named_parameters()},
            "setup_calls": calls[: self.marks[0][0]] if self.marks else calls,
            "step_calls": steps,
            "step_written": written,
            "setup_written": (self.marks[0][1] if self.marks else _bytes_written()) - self.setup_mark,
            "record": getattr(pl_module, "record", None),  # what a recording task noted (RunLog)
        }, self.out_dir / f"rank{trainer.global_rank}.pt")


class QTask(TinyTask):
    """TinyTask (``q=...``, ``optimizer=ZOAdam``, ... as there) with a causal-LM loss in the model's dtype (HF's
    own upcasts to float32 only)."""

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.model(input_ids=batch["input_ids"]).logits  # (B, T, V)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())


class RunLog(QTask):
    """QTask that notes, per ``training_step`` call, the step, the run (direction, sign, micro-batch) and the rows
    of its batch, and logs its loss with ``sync_dist=True``: a collective inside the runs, which
    every rank must issue as often."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.record: list[tuple[int, tuple[int, int, int], list[list[int]]]] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        key = self.trainer.strategy.engine.run_key
        self.record.append((self.trainer.global_step, tuple(key), batch["input_ids"].tolist()))
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss, sync_dist=True)
        return loss


class RecordingIO(TorchCheckpointIO):
    """Notes the rank of every checkpoint write in ``writes.txt`` beside the checkpoint."""

    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Any = None) -> None:
        super().save_checkpoint(checkpoint, path, storage_options)
        with open(os.path.join(os.path.dirname(path), "writes.txt"), "a") as f:
            f.write(f"{rank_zero_only.rank}\n")


def fresh_fp64_model() -> OPTForCausalLM:
    """Other weights than a checkpoint's (which must win), already float64: Lightning restores the checkpoint
    before the precision plugin converts the module, so a float32 module would round the float64 weights."""
    model = opt_model().double()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return model


#: the equivalence fits: eps large enough that the float32 rounding of the losses (see tests/test_distributed.py)
#: is far below L+ - L-
LR, EPS = 5e-3, 1e-2


def task(model: torch.nn.Module | None = None, **kwargs: Any) -> QTask:
    kwargs = {"lr": LR, "eps": EPS, **kwargs}
    return QTask(model=model if model is not None else opt_model(), **kwargs)


def opt_model(hidden: int = 32, layers: int = 3) -> OPTForCausalLM:
    """A random-init OPT of the tiny vocabulary; vary ``hidden``/``layers`` to change the model size only."""
    cfg = OPTConfig(vocab_size=tiny_models.VOCAB, hidden_size=hidden, num_hidden_layers=layers, ffn_dim=2 * hidden,
                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=hidden)
    torch.manual_seed(0)
    return OPTForCausalLM(cfg).eval()


def examples(n: int, seq_len: int = 10) -> list[dict]:
    """n single causal-LM examples (no batch dim), for DataLoaders that batch and DistributedSamplers that shard."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, tiny_models.VOCAB, (n, seq_len), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


def loader(data: list[dict], batch_size: int) -> DataLoader:
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def joint_loader(data: list[dict], batch_size: int, seed: int | None = None) -> DataLoader:
    """One process, the examples N ranks see together: Lightning gives every rank of a fit a shuffling
    DistributedSampler seeded with PL_GLOBAL_SEED; its one-replica twin orders the same union of shards."""
    seed = int(os.getenv("PL_GLOBAL_SEED", 0)) if seed is None else seed
    return DataLoader(data, batch_size=batch_size, sampler=DistributedSampler(data, 1, 0, shuffle=True, seed=seed))


QUIET = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
             enable_model_summary=False, num_sanity_val_steps=0)


def strategy(directions: str = "shared", seed: int = SEED, start_method: str = "fork",
             **kwargs: Any) -> ZO2OffloadStrategy:
    return zo_strategy(seed=seed, directions=directions, start_method=start_method, **kwargs)


def fit_ranks(out_dir: Path, task: L.LightningModule, train_loader: DataLoader, devices: int = 2,
              directions: str = "shared", ckpt_path: Any = None, callbacks: list | None = None,
              start_method: str = "fork", strategy_kwargs: dict | None = None, **trainer_kwargs: Any) -> list[dict]:
    """Fit on ``devices`` CPU ranks (forked by default); each rank's record (see :class:`RankRecorder`), by rank."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs = {**QUIET, **trainer_kwargs}
    trainer = L.Trainer(strategy=strategy(directions, start_method=start_method, **(strategy_kwargs or {})),
                        devices=devices,
                        callbacks=[RankRecorder(out_dir), *(callbacks or [])], **kwargs)
    trainer.fit(task, train_loader, ckpt_path=ckpt_path)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(devices)]


def fit_one(task: L.LightningModule, train_loader: DataLoader, ckpt_path: Any = None, **trainer_kwargs: Any) -> dict:
    """The same fit in this process, on one device."""
    trainer = L.Trainer(strategy=strategy(start_method="popen"), devices=1, **{**QUIET, **trainer_kwargs})
    trainer.fit(task, train_loader, ckpt_path=ckpt_path)
    return {n: p.detach().clone() for n, p in task.model.named_parameters()}
