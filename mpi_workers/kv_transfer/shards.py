"""KV blocks between a tensor-parallel group's leader and its ranks' head shards.

Why through the leader: the transfer endpoint (NATS subjects, transport, ticket) lives on
the group's leader only, so one transfer is one registered buffer and one message whatever
the TP degrees of the two groups. What travels is the *global* staging tensor
(`blocks.staging_shape` with every KV head of the model); each side maps between it and its
ranks' head ranges with `layout.plan_head_transfers`, so any (prefill TP, decode TP) pair
that `layout.head_range` can split works:

- decode side (`KvScatter`): the leader splits the received staging by rank and scatters
  it; every rank writes its heads into the reserved block ids of its own cache.
- prefill side (`KvGather`): every rank packs its heads of the held blocks; the leader
  gathers them and joins them into the global staging it pushes.

The commands travel to the followers on the step-plan channel (`TpRuntime.broadcast_object`,
between two steps, sent by `TorchEngine.run_group_command` on the stepping thread); the data
moves with one scatter or gather on the group's data collectives (gloo on CPU, NCCL on GPU),
whose timeout bounds a dead rank like any step's all-reduce.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mpi_workers.kv_transfer.blocks import empty_staging, pack_blocks, unpack_blocks
from mpi_workers.kv_transfer.layout import plan_head_transfers

if TYPE_CHECKING:
    from mpi_workers.engine.torch.tp import TpRuntime

HEADS = 4  # the heads dimension of a staging tensor [blocks, layers, 2, block_size, heads, dim]


def _heads(t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return t.narrow(HEADS, lo, hi - lo)


def split_heads(staging: torch.Tensor, num_kv_heads: int, tp_size: int) -> list[torch.Tensor]:
    """Global staging -> one contiguous staging per rank of a TP group, of its local heads."""
    if staging.shape[HEADS] != num_kv_heads:
        raise ValueError(f"staging holds {staging.shape[HEADS]} heads, not {num_kv_heads}")
    parts: list[torch.Tensor | None] = [None] * tp_size
    for s in plan_head_transfers(num_kv_heads, 1, tp_size):
        parts[s.dst] = _heads(staging, s.lo, s.hi).contiguous()  # one slice per rank
    assert all(p is not None for p in parts)
    return parts  # type: ignore[return-value]


def join_heads(parts: list[torch.Tensor], num_kv_heads: int) -> torch.Tensor:
    """Every rank's local staging (rank order) -> the global staging; a replicated head
    (more ranks than heads) is taken from the lowest rank holding it."""
    first = parts[0]
    shape = (*first.shape[:HEADS], num_kv_heads, *first.shape[HEADS + 1 :])
    out = torch.empty(shape, dtype=first.dtype, device=first.device)
    for s in plan_head_transfers(num_kv_heads, len(parts), 1):
        width = s.hi - s.lo
        _heads(out, s.lo, s.hi).copy_(_heads(parts[s.src], s.src_offset, s.src_offset + width))
    return out


@dataclass(frozen=True)
class KvScatter:
    """Step-plan command: receive your heads of `block_ids` from the leader, write them."""

    block_ids: list[int]

    def follow(self, cache: Any, tp: TpRuntime) -> None:
        part = tp.scatter(empty_staging(cache.k, len(self.block_ids)))
        unpack_blocks(part, cache.k, cache.v, self.block_ids)


@dataclass(frozen=True)
class KvGather:
    """Step-plan command: send the leader your heads of `block_ids`."""

    block_ids: list[int]

    def follow(self, cache: Any, tp: TpRuntime) -> None:
        tp.gather_list(pack_blocks(cache.k, cache.v, self.block_ids))


def lead_scatter(
    tp: TpRuntime, cache: Any, staging: torch.Tensor, block_ids: list[int], num_kv_heads: int
) -> None:
    """The leader's half of `KvScatter` (after broadcasting it): split, scatter, write ours."""
    parts = split_heads(staging.to(cache.k[0].device), num_kv_heads, tp.size)
    mine = tp.scatter(torch.empty_like(parts[0]), parts)
    unpack_blocks(mine, cache.k, cache.v, block_ids)


def lead_gather(tp: TpRuntime, cache: Any, block_ids: list[int], num_kv_heads: int) -> torch.Tensor:
    """The leader's half of `KvGather` (after broadcasting it): the global staging."""
    parts = tp.gather_list(pack_blocks(cache.k, cache.v, block_ids))
    assert parts is not None  # rank 0
    return join_heads(parts, num_kv_heads)
