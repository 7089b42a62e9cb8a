"""CUDA-graph replay of decode steps (CUDA devices only; the CPU always runs eagerly).

A pure-decode step (every row one new token) is padded to a batch bucket (1, 2, 4, 8, 16,
32, ...) and a context bucket (a block count, four buckets per octave from 16 blocks), so
one captured graph serves every step of that shape. All step data travels in one packed
int64 buffer per graph (token ids, positions, write slots, context lengths, padded block
tables), copied in with one host-to-device copy; everything else (gather slots, the length
mask, RoPE rows) is computed on the GPU inside the graph. Padding rows write their K/V to a
scratch slot past the pool's last block, read block 0 and attend to one key, so they touch
no sequence's cache. Logits are computed outside the graph.

Graphs are captured lazily, the first time a shape is seen. Under tensor parallelism every
rank runs the same plans, so every rank captures the same graphs in the same order and the
NCCL all-reduces recorded in them line up. Graphs that recorded NCCL collectives hold the
communicator: destroying the process group while they live hangs (seen on the H200 pair,
NCCL 2.28: this, not the capture, was the "TP capture hang"), so `release_all()` drops
every live graph first (`TpRuntime.close` calls it).
"""

from __future__ import annotations

import gc
import logging
import weakref
from dataclasses import dataclass

import torch

from mpi_workers.engine.torch.attention import AttentionMetadata
from mpi_workers.engine.torch.model import LlamaForCausalLM

logger = logging.getLogger(__name__)

MIN_CONTEXT_BLOCKS = 16
_LIVE: weakref.WeakSet[DecodeGraphs] = weakref.WeakSet()


def release_all() -> None:
    """Drop every live decode graph (and its pool), then wait for the GPU."""
    for graphs in list(_LIVE):
        graphs.release()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def batch_bucket(n: int) -> int:
    """Smallest power of two >= n."""
    return 1 << max(0, n - 1).bit_length()


def block_bucket(n: int, max_blocks: int) -> int:
    """Context bucket in blocks: 16, 20, 24, 28, 32, 40, 48, ... (at most max_blocks)."""
    b = MIN_CONTEXT_BLOCKS
    while b < n:
        b += max(4, (1 << (b.bit_length() - 1)) // 4)
    return max(1, min(b, max_blocks))


def decode_metadata(
    tables: torch.Tensor,
    positions: torch.Tensor,
    lens: torch.Tensor,
    slots: torch.Tensor,
    block_size: int,
    paged_kernel: bool = False,
) -> AttentionMetadata:
    """Decode metadata computed on the device from padded tables [B, blocks] (graph-safe).
    With the paged kernel the tables and lengths are all it needs (no gather, no mask)."""
    batch, blocks = tables.shape
    length = blocks * block_size
    if paged_kernel:
        return AttentionMetadata(
            slot_mapping=slots, num_decode=batch, decode_max_len=length, block_size=block_size,
            decode_block_tables=tables, decode_lens=lens,
        )  # fmt: skip
    span = torch.arange(length, device=tables.device)
    block_ids = torch.gather(tables, 1, (span // block_size).expand(batch, length))
    gather = (block_ids * block_size + span % block_size).reshape(-1)
    mask = (span.unsqueeze(0) < lens.unsqueeze(1)).view(batch, 1, 1, length)
    return AttentionMetadata(
        slot_mapping=slots, num_decode=batch, decode_max_len=length,
        decode_gather_slots=gather, decode_mask=mask,
    )  # fmt: skip


def fill_pending(input_ids: torch.Tensor, pending: torch.Tensor) -> None:
    """Overlapped scheduling: replace each placeholder id `-(k + 1)` in `input_ids` by
    `pending[k]` (the token the step in flight samples in its row k), in place on the device."""
    index = input_ids.neg().sub_(1).clamp_(min=0)
    input_ids.copy_(torch.where(input_ids < 0, pending[index], input_ids))


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    packed: torch.Tensor  # [4 * batch + batch * blocks] int64 on the device
    hidden: torch.Tensor  # [batch, hidden] static output


class DecodeGraphs:
    """Lazily captured decode graphs keyed by (batch bucket, context-block bucket)."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        block_size: int,
        max_blocks: int,
        scratch_slot: int,
        device: torch.device,
        max_batch: int = 512,
        paged_kernel: bool = False,
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.scratch_slot = scratch_slot
        self.device = device
        self.max_batch = batch_bucket(max_batch)
        self.paged_kernel = paged_kernel
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool = None
        _LIVE.add(self)

    def release(self) -> None:
        """Free the captured graphs; later steps capture again."""
        self.graphs.clear()
        self.pool = None

    def accepts(self, plan) -> bool:
        n = len(plan.decode_tables)
        return n > 0 and not plan.prefills and n == len(plan.input_ids) and n <= self.max_batch

    def _pack(self, plan, batch: int, blocks: int) -> torch.Tensor:
        n, bs, pad = len(plan.input_ids), self.block_size, batch - len(plan.input_ids)
        slots = [
            table[pos // bs] * bs + pos % bs
            for table, pos in zip(plan.decode_tables, plan.positions, strict=True)
        ]
        flat: list[int] = [*plan.input_ids, *[0] * pad, *plan.positions, *[0] * pad]
        flat += [*slots, *[self.scratch_slot] * pad, *plan.decode_lens, *[1] * pad]
        for table in plan.decode_tables:
            row = table[:blocks]
            flat.extend(row)
            flat.extend([0] * (blocks - len(row)))
        flat.extend([0] * (blocks * (batch - n)))
        return torch.tensor(flat, dtype=torch.long)

    def _forward(self, packed: torch.Tensor, batch: int, blocks: int) -> torch.Tensor:
        ids, pos, slots, lens = packed[: 4 * batch].view(4, batch).unbind(0)
        tables = packed[4 * batch :].view(batch, blocks)
        meta = decode_metadata(tables, pos, lens, slots, self.block_size, self.paged_kernel)
        return self.model(ids, pos, meta)

    def _capture(self, batch: int, blocks: int, packed: torch.Tensor) -> _Graph:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up (writes this step's K/V: replay rewrites it)
            self._forward(packed, batch, blocks)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a capture happens lazily while the worker serves, and other threads
        # (KV transfer receive/pack in disaggregation) may use CUDA meanwhile; in the default
        # global mode their calls invalidate the capture (cudaErrorStreamCaptureInvalidated,
        # seen on 2xH200 with prefill_first at concurrency 8).
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            hidden = self._forward(packed, batch, blocks)
        if self.pool is None:
            self.pool = graph.pool()
        logger.info("captured decode graph: batch %d, %d context blocks", batch, blocks)
        return _Graph(graph, packed, hidden)

    def run(self, plan, pending: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [rows of the plan, hidden]; valid until the next run. `pending`:
        the in-flight step's tokens for the plan's placeholder ids (`fill_pending`)."""
        n = len(plan.input_ids)
        batch = batch_bucket(n)
        need = -(-max(plan.decode_lens) // self.block_size)
        blocks = block_bucket(need, self.max_blocks)
        host = self._pack(plan, batch, blocks).pin_memory()
        entry = self.graphs.get((batch, blocks))
        packed = torch.empty_like(host, device=self.device) if entry is None else entry.packed
        packed.copy_(host, non_blocking=True)
        if pending is not None:
            fill_pending(packed[:batch], pending)
        if entry is None:
            entry = self.graphs[(batch, blocks)] = self._capture(batch, blocks, packed)
        entry.graph.replay()
        return entry.hidden[:n]
