"""KV between a TP group's leader and its ranks' head shards (disaggregation with TP), without
processes: head slicing (global staging <-> per-rank staging), the `KvScatter`/`KvGather`
commands run by every rank of a simulated group, and a full prefill TP S -> decode TP T
move through the global staging. (The engine's side: engine/test_group_command.py.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mpi_workers.kv_transfer.blocks import pack_blocks, staging_shape
from mpi_workers.kv_transfer.layout import head_range
from mpi_workers.kv_transfer.shards import (
    KvGather,
    KvScatter,
    join_heads,
    lead_gather,
    lead_scatter,
    split_heads,
)

LAYERS, BLOCK, DIM, POOL = 2, 4, 5, 12
# (KV heads, TP) pairs that `head_range` splits: even splits, one head each, replicated heads
SHARDINGS = [(3, 1), (3, 3), (4, 2), (2, 4), (3, 6)]


def global_cache(heads: int, seed: int = 0) -> SimpleNamespace:
    """A whole-model paged cache with distinct values everywhere."""
    g = torch.Generator().manual_seed(seed)
    shape = (POOL, BLOCK, heads, DIM)
    return SimpleNamespace(
        k=[torch.randn(shape, generator=g) for _ in range(LAYERS)],
        v=[torch.randn(shape, generator=g) for _ in range(LAYERS)],
    )


def shard(cache: SimpleNamespace, heads: int, tp: int, rank: int) -> SimpleNamespace:
    """What rank `rank` of a TP group holds: its head range of every block."""
    lo, hi = head_range(heads, tp, rank)
    return SimpleNamespace(
        k=[t[:, :, lo:hi].clone() for t in cache.k], v=[t[:, :, lo:hi].clone() for t in cache.v]
    )


def empty_shards(heads: int, tp: int) -> list[SimpleNamespace]:
    lo, hi = head_range(heads, tp, 0)
    shape = (POOL, BLOCK, hi - lo, DIM)
    return [
        SimpleNamespace(
            k=[torch.zeros(shape) for _ in range(LAYERS)],
            v=[torch.zeros(shape) for _ in range(LAYERS)],
        )
        for _ in range(tp)
    ]


class FakeGroup:
    """A TP group's scatter/gather in one thread: the leader's half and the followers' halves
    run one after another, meeting in a mailbox (the real ones are torch.distributed)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.mailbox: dict[int, torch.Tensor] = {}
        self.ranks = [FakeRank(self, r) for r in range(size)]


class FakeRank:
    def __init__(self, group: FakeGroup, rank: int) -> None:
        self.group, self.rank, self.size = group, rank, group.size

    def scatter(self, out: torch.Tensor, parts: list[torch.Tensor] | None = None) -> torch.Tensor:
        if self.rank == 0:
            assert parts is not None and len(parts) == self.size
            assert all(p.is_contiguous() and p.shape == out.shape for p in parts)
            self.group.mailbox = dict(enumerate(parts))
        out.copy_(self.group.mailbox.pop(self.rank))
        return out

    def gather_list(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        self.group.mailbox[self.rank] = x.clone()
        if self.rank != 0:
            return None
        return [self.group.mailbox.pop(r) for r in range(self.size)]


@pytest.mark.parametrize(("heads", "tp"), SHARDINGS)
def test_split_then_join_is_the_identity(heads: int, tp: int) -> None:
    staging = torch.randn(staging_shape(3, LAYERS, BLOCK, heads, DIM))
    parts = split_heads(staging, heads, tp)
    assert len(parts) == tp
    for rank, part in enumerate(parts):
        lo, hi = head_range(heads, tp, rank)
        assert part.is_contiguous()
        assert torch.equal(part, staging[:, :, :, :, lo:hi])
    assert torch.equal(join_heads(parts, heads), staging)


def test_split_refuses_a_staging_of_local_heads() -> None:
    with pytest.raises(ValueError, match="holds 1 heads, not 3"):
        split_heads(torch.zeros(staging_shape(1, LAYERS, BLOCK, 1, DIM)), 3, 3)


@pytest.mark.parametrize("src_tp", [1, 3, 6])
@pytest.mark.parametrize("dst_tp", [1, 3, 6])
def test_prefill_tp_to_decode_tp_moves_every_head_into_the_right_blocks(
    src_tp: int, dst_tp: int
) -> None:
    """Prefill ranks hold blocks [2, 7, 5] of a global cache; decode ranks receive them at
    blocks [9, 0, 4] of theirs: each decode rank ends with exactly its heads, nothing else."""
    heads, src_blocks, dst_blocks = 3, [2, 7, 5], [9, 0, 4]
    truth = global_cache(heads)
    # prefill side: every follower answers the gather command, then the leader joins
    prefill = FakeGroup(src_tp)
    caches = [shard(truth, heads, src_tp, r) for r in range(src_tp)]
    command = KvGather(src_blocks)
    for rank in range(1, src_tp):
        command.follow(caches[rank], prefill.ranks[rank])
    staging = lead_gather(prefill.ranks[0], caches[0], src_blocks, heads)  # type: ignore[arg-type]
    assert torch.equal(staging, pack_blocks(truth.k, truth.v, src_blocks))
    # decode side: the leader scatters, every follower runs the scatter command
    decode = FakeGroup(dst_tp)
    targets = empty_shards(heads, dst_tp)
    lead_scatter(decode.ranks[0], targets[0], staging, dst_blocks, heads)  # type: ignore[arg-type]
    for rank in range(1, dst_tp):
        KvScatter(dst_blocks).follow(targets[rank], decode.ranks[rank])
    untouched = [b for b in range(POOL) if b not in dst_blocks]
    for rank, target in enumerate(targets):
        lo, hi = head_range(heads, dst_tp, rank)
        for layer in range(LAYERS):
            for src, dst in zip(src_blocks, dst_blocks, strict=True):
                assert torch.equal(target.k[layer][dst], truth.k[layer][src, :, lo:hi])
                assert torch.equal(target.v[layer][dst], truth.v[layer][src, :, lo:hi])
            assert not target.k[layer][untouched].any()
