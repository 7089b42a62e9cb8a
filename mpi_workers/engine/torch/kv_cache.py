"""The paged KV tensors: per layer, K and V of shape [num_blocks, block_size, kv_heads, head_dim].

The pool is sized either explicitly (`num_blocks`) or from a memory budget; block ids are
handed out by `block_manager.BlockManager`.
"""

from __future__ import annotations

import logging

import torch

from mpi_workers.engine.torch.model_config import ModelConfig

logger = logging.getLogger(__name__)


GPU_RESERVE_BYTES = 2 * 2**30  # activations, logits, CUDA graphs and the allocator's slack


def weight_bytes(cfg: ModelConfig, dtype: torch.dtype, tp_size: int = 1) -> int:
    """The model's weights on one rank (estimated from the config, before loading: the KV
    pool is sized first because the RoPE tables depend on the context it allows)."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layer = cfg.hidden_size * (q + 2 * kv) + q * cfg.hidden_size
    layer += 3 * cfg.hidden_size * cfg.intermediate_size
    head = 1 if cfg.tie_word_embeddings else 2
    elem = torch.empty(0, dtype=dtype).element_size()
    return elem * (cfg.num_layers * layer + head * cfg.vocab_size * cfg.hidden_size) // tp_size


def gpu_kv_budget(
    cfg: ModelConfig, dtype: torch.dtype, device: torch.device, utilization: float, tp_size: int
) -> int:
    """Bytes for the KV pool on this GPU: `utilization` of its memory, less the weights and a
    reserve for activations and graphs; never more than is free now (other processes)."""
    free, total = torch.cuda.mem_get_info(device)
    weights = weight_bytes(cfg, dtype, tp_size)
    budget = min(int(utilization * total), free) - weights - GPU_RESERVE_BYTES
    if budget <= 0:
        raise ValueError(
            f"engine.gpu_memory_utilization: {utilization} of {total / 2**30:.1f} GiB "
            f"({free / 2**30:.1f} GiB free) leaves no room for the KV cache after "
            f"{weights / 2**30:.1f} GiB of weights and a {GPU_RESERVE_BYTES / 2**30:.0f} GiB "
            "reserve"
        )
    return budget


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype, tp_size: int = 1) -> int:
    kv_heads = max(1, cfg.num_kv_heads // tp_size)
    elem = torch.empty(0, dtype=dtype).element_size()
    return 2 * cfg.num_layers * block_size * kv_heads * cfg.head_dim * elem


def blocks_for_budget(
    cfg: ModelConfig, block_size: int, dtype: torch.dtype, memory_bytes: int, tp_size: int = 1
) -> int:
    return max(1, memory_bytes // bytes_per_block(cfg, block_size, dtype, tp_size))


class KvCache:
    """Owns the cache tensors; `k[layer]`, `v[layer]` are what the attention layers read."""

    def __init__(
        self,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        tp_size: int = 1,
    ) -> None:
        kv_heads = max(1, cfg.num_kv_heads // tp_size)
        shape = (num_blocks, block_size, kv_heads, cfg.head_dim)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        total = 2 * cfg.num_layers * self.k[0].numel() * self.k[0].element_size()
        logger.info(
            "KV cache: %d blocks of %d tokens, %.1f MiB", num_blocks, block_size, total / 2**20
        )
