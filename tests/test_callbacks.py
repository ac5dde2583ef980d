"""The default run's callbacks: the memory/throughput monitor (per-step metrics, bytes moved read from the strategy,
the run summary), the size report at fit start, the progress bar."""

from types import SimpleNamespace

import pytest
import torch

from zo2_lightning.callbacks import (
    ThroughputMemoryMonitor,
    count_tokens,
    peak_host_rss_bytes,
    progress_bar,
    step_transfer_bytes,
    streamer_bytes,
)
from zo2_lightning.engine import EngineOptions


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


# ------------------------------------------------------------------ the size report at fit start
def _streaming_trainer(blocks, root_device=torch.device("cuda", 0), **options):
    strategy = SimpleNamespace(engine=SimpleNamespace(blocks=blocks), root_device=root_device,
                               engine_options=EngineOptions(**options))
    return SimpleNamespace(strategy=strategy, optimizers=[])


def test_bytes_per_step_are_the_streamed_blocks_up_and_their_trainable_parameters_back():
    blocks = [torch.nn.Linear(8, 8) for _ in range(3)]  # 72 parameters each
    blocks[2].weight.requires_grad_(False)  # 8 trainable left in the last block
    up, down, what = step_transfer_bytes(_streaming_trainer(blocks))
    assert (up, down) == (3 * 72 * 4, (72 + 72 + 8) * 4) and "3 of 3 blocks" in what
    up, down, what = step_transfer_bytes(_streaming_trainer(blocks, storage_dtype="bf16", resident_blocks=1))
    assert (up, down) == (2 * 72 * 2, (72 + 8) * 2) and "bfloat16" in what  # 16-bit storage, one block stays
    conservative = _streaming_trainer(blocks)
    conservative.optimizers = [SimpleNamespace(conservative=True, param_groups=[])]  # ZOSGDCons: a second pass
    assert step_transfer_bytes(conservative)[:2] == (2 * 3 * 72 * 4, (72 + 72 + 8) * 4)


def test_nothing_moves_where_the_blocks_are_used_in_place():
    blocks = [torch.nn.Linear(8, 8)]
    assert step_transfer_bytes(_streaming_trainer(blocks, root_device=torch.device("cpu")))[:2] == (0, 0)
    assert step_transfer_bytes(_streaming_trainer(blocks, offload_device=None))[:2] == (0, 0)
    assert step_transfer_bytes(SimpleNamespace(strategy=SimpleNamespace())) is None  # not a ZO strategy


def test_the_size_report_of_a_lora_run_counts_only_the_adapters(tmp_path, monkeypatch):
    from tests.run_helpers import compose_run
    from zo2_lightning import callbacks
    from zo2_lightning.train import train

    printed = []
    monkeypatch.setattr(callbacks, "rank_zero_info", printed.append)
    _, objects = train(compose_run(tmp_path, ["trainer=debug", "trainer.max_steps=1", "tuning=lora", "logger=none"]))
    model = objects["model"]
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    total = sum(p.numel() for p in model.parameters())
    assert len(printed) == 1 and printed[0].startswith(f"Trainable parameters: {lora:,} of {total:,} (")
    assert "Moved per step: none" in printed[0] and "Host memory in use:" in printed[0]


def test_the_progress_bar_has_no_negative_epoch_total():
    bar = progress_bar(enabled=True)
    bar._trainer = SimpleNamespace(max_epochs=-1)  # a run bounded by max_steps
    assert bar._get_train_description(3).strip() == "Epoch 3"
    assert progress_bar(enabled=False) is None
