"""The callbacks of the default run (``callbacks/default.yaml``): memory and throughput, the run's size, a progress bar.

``Trainer(callbacks=[ThroughputMemoryMonitor(), SizeReport(), progress_bar()])``.

:class:`ThroughputMemoryMonitor` (``callbacks/perf_monitor.yaml``) logs, per training step,
``perf/step_time_s``, ``perf/tokens_per_s`` (tokens of the batch per wall second; each token goes through two
forwards, one per sign), ``perf/peak_mem_gb`` (``torch.cuda.max_memory_allocated`` on a CUDA working device,
the process's peak resident set size otherwise) and, when the strategy's streamer exposes byte counters,
``perf/gb_uploaded`` / ``perf/gb_offloaded`` moved during the step. :attr:`ThroughputMemoryMonitor.summary`
holds the run's means after the warm-up steps, for benchmarks.

:class:`SizeReport` (``callbacks/size_report.yaml``) prints on rank 0 when fit starts what the model summary
(off by default) would not say: how many parameters train, the bytes each step moves between host and device,
and the host memory in use. :func:`progress_bar` (``callbacks/progress_bar.yaml``) is Lightning's progress bar
without the negative epoch total Lightning 2.6's rich bar shows for ``max_epochs=-1`` (``Epoch 3/-2``).
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

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


def current_host_rss_bytes() -> int:
    """Resident set size of this process now, in bytes (``/proc/self/statm``; the peak where that is absent)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, IndexError, ValueError):
        return peak_host_rss_bytes()


def trainable_numel(trainer: L.Trainer, module: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts of ``module``: trainable are those the optimizers hold with
    ``requires_grad`` (all with ``requires_grad`` when there is no optimizer); shared tensors count once."""
    params = {id(p): p for p in module.parameters()}
    held = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
    trainable = [p for i, p in params.items() if p.requires_grad and (i in held or not trainer.optimizers)]
    return sum(p.numel() for p in trainable), sum(p.numel() for p in params.values())


def step_transfer_bytes(trainer: L.Trainer) -> tuple[int, int, str] | None:
    """Bytes one optimizer step moves up to the working device and back, from the blocks' parameters.

    Each streamed block goes up once per pass over the blocks in its storage dtype (all its parameters) and
    comes back with its trainable parameters updated (only those are written back); ``ZOSGDCons`` makes a second
    pass. Read from the strategy's ``engine_options`` and ``strategy.engine.blocks``.

    Returns:
        ``(up, down, what)`` with ``what`` saying what moves, or ``None`` for a strategy without ZO blocks.
    """
    strategy = trainer.strategy
    blocks = list(getattr(getattr(strategy, "engine", None), "blocks", None) or [])
    options = getattr(strategy, "engine_options", None)
    if not blocks or options is None:
        return None
    device, where = strategy.root_device, options.offload_device
    if where is None:
        return 0, 0, f"every parameter stays on {device}"
    storage = options.storage_dtype
    params = [p for block in blocks for p in block.parameters()]
    narrows = storage is not None and any(p.dtype != storage for p in params)
    if where == "cpu" and device.type == "cpu" and not narrows:
        return 0, 0, "a CPU working device reads the blocks where they live, in host memory"
    resident = options.resident_blocks
    streamed = blocks[resident if isinstance(resident, int) else 0:]
    passes = 2 if any(getattr(opt, "conservative", False) for opt in trainer.optimizers) else 1

    def nbytes(p: nn.Parameter) -> int:
        return p.numel() * (storage or p.dtype).itemsize

    up = passes * sum(nbytes(p) for block in streamed for p in block.parameters())
    down = sum(nbytes(p) for block in streamed for p in block.parameters() if p.requires_grad)
    dtypes = "/".join(sorted({str(storage or p.dtype).removeprefix("torch.") for p in params}))
    what = f"{len(streamed)} of {len(blocks)} blocks from {'disk' if where == 'disk' else 'host memory'} in {dtypes}"
    if resident == "auto":
        what += "; resident_blocks=auto keeps some on the device after the first step"
    return up, down, what


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def size_report(trainer: L.Trainer, module: nn.Module) -> str:
    """The lines :class:`SizeReport` prints: trainable parameters, bytes moved per step, host memory in use."""
    trainable, total = trainable_numel(trainer, module)
    share = f" ({100 * trainable / total:.3g}%)" if total else ""
    lines = [f"Trainable parameters: {trainable:,} of {total:,}{share}"]
    moved = step_transfer_bytes(trainer)
    if moved is not None:
        up, down, what = moved
        per_step = f"{_size(up)} up, {_size(down)} back" if up else "none"
        lines.append(f"Moved per step: {per_step} ({what})")
    lines.append(f"Host memory in use: {_size(current_host_rss_bytes())} (resident set of this process)")
    return "\n".join(lines)


class SizeReport(L.Callback):
    """Prints :func:`size_report` on global rank 0 when fit starts (after the strategy has placed the model).

    The text is kept in :attr:`text`.
    """

    def __init__(self) -> None:
        self.text = ""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.text = size_report(trainer, pl_module)
            rank_zero_info(self.text)


class _RichBar(RichProgressBar):
    """Lightning's rich bar; the training bar says ``Epoch 3``, not ``Epoch 3/-2``, when epochs are unbounded
    (as Lightning's own fix, PR 21924, does in its later releases)."""

    def _get_train_description(self, current_epoch: int) -> str:
        description = super()._get_train_description(current_epoch)
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs < 0:
            description = description.replace(f"Epoch {current_epoch}/{max_epochs - 1}", f"Epoch {current_epoch}")
        return description


def progress_bar(enabled: bool = True) -> ProgressBar | None:
    """The progress bar of a run: rich when ``rich`` is installed (as Lightning picks), else tqdm.

    Args:
        enabled: ``trainer.enable_progress_bar``; ``False`` returns ``None`` (no bar: Lightning refuses a progress
            bar callback on a Trainer with the bar turned off).
    """
    if not enabled:
        return None
    try:
        return _RichBar()
    except ModuleNotFoundError:  # RichProgressBar without the rich package
        return TQDMProgressBar()
