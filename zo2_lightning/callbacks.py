"""Memory and throughput of a ZO run, logged every step: what the ZO2 memory/throughput tables report.

``Trainer(callbacks=[ThroughputMemoryMonitor()])`` (``callbacks/perf_monitor.yaml``).

Per training step it logs ``perf/step_time_s``, ``perf/tokens_per_s`` (tokens of the batch per wall second;
each token goes through two forwards, one per sign), ``perf/peak_mem_gb`` (``torch.cuda.max_memory_allocated``
on a CUDA working device, the process's peak resident set size otherwise) and, when the strategy's
streamer exposes byte counters, ``perf/gb_uploaded`` / ``perf/gb_offloaded`` moved during the step.
:attr:`ThroughputMemoryMonitor.summary` holds the run's means after the warm-up steps, for benchmarks.
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import lightning.pytorch as L
import torch

GB = 1024**3


def peak_host_rss_bytes() -> int:
    """Peak resident set size of this process, in bytes (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def streamer_bytes(trainer: L.Trainer) -> tuple[int, int] | None:
    """Cumulative ``(uploaded, offloaded)`` bytes of the strategy's block streamer, if it counts them."""
    streamer = getattr(getattr(trainer.strategy, "engine", None), "streamer", None)
    up, down = getattr(streamer, "bytes_uploaded", None), getattr(streamer, "bytes_offloaded", None)
    if up is None or down is None:
        return None
    return int(up), int(down)


def count_tokens(batch: Any) -> int:
    """Tokens in a batch: the attention mask's ones, else the size of ``input_ids``, else 0."""
    if isinstance(batch, dict):
        if "attention_mask" in batch:
            return int(batch["attention_mask"].sum())
        if "input_ids" in batch:
            return int(batch["input_ids"].numel())
    return 0


class ThroughputMemoryMonitor(L.Callback):
    """Logs step time, tokens/s, peak working-device memory and bytes streamed per training step.

    Args:
        log_every_n_steps: log every this many optimizer steps.
        warmup_steps: first steps left out of :attr:`summary`.
    """

    def __init__(self, log_every_n_steps: int = 1, warmup_steps: int = 2) -> None:
        self.log_every_n_steps = max(1, log_every_n_steps)
        self.warmup_steps = warmup_steps
        self._t0 = 0.0
        self._bytes0: tuple[int, int] | None = None
        self._times: list[float] = []
        self._tokens: list[int] = []
        self._moved: list[tuple[int, int]] = []
        self.summary: dict[str, float] = {}

    def _device(self, trainer: L.Trainer) -> torch.device:
        return trainer.strategy.root_device

    def peak_memory_bytes(self, trainer: L.Trainer) -> int:
        """Peak memory of the working device: CUDA allocator peak, or the process's peak RSS on CPU."""
        device = self._device(trainer)
        if device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(device))
        return peak_host_rss_bytes()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = self._device(trainer)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self._times, self._tokens, self._moved, self.summary = [], [], [], {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._device(trainer).type == "cuda":
            torch.cuda.synchronize(self._device(trainer))  # step time must not include the previous step's kernels
        self._t0 = time.perf_counter()
        self._bytes0 = streamer_bytes(trainer)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._device(trainer).type == "cuda":
            torch.cuda.synchronize(self._device(trainer))
        step_time = time.perf_counter() - self._t0
        tokens = count_tokens(batch)
        self._times.append(step_time)
        self._tokens.append(tokens)
        metrics = {
            "perf/step_time_s": step_time,
            "perf/tokens_per_s": tokens / step_time if step_time > 0 else 0.0,
            "perf/peak_mem_gb": self.peak_memory_bytes(trainer) / GB,
        }
        now = streamer_bytes(trainer)
        if now is not None and self._bytes0 is not None:
            moved = (now[0] - self._bytes0[0], now[1] - self._bytes0[1])
            self._moved.append(moved)
            metrics["perf/gb_uploaded"] = moved[0] / GB
            metrics["perf/gb_offloaded"] = moved[1] / GB
        if trainer.global_step % self.log_every_n_steps == 0:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        self._update_summary(trainer)

    def _update_summary(self, trainer: L.Trainer) -> None:
        skip = min(self.warmup_steps, max(0, len(self._times) - 1))  # keep at least one step
        times, tokens = self._times[skip:], self._tokens[skip:]
        self.summary = {
            "steps": float(len(self._times)),
            "step_time_s": sum(times) / len(times),
            "tokens_per_s": sum(tokens) / sum(times) if sum(times) > 0 else 0.0,
            "peak_mem_gb": self.peak_memory_bytes(trainer) / GB,
        }
        if self._moved:
            moved = self._moved[skip:] or self._moved
            self.summary["gb_uploaded_per_step"] = sum(m[0] for m in moved) / len(moved) / GB
            self.summary["gb_offloaded_per_step"] = sum(m[1] for m in moved) / len(moved) / GB
