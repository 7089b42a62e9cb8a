"""Shared fixtures for the torch engine tests: the real SmolLM2 folder and tiny random models."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    from hpcserve.model_prepare import prepare_default_model

    return prepare_default_model()


def write_tiny_model(
    path: Path, kind: str = "llama", max_shard_size: str | None = None, **overrides
) -> Path:
    """A random-weight HF model folder (safetensors) small enough for millisecond tests."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    common = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        eos_token_id=2,
        bos_token_id=1,
    )
    common.update(overrides)
    torch.manual_seed(0)
    if kind == "llama":
        common.setdefault("tie_word_embeddings", True)
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif kind == "qwen2":
        common.setdefault("tie_word_embeddings", False)
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(kind)
    with torch.no_grad():  # HF inits biases to zero: make them matter
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    extra = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.to(torch.float32).save_pretrained(path, safe_serialization=True, **extra)
    return path


@pytest.fixture(scope="session")
def tiny_model_writer():
    """`write_tiny_model` as a fixture (test modules here are not a package)."""
    return write_tiny_model


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="module")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")
