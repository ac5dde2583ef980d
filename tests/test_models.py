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


def _build_following_the_error(tmp_path, overrides):
    """Build the model of ``overrides``; it must fail on the vocabulary, and the overrides the error suggests
    must make it build. Returns the message and the model built."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from tests.run_helpers import compose_run, suggested_overrides

    with pytest.raises(InstantiationException, match="tokens but the model only") as err:  # Hydra's wrapper
        instantiate(compose_run(tmp_path, overrides).model, _convert_="all")
    fix = suggested_overrides(str(err.value))
    assert fix, f"no override to follow in: {err.value}"
    return str(err.value), instantiate(compose_run(tmp_path, [*overrides, *fix]).model, _convert_="all")


def test_a_tokenizer_larger_than_a_pretrained_vocabulary_suggests_a_fix_that_works(tmp_path):
    """A pretrained model's vocabulary is fixed by its weights: the fix is a tokenizer that fits (its own)."""
    from tests.run_helpers import word_tokenizer

    bundle = models.build_model(arch="opt", init="random", tokenizer=models.BYTES, shape=dict(
        vocab_size=300, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
        word_embed_proj_dim=16, max_position_embeddings=32))
    bundle.model.resize_token_embeddings(64)  # a vocabulary smaller than the byte tokenizer's 261 tokens
    bundle.model.save_pretrained(tmp_path / "saved")
    word_tokenizer(["yes", "no"]).save_pretrained(tmp_path / "saved")
    message, built = _build_following_the_error(
        tmp_path, ["model=local", f"model.name_or_path={tmp_path / 'saved'}", "model.tokenizer=bytes"])
    assert "model.shape" not in message  # a pretrained model does not read its shape
    assert built.model.config.vocab_size == 64 and len(built.tokenizer) <= 64


@pytest.mark.parametrize("overrides", [["model=tiny", "model.shape.vocab_size=100"],
                                       ["model=tiny", "model.arch=null", "model.name_or_path=SAVED",
                                        "model.shape.vocab_size=100"]], ids=["from-shape", "from-a-saved-config"])
def test_a_tokenizer_larger_than_a_random_vocabulary_suggests_a_fix_that_works(tmp_path, overrides):
    if "model.name_or_path=SAVED" in overrides:  # random init from a saved config of 100 words: shape is not read
        from transformers import AutoConfig

        AutoConfig.for_model("opt", vocab_size=100, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                             num_attention_heads=2, word_embed_proj_dim=16).save_pretrained(tmp_path / "saved")
        overrides = [o.replace("SAVED", str(tmp_path / "saved")) for o in overrides]
    _, built = _build_following_the_error(tmp_path, overrides)
    assert built.model.config.vocab_size >= len(built.tokenizer) == models.BYTE_VOCAB_SIZE
