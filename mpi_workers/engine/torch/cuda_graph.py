"""CUDA-graph replay of forward steps (CUDA devices only; the CPU always runs eagerly).

A pure-decode step (every row one new token) is padded to a batch bucket (1, 2, 4, 8, 16,
32, ...) and a context bucket (a block count, four buckets per octave from 16 blocks), so
one captured graph serves every step of that shape. All step data travels in one packed
int64 buffer per graph (token ids, positions, write slots, context lengths, padded block
tables), copied in with one host-to-device copy; everything else (gather slots, the length
mask, RoPE rows) is computed on the GPU inside the graph. Padding rows write their K/V to a
scratch slot past the pool's last block, read block 0 and attend to one key, so they touch
no sequence's cache. Logits are computed outside the graph.

Mixed steps (prefill chunks, with or without a cached prefix, beside decode rows) replay
graphs too when the varlen attention kernel is available: every sequence of the step is a
query run (a decode row a run of one) and the whole step is one varlen attention launch per
layer, so a graph keyed by (token bucket, run bucket, context-block bucket) serves it. Write
slots are computed on the GPU from the block tables; padding tokens write to the scratch
slot and belong to no run. A step holding image feature rows (a vision-language prompt)
replays its own graphs, whose static inputs add the rows' embeddings and a row mask (written
before each replay; the model takes marked rows instead of the token embedding). At most
`MAX_MIXED_GRAPHS` such shapes are captured; a step of a new shape past that, or of more
than `max_mixed_tokens` tokens, runs eagerly.

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
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mpi_workers.engine.torch import triton_attention
from mpi_workers.engine.torch.attention import AttentionMetadata
from mpi_workers.engine.torch.host_copy import to_device
from mpi_workers.engine.torch.model import LlamaForCausalLM

logger = logging.getLogger(__name__)

MIN_CONTEXT_BLOCKS = 16
MAX_MIXED_GRAPHS = 48
_LIVE: weakref.WeakSet[StepGraphs] = weakref.WeakSet()


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


def token_bucket(n: int) -> int:
    """Mixed-step token bucket: powers of two up to 256, then multiples of 128 (a padded
    step of several hundred tokens is compute-bound: pad little)."""
    if n <= 256:
        return max(16, batch_bucket(n))
    return -(-n // 128) * 128


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
    decode_attention: Callable[..., torch.Tensor] | None = None,
) -> AttentionMetadata:
    """Decode metadata computed on the device from padded tables [B, blocks] (graph-safe).
    A paged decode kernel needs only the tables and lengths (no gather, no mask)."""
    batch, blocks = tables.shape
    length = blocks * block_size
    if decode_attention is not None:
        return AttentionMetadata(
            slot_mapping=slots, num_decode=batch, decode_max_len=length, block_size=block_size,
            decode_attention=decode_attention, decode_block_tables=tables, decode_lens=lens,
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


def place_image_rows(plan, embeds: torch.Tensor, mask: torch.Tensor) -> None:
    """Put the plan's image feature rows at their flat rows of `embeds` ([>= tokens,
    hidden] on the device) and mark them in `mask`; other rows are left as they are and
    unmarked (the model takes only marked rows)."""
    assert plan.embeds is not None
    rows = to_device(plan.embed_rows, torch.long, embeds.device)
    mask.zero_()
    mask[rows] = True
    embeds[rows] = plan.embeds.to(embeds.device, embeds.dtype, non_blocking=True)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    packed: torch.Tensor  # [4 * batch + batch * blocks] int64 on the device
    hidden: torch.Tensor  # [batch, hidden] static output
    embeds: torch.Tensor | None = None  # image steps: [tokens, hidden] feature rows in place
    mask: torch.Tensor | None = None  # [tokens] bool: the rows that take `embeds`


class StepGraphs:
    """Lazily captured step graphs: decode steps keyed by (batch bucket, context-block
    bucket), mixed steps (with `varlen`) by (token, run and context-block buckets)."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        block_size: int,
        max_blocks: int,
        scratch_slot: int,
        device: torch.device,
        max_batch: int = 512,
        decode_attention: Callable[..., torch.Tensor] | None = None,
        varlen: bool = False,
        max_mixed_tokens: int = 0,
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.scratch_slot = scratch_slot
        self.device = device
        self.max_batch = batch_bucket(max_batch)
        self.decode_attention = decode_attention
        self.max_mixed_tokens = max_mixed_tokens if varlen else 0
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.mixed: dict[tuple[int, int, int, bool], _Graph] = {}
        self.pool = None
        _LIVE.add(self)

    def release(self) -> None:
        """Free the captured graphs; later steps capture again."""
        self.graphs.clear()
        self.mixed.clear()
        self.pool = None

    def accepts(self, plan) -> bool:
        n = len(plan.decode_tables)
        if not plan.prefills:  # (a one-token image chunk, with image rows: eager)
            return 0 < n == len(plan.input_ids) <= self.max_batch and plan.embeds is None
        if len(plan.input_ids) > self.max_mixed_tokens:
            return False
        return self._mixed_key(plan) in self.mixed or len(self.mixed) < MAX_MIXED_GRAPHS

    def run(self, plan, pending: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [rows of the plan, hidden]; valid until the next run. `pending`:
        the in-flight step's tokens for the plan's placeholder ids (`fill_pending`)."""
        if plan.prefills:
            return self._run_mixed(plan, pending)
        return self._run_decode(plan, pending)

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
        meta = decode_metadata(tables, pos, lens, slots, self.block_size, self.decode_attention)
        return self.model(ids, pos, meta)

    def _capture(self, batch: int, blocks: int, packed: torch.Tensor) -> _Graph:
        graph = self._record(lambda: self._forward(packed, batch, blocks), packed)
        logger.info("captured decode graph: batch %d, %d context blocks", batch, blocks)
        return graph

    def _record(self, forward, packed: torch.Tensor) -> _Graph:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up (writes this step's K/V: replay rewrites it)
            forward()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a capture happens lazily while the worker serves, and other threads
        # (KV transfer receive/pack in disaggregation) may use CUDA meanwhile; in the default
        # global mode their calls invalidate the capture (cudaErrorStreamCaptureInvalidated,
        # seen on 2xH200 with prefill_first at concurrency 8).
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            hidden = forward()
        if self.pool is None:
            self.pool = graph.pool()
        return _Graph(graph, packed, hidden)

    # Mixed steps: packed = [ids T | positions T | query_start R+1 | context lens R | tables]

    def _mixed_key(self, plan) -> tuple[int, int, int, bool]:
        runs = len(plan.decode_tables) + len(plan.prefills)
        longest = max(
            max(plan.decode_lens, default=0),
            max((done + n for _, n, done, _ in plan.prefills), default=0),
        )
        blocks = block_bucket(-(-longest // self.block_size), self.max_blocks)
        tokens = token_bucket(len(plan.input_ids))
        return tokens, max(8, batch_bucket(runs)), blocks, plan.embeds is not None

    def _pack_mixed(self, plan, tokens: int, runs: int, blocks: int) -> torch.Tensor:
        n = len(plan.input_ids)
        starts = list(range(len(plan.decode_tables)))
        starts += [start for start, *_ in plan.prefills]
        lens = [*plan.decode_lens, *(done + k for _, k, done, _ in plan.prefills)]
        tables = [*plan.decode_tables, *(table for *_, table in plan.prefills)]
        pad_runs = runs - len(lens)
        flat: list[int] = [*plan.input_ids, *[0] * (tokens - n), *plan.positions]
        flat += [0] * (tokens - n)
        flat += [*starts, *[n] * (pad_runs + 1), *lens, *[1] * pad_runs]
        for table in tables:
            row = table[:blocks]
            flat.extend(row)
            flat.extend([0] * (blocks - len(row)))
        flat.extend([0] * (blocks * pad_runs))
        return torch.tensor(flat, dtype=torch.long)

    def _forward_mixed(
        self, packed: torch.Tensor, tokens: int, runs: int, blocks: int,
        embeds: torch.Tensor | None = None, mask: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        ids, pos = packed[: 2 * tokens].view(2, tokens).unbind(0)
        query_start = packed[2 * tokens : 2 * tokens + runs + 1]
        lens = packed[2 * tokens + runs + 1 : 2 * tokens + 2 * runs + 1]
        tables = packed[2 * tokens + 2 * runs + 1 :].view(runs, blocks)
        token = torch.arange(tokens, device=packed.device)
        run = torch.searchsorted(query_start[1:], token, right=True).clamp_(max=runs - 1)
        block = tables[run, torch.div(pos, self.block_size, rounding_mode="floor")]
        slots = block * self.block_size + pos % self.block_size
        slots = torch.where(token < query_start[-1], slots, self.scratch_slot)
        group = self.model.config.num_heads // self.model.config.num_kv_heads
        meta = AttentionMetadata(
            slot_mapping=slots, varlen_tables=tables, varlen_query_start=query_start,
            varlen_context_lens=lens,
            varlen_programs=triton_attention.varlen_programs(tokens, runs, group),
        )  # fmt: skip
        return self.model(ids, pos, meta, embeds, mask)

    def _run_mixed(self, plan, pending: torch.Tensor | None) -> torch.Tensor:
        key = tokens, runs, blocks, images = self._mixed_key(plan)
        host = self._pack_mixed(plan, tokens, runs, blocks).pin_memory()
        entry = self.mixed.get(key)
        packed = torch.empty_like(host, device=self.device) if entry is None else entry.packed
        packed.copy_(host, non_blocking=True)
        if pending is not None:
            fill_pending(packed[:tokens], pending)
        embeds = mask = None
        if images:
            if entry is None:
                hidden_size = self.model.config.hidden_size
                embeds = torch.zeros(tokens, hidden_size, dtype=self.model.dtype,
                                     device=self.device)  # fmt: skip
                mask = torch.zeros(tokens, dtype=torch.bool, device=self.device)
            else:
                embeds, mask = entry.embeds, entry.mask
            assert embeds is not None and mask is not None
            place_image_rows(plan, embeds, mask)
        if entry is None:
            entry = self.mixed[key] = self._record(
                lambda: self._forward_mixed(packed, tokens, runs, blocks, embeds, mask), packed
            )
            entry.embeds, entry.mask = embeds, mask
            logger.info("captured mixed-step graph: %d tokens, %d runs, %d context blocks%s",
                        tokens, runs, blocks, ", image rows" if images else "")  # fmt: skip
        entry.graph.replay()
        return entry.hidden[: len(plan.input_ids)]

    def _run_decode(self, plan, pending: torch.Tensor | None) -> torch.Tensor:
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
