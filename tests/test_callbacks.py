"""The memory/throughput monitor: per-step metrics, bytes moved read from the strategy, the run summary."""

from types import SimpleNamespace

import pytest
import torch

from zo2_lightning.callbacks import ThroughputMemoryMonitor, count_tokens, peak_host_rss_bytes, streamer_bytes


class _Module:
    def __init__(self):
        self.logged = []

    def log_dict(self, metrics, **kwargs):
        self.logged.append(metrics)


def _trainer(streamer=None):
    engine = SimpleNamespace(streamer=streamer) if streamer is not None else None
    strategy = SimpleNamespace(root_device=torch.device("cpu"), engine=engine)
    return SimpleNamespace(strategy=strategy, global_step=0)


def test_tokens_are_the_attention_masks_ones():
    assert count_tokens({"input_ids": torch.zeros(2, 5), "attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])}) == 3
    assert count_tokens({"input_ids": torch.zeros(2, 5)}) == 10
    assert count_tokens([torch.zeros(3)]) == 0


def test_bytes_moved_per_step_come_from_the_streamers_counters():
    streamer = SimpleNamespace(bytes_uploaded=100, bytes_offloaded=40)
    trainer, module = _trainer(streamer), _Module()
    monitor = ThroughputMemoryMonitor(warmup_steps=0)
    monitor.on_train_start(trainer, module)
    batch = {"attention_mask": torch.ones(2, 8)}
    for step in range(3):
        trainer.global_step = step
        monitor.on_train_batch_start(trainer, module, batch, step)
        streamer.bytes_uploaded += 1024**3  # 1 GiB up and 0.5 GiB down per step
        streamer.bytes_offloaded += 1024**3 // 2
        monitor.on_train_batch_end(trainer, module, None, batch, step)
    assert [m["perf/gb_uploaded"] for m in module.logged] == [1.0, 1.0, 1.0]
    assert module.logged[0]["perf/gb_offloaded"] == 0.5
    assert module.logged[0]["perf/tokens_per_s"] == pytest.approx(16 / module.logged[0]["perf/step_time_s"])
    assert module.logged[0]["perf/peak_mem_gb"] == pytest.approx(peak_host_rss_bytes() / 1024**3, rel=0.1)
    assert monitor.summary["steps"] == 3 and monitor.summary["gb_uploaded_per_step"] == 1.0


def test_without_counters_no_bytes_are_reported():
    trainer, module = _trainer(), _Module()
    assert streamer_bytes(trainer) is None
    monitor = ThroughputMemoryMonitor()
    monitor.on_train_start(trainer, module)
    monitor.on_train_batch_start(trainer, module, {}, 0)
    monitor.on_train_batch_end(trainer, module, None, {}, 0)
    assert "perf/gb_uploaded" not in module.logged[0] and "gb_uploaded_per_step" not in monitor.summary
