"""HF config parsing: rope spellings, qwen2 bias, eos ids, unsupported values."""

from __future__ import annotations

import json

import pytest
import torch

from mpi_workers.engine.torch.layers import rope_inv_freq
from mpi_workers.engine.torch.model_config import load_model_config, parse_model_config

BASE = dict(
    vocab_size=100,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def test_smollm_config(smol_dir):
    cfg = load_model_config(smol_dir)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 9, 3, 64)
    assert cfg.rope_theta == 100000.0 and cfg.rope_scaling is None
    assert cfg.tie_word_embeddings and not cfg.attention_bias
    assert cfg.eos_token_ids == (2,)


def test_old_rope_spelling_and_generation_eos(tmp_path):
    raw = dict(
        BASE,
        model_type="llama",
        rope_theta=5e5,
        eos_token_id=[5, 6],
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    )
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [6, 7]}))
    cfg = load_model_config(tmp_path)
    assert cfg.rope_theta == 5e5 and cfg.rope_type == "llama3"
    assert cfg.eos_token_ids == (5, 6, 7)
    assert cfg.head_dim == 16


def test_qwen2_has_attention_bias_by_default():
    cfg = parse_model_config(dict(BASE, model_type="qwen2"))
    assert cfg.attention_bias


def test_unknown_rope_type_is_a_clear_error():
    with pytest.raises(ValueError, match="rope"):
        parse_model_config(dict(BASE, rope_scaling={"type": "longrope", "factor": 2.0}))


def test_unknown_model_type_is_a_clear_error():
    with pytest.raises(ValueError, match="model_type"):
        parse_model_config(dict(BASE, model_type="gpt2"))


def test_linear_rope_scaling_divides_frequencies():
    base = rope_inv_freq(16, 10000.0, None)
    scaled = rope_inv_freq(16, 10000.0, {"rope_type": "linear", "factor": 4.0})
    assert torch.allclose(scaled, base / 4)


def test_sliding_window_is_ignored_with_warning(caplog):
    cfg = parse_model_config(dict(BASE, model_type="mistral", sliding_window=4096))
    assert cfg.model_type == "mistral"
    assert "sliding_window" in caplog.text
