"""How big the KV pool is: a fixed budget on CPU, the GPU's memory on CUDA (the arithmetic,
with the GPU's memory report stood in for: the real GPU run is in test_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from mpi_workers.engine.torch.engine import pool_sizes
from mpi_workers.engine.torch.kv_cache import GPU_RESERVE_BYTES, bytes_per_block, weight_bytes
from mpi_workers.engine.torch.model_config import ModelConfig

GIB = 2**30


def llama8b() -> ModelConfig:
    return ModelConfig(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=False,
        attention_bias=False,
    )  # fmt: skip


def test_weight_estimate_is_the_checkpoint_size() -> None:
    assert abs(weight_bytes(llama8b(), torch.bfloat16) - 16.06e9) < 0.01e9  # 8.03 B params
    assert weight_bytes(llama8b(), torch.bfloat16, tp_size=2) == weight_bytes(
        llama8b(), torch.bfloat16
    ) // 2


def test_gpu_pool_is_what_the_utilization_leaves(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, dtype = llama8b(), torch.bfloat16
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (140 * GIB, 141 * GIB))
    blocks, limit = pool_sizes(cfg, 16, dtype, None, None, None, 1, torch.device("cuda"), 0.9)
    budget = int(0.9 * 141 * GIB) - weight_bytes(cfg, dtype) - GPU_RESERVE_BYTES
    assert blocks == budget // bytes_per_block(cfg, 16, dtype)
    assert limit == cfg.max_position_embeddings  # ~800k tokens fit: the model's limit rules
    # another process holds most of the GPU: only what is free counts
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (30 * GIB, 141 * GIB))
    blocks, _ = pool_sizes(cfg, 16, dtype, None, None, None, 1, torch.device("cuda"), 0.9)
    assert blocks == (30 * GIB - weight_bytes(cfg, dtype) - GPU_RESERVE_BYTES) // (
        bytes_per_block(cfg, 16, dtype)
    )
    # an explicit budget or block count still wins, on any device
    assert pool_sizes(cfg, 16, dtype, 7, None, None, 1, torch.device("cuda"))[0] == 7
    explicit = pool_sizes(cfg, 16, dtype, None, 2 * GIB, None, 1, torch.device("cuda"))[0]
    assert explicit == 2 * GIB // bytes_per_block(cfg, 16, dtype)


def test_too_little_gpu_memory_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (16 * GIB, 16 * GIB))
    with pytest.raises(ValueError, match=r"engine\.gpu_memory_utilization"):
        pool_sizes(llama8b(), 16, torch.bfloat16, None, None, None, 1, torch.device("cuda"))


def test_cpu_keeps_the_fixed_default() -> None:
    cfg = llama8b()
    blocks, _ = pool_sizes(cfg, 16, torch.float32, None, None, None, 1, torch.device("cpu"))
    assert blocks == 512 * 2**20 // bytes_per_block(cfg, 16, torch.float32)
