"""Building models: refuse before allocating what host memory cannot hold."""

import pytest

from zo2_lightning import models


def test_a_model_larger_than_host_memory_is_refused_before_allocating(monkeypatch):
    monkeypatch.setattr(models, "available_host_bytes", lambda: 10 * 2**20)  # 10 MiB available
    shape = dict(hidden_size=512, num_hidden_layers=4, ffn_dim=2048, num_attention_heads=8, vocab_size=8192,
                 word_embed_proj_dim=512, max_position_embeddings=128)
    with pytest.raises(models.HostMemoryError, match=r"need 0\.\d GiB .* only 0\.0 GiB is available"):
        models.build_model(arch="opt", init="random", shape=shape)


def test_the_estimate_is_the_parameter_bytes():
    from transformers import AutoConfig, AutoModelForCausalLM
    import torch

    cfg = AutoConfig.for_model("opt", hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                               vocab_size=300, word_embed_proj_dim=64, max_position_embeddings=64)
    need = models.check_fits_in_host_memory(AutoModelForCausalLM, cfg, torch.float32)
    real = AutoModelForCausalLM.from_config(cfg)
    assert need == sum(p.numel() * 4 for p in real.parameters())
