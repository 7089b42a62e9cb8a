"""Gather a sequence's KV blocks into one contiguous staging tensor, and scatter it back.

Why staging: a block of one layer is contiguous in the paged cache, but a transfer covers
every layer's K and V (and, inside a TP group, a rank's range of heads, which is strided).
One packed tensor `[blocks, layers, 2 (K, V), block_size, heads, head_dim]` is one registered
buffer and one message. On the wire it holds every KV head of the model whatever the TP
split; `shards` moves head ranges between a group's leader and its ranks. At TP 1 both
functions run off the engine's stepping thread (the blocks involved are held by the
transfer, so no step writes them meanwhile); under TP they run on it, between two steps.
"""

from __future__ import annotations

import torch


def staging_shape(
    num_blocks: int, num_layers: int, block_size: int, num_heads: int, head_dim: int
) -> tuple[int, ...]:
    return (num_blocks, num_layers, 2, block_size, num_heads, head_dim)


def empty_staging(
    k: list[torch.Tensor], num_blocks: int, num_heads: int | None = None
) -> torch.Tensor:
    """An uninitialised staging tensor for `num_blocks` of a cache shaped like `k` (per layer
    [blocks, block_size, heads, head_dim]), with `num_heads` heads (default: the cache's)."""
    _, block_size, local_heads, head_dim = k[0].shape
    heads = local_heads if num_heads is None else num_heads
    shape = staging_shape(num_blocks, len(k), block_size, heads, head_dim)
    return torch.empty(shape, dtype=k[0].dtype, device=k[0].device)


def pack_blocks(
    k: list[torch.Tensor],
    v: list[torch.Tensor],
    block_ids: list[int],
    heads: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Copy `block_ids` of every layer (local heads [lo, hi), default all) into staging."""
    lo, hi = heads or (0, k[0].shape[2])
    index = torch.tensor(block_ids, dtype=torch.long, device=k[0].device)
    out = empty_staging(k, len(block_ids), hi - lo)
    for layer, (k_layer, v_layer) in enumerate(zip(k, v, strict=True)):
        out[:, layer, 0] = k_layer.index_select(0, index)[:, :, lo:hi]
        out[:, layer, 1] = v_layer.index_select(0, index)[:, :, lo:hi]
    return out


def unpack_blocks(
    staging: torch.Tensor,
    k: list[torch.Tensor],
    v: list[torch.Tensor],
    block_ids: list[int],
    head_offset: int = 0,
) -> None:
    """Write staging (from `pack_blocks`) into `block_ids` at local heads from `head_offset`."""
    if staging.shape[0] != len(block_ids):
        raise ValueError(f"{staging.shape[0]} staged blocks for {len(block_ids)} block ids")
    staging = staging.to(k[0].device, non_blocking=True)
    index = torch.tensor(block_ids, dtype=torch.long, device=k[0].device)
    hi = head_offset + staging.shape[4]
    for layer, (k_layer, v_layer) in enumerate(zip(k, v, strict=True)):
        k_layer[:, :, head_offset:hi].index_copy_(0, index, staging[:, layer, 0])
        v_layer[:, :, head_offset:hi].index_copy_(0, index, staging[:, layer, 1])
