"""benchmarks/memory_model.py: what it measures on the meta device is what the same step allocates on the CPU, and
its loss is LMTask's."""

import importlib
from pathlib import Path

import pytest
import torch
import transformers as tf

from zo2_lightning.tasks.head_loss import lm_loss_at, split_head

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def memory_model(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("memory_model")


def _opt(device, dtype=torch.bfloat16, hidden=64, layers=3, seq=256):
    cfg = tf.OPTConfig(vocab_size=1000, hidden_size=hidden, num_hidden_layers=layers, ffn_dim=4 * hidden,
                       num_attention_heads=4, max_position_embeddings=seq + 2, word_embed_proj_dim=hidden,
                       use_cache=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        return tf.OPTForCausalLM(cfg).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_meta_count_of_a_step_equals_the_cpu_count(memory_model, dtype):
    """The same tensors, of the same sizes, alive at the peak, up to a couple of the loss's 4-byte partial sums the two
    devices free at different moments. In bf16 the CPU's layer norm also keeps its per-row mean and rstd in bf16
    where CUDA's (and the meta kernel) keep fp32: the meta count is then the GPU's, a few bytes above the CPU's."""
    kwargs = dict(seq=256, head_chunk_mib=1 / 16)  # several chunks of the head
    on_cpu = memory_model.forward_temporaries(_opt("cpu", dtype), torch.device("cpu"), **kwargs)
    on_meta = memory_model.forward_temporaries(_opt("meta", dtype), torch.device("meta"), **kwargs)
    scalars = 4 * 4
    assert on_cpu > 0
    if dtype == torch.float32:
        assert abs(on_meta - on_cpu) <= scalars
    else:  # at most one layer norm's rows, 2 more bytes each for its 2 statistics
        assert -scalars <= on_meta - on_cpu <= 2 * 256 * 2 + scalars


def test_the_meta_count_would_hold_attention_scores_a_gpu_never_does_without_the_fused_kernel(memory_model):
    """Why the fused kernel stands in on meta: decomposed, the step holds heads x seq x seq scores."""
    fused = memory_model.forward_temporaries(_opt("meta"), torch.device("meta"), seq=256)
    real = memory_model.fused_attention
    memory_model.fused_attention = lambda: __import__("contextlib").nullcontext()
    try:
        decomposed = memory_model.forward_temporaries(_opt("meta"), torch.device("meta"), seq=256)
    finally:
        memory_model.fused_attention = real
    assert decomposed > fused + 4 * 256 * 256 * 2  # at least one (heads, seq, seq) bf16 tensor more


def test_the_loss_on_every_position_is_lm_task_s(memory_model):
    model = _opt("cpu", dtype=torch.float32)
    parts = split_head(model)
    ids = torch.randint(0, 1000, (2, 32))
    hidden = parts.backbone(input_ids=ids).last_hidden_state
    assert torch.equal(memory_model.lm_loss_every_position(hidden, parts.head, ids, 7),
                       lm_loss_at(hidden, parts.head, ids, 7))


def test_the_tables_cover_the_option_sets_and_the_goal(memory_model):
    lines = memory_model.tables(["1.3b"])
    text = "\n".join(lines)
    assert "| 1.3b | 3.75 |" in text and "Goal for the least-memory options" in text
    assert all(name in text for name in memory_model.OPTION_SETS)
