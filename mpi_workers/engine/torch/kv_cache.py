"""The paged KV tensors: per layer, K and V of shape [num_blocks, block_size, kv_heads, head_dim].

The pool is sized either explicitly (`num_blocks`) or from a memory budget; block ids are
handed out by `block_manager.BlockManager`.
"""

from __future__ import annotations

import logging

import torch

from mpi_workers.engine.torch.model_config import ModelConfig

logger = logging.getLogger(__name__)


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
