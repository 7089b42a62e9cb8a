"""What both ends of a KV transfer must agree on, and how KV heads map across TP degrees.

The transfer is described in *global* KV-head indices so that a prefill group and a decode
group with different tensor-parallel degrees can still exchange blocks: each rank holds a
contiguous range of heads, and `plan_head_transfers` says which source rank sends which
head range to which destination rank. Pure functions, unit-tested without any transport.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


class KvLayoutMismatch(ValueError):
    """The two sides disagree on block size, dtype, head_dim, layers or heads."""


@dataclass(frozen=True)
class KvLayout:
    """The shape of one side's KV pool, as exchanged in every transfer handshake.

    `num_kv_heads` is the model's and `tp_size` the side's own degree: the two sides may
    differ in `tp_size` because the transferred staging always holds every global head (each
    group's leader splits or joins its ranks' ranges, see `shards`).
    """

    num_layers: int
    block_size: int
    num_kv_heads: int  # global (whole model), not per rank
    head_dim: int
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "float32"
    tp_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KvLayout:
        return cls(**data)

    def check_compatible(self, other: KvLayout) -> None:
        """KvLayoutMismatch naming every field that differs (tp_size may differ)."""
        diffs = [
            f"{name}: {getattr(self, name)!r} here vs {getattr(other, name)!r} remote"
            for name in ("num_layers", "block_size", "num_kv_heads", "head_dim", "dtype")
            if getattr(self, name) != getattr(other, name)
        ]
        if diffs:
            raise KvLayoutMismatch(
                "KV layout mismatch between prefill and decode: " + "; ".join(diffs)
            )


def head_range(num_kv_heads: int, tp_size: int, rank: int) -> tuple[int, int]:
    """Global [lo, hi) KV heads held by `rank` of a TP group of `tp_size`.

    Heads are split evenly and contiguously (what the TP linear layers do); when there are
    fewer KV heads than ranks, heads are replicated: rank r holds head r * heads // tp.
    """
    if tp_size < 1 or not 0 <= rank < tp_size:
        raise ValueError(f"rank {rank} outside a TP group of {tp_size}")
    if num_kv_heads >= tp_size:
        if num_kv_heads % tp_size:
            raise ValueError(f"{num_kv_heads} KV heads do not split over TP {tp_size}")
        per = num_kv_heads // tp_size
        return rank * per, (rank + 1) * per
    head = rank * num_kv_heads // tp_size
    return head, head + 1


@dataclass(frozen=True)
class HeadSlice:
    """Send global heads [lo, hi) from source rank `src` to destination rank `dst`."""

    src: int
    dst: int
    lo: int
    hi: int
    src_offset: int  # index of `lo` within the source rank's local heads
    dst_offset: int  # index of `lo` within the destination rank's local heads


def plan_head_transfers(num_kv_heads: int, src_tp: int, dst_tp: int) -> list[HeadSlice]:
    """Every (source rank → destination rank, head range) a full KV transfer needs.

    Each destination rank receives each of its heads exactly once; with replicated heads
    (more ranks than heads) the source rank holding the head is the lowest one that has it.
    """
    slices: list[HeadSlice] = []
    for dst in range(dst_tp):
        dlo, dhi = head_range(num_kv_heads, dst_tp, dst)
        for src in range(src_tp):
            slo, shi = head_range(num_kv_heads, src_tp, src)
            lo, hi = max(dlo, slo), min(dhi, shi)
            if lo >= hi:
                continue
            if any(s.dst == dst and s.lo <= lo < s.hi for s in slices):
                continue  # a replicated head already covered by a lower source rank
            slices.append(HeadSlice(src, dst, lo, hi, lo - slo, lo - dlo))
    return slices
