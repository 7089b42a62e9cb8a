"""Turn one scheduled step into tensors, run the model, and return logits of the sampled rows.

A step is first reduced to a `StepPlan`: plain lists (token ids, positions, block tables,
which rows to sample) that say everything the model needs and nothing about requests. Under
tensor parallelism the leader broadcasts that plan and every rank runs `execute(plan)` on
its shard. Single-token sequences (decode) go first in the flat batch so the attention layer
can serve them with one padded SDPA call; multi-token chunks (prefill) follow. All per-step
index math (slots, gather indices, masks) is done here once, vectorised, and shared by all
layers.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from mpi_workers.engine.torch.attention import AttentionMetadata, PrefillChunk
from mpi_workers.engine.torch.cuda_graph import StepGraphs, fill_pending, place_image_rows
from mpi_workers.engine.torch.env_switches import env_flag
from mpi_workers.engine.torch.host_copy import to_device
from mpi_workers.engine.torch.kv_cache import KvCache
from mpi_workers.engine.torch.model import LlamaForCausalLM

if TYPE_CHECKING:  # the GPU benchmark drives execute() without the scheduler's imports
    from mpi_workers.engine.scheduler import ScheduledBatch
    from mpi_workers.engine.sequence import Sequence


@dataclass
class StepPlan:
    """One forward step as plain data (cheap to pickle and broadcast to TP followers)."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    decode_tables: list[list[int]] = field(default_factory=list)  # one per decode row, first
    decode_lens: list[int] = field(default_factory=list)  # context length after the step
    prefills: list[tuple[int, int, int, list[int]]] = field(default_factory=list)
    # (start row, new tokens, tokens already in the cache, block table) per prefill chunk
    sample_rows: list[int] = field(default_factory=list)
    # Image rows: flat-batch rows whose input is an image feature row (`embeds`, same order)
    # instead of their token's embedding. Under TP the leader ships the rows in the plan.
    embed_rows: list[int] = field(default_factory=list)
    embeds: torch.Tensor | None = None  # [len(embed_rows), hidden]
    # Prompt logprobs: flat rows whose next prompt token's logprob is wanted, that token
    # (`prompt_targets`, same order), and how many top logprobs each row reports.
    prompt_rows: list[int] = field(default_factory=list)
    prompt_targets: list[int] = field(default_factory=list)
    prompt_top: int = 0
    # Embedding requests: flat rows whose final hidden states the leader keeps for pooling
    # (`ModelRunner.pooled`), in the plan's sequence order, each sequence's
    # `Sequence.pool_positions` of its chunk.
    pool_rows: list[int] = field(default_factory=list)


@dataclass
class PromptLogprobs:
    """`ModelRunner.execute`'s prompt logprobs of a plan's `prompt_rows`, on the host:
    [rows] the targets' logprobs, [rows, plan.prompt_top] the top ones and their ids."""

    chosen: torch.Tensor
    top_values: torch.Tensor
    top_ids: torch.Tensor


def _image_rows(seq: Sequence, done: int, n: int, start: int, plan: StepPlan,
                parts: list[torch.Tensor]) -> None:  # fmt: skip
    """Add the feature rows of `seq`'s images at positions [done, done + n) (flat rows from
    `start`): a chunk takes the rows of the image positions inside it."""
    for media in seq.media:
        lo, hi = max(done, media.offset), min(done + n, media.end)
        if lo >= hi:
            continue
        assert media.features is not None, "image features are computed before the plan"
        parts.append(media.features[lo - media.offset : hi - media.offset])
        plan.embed_rows.extend(range(start + lo - done, start + hi - done))


def plan_order(batch: ScheduledBatch) -> list[int]:
    """The batch's sequences (indices) in the plan's row order: single tokens first."""
    return sorted(range(len(batch.seqs)), key=lambda i: batch.num_tokens[i] > 1)


def build_plan(batch: ScheduledBatch) -> tuple[StepPlan, list[Sequence]]:
    """The plan of a scheduled batch and the sequences whose rows are sampled (in order)."""
    order = plan_order(batch)
    plan = StepPlan()
    sample_seqs: list[Sequence] = []
    embeds: list[torch.Tensor] = []
    for i in order:
        seq, n = batch.seqs[i], batch.num_tokens[i]
        start = len(plan.input_ids)
        done = seq.num_computed
        if seq.media:
            _image_rows(seq, done, n, start, plan, embeds)
        plan.input_ids.extend(seq.token_ids[done : done + n])
        plan.positions.extend(range(done, done + n))
        if n == 1:
            plan.decode_tables.append(list(seq.block_table))
            plan.decode_lens.append(done + 1)
        else:
            plan.prefills.append((start, n, done, list(seq.block_table)))
        wanted = None if seq.prompt_logprobs is None else seq.prompt_logprob_positions(done, n)
        if wanted:
            plan.prompt_rows.extend(range(start + wanted.start - done, start + wanted.stop - done))
            plan.prompt_targets.extend(seq.token_ids[wanted.start + 1 : wanted.stop + 1])
            plan.prompt_top = max(plan.prompt_top, seq.sampling.prompt_logprobs or 0)
        if seq.pooling is not None:  # an embedding: its rows' hidden states, no sample
            wanted = seq.pool_positions(done, n)
            plan.pool_rows.extend(range(start + wanted.start - done, start + wanted.stop - done))
        elif done + n == seq.num_tokens:
            sample_seqs.append(seq)
            plan.sample_rows.append(start + n - 1)
    if embeds:
        plan.embeds = embeds[0] if len(embeds) == 1 else torch.cat(embeds)
    return plan, sample_seqs


# Mixed steps of more tokens run eagerly: compute-bound, the launches are a small share.
MAX_MIXED_GRAPH_TOKENS = 2048
# Prompt rows whose logits exist at once (each slice is reduced to logprobs before the next:
# 512 x a 49,152-token vocabulary in float32 is 100 MB).
PROMPT_LOGPROB_SLICE = 512


def enforce_eager_default() -> bool:
    """HPCSERVE_ENFORCE_EAGER=1 turns CUDA-graph decode off (same value on every TP rank)."""
    return env_flag("HPCSERVE_ENFORCE_EAGER", False)


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_cache: KvCache,
        enforce_eager: bool | None = None,
        max_num_seqs: int = 512,
        max_num_batched_tokens: int = 2048,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.device = kv_cache.k[0].device
        # Decode attention reads the cache in place (block tables and lengths, no gather list,
        # no mask) where the model's device path has a kernel for it (C on CPU, Triton on
        # CUDA); prefill chunks too, a cached prefix included, with the varlen kernel.
        self.decode_attention = model.path.paged_decode
        self.varlen_kernel = model.path.varlen_attention
        self.graphs: StepGraphs | None = None
        # The prompt logprobs of the last `execute`'s plan (None: it asked for none; a TP
        # follower computes them with the leader but keeps nothing).
        self.prompt_logprobs: PromptLogprobs | None = None
        # The final hidden states of the last `execute`'s `pool_rows`, float32 on the device
        # (None: it had none).
        self.pooled: torch.Tensor | None = None
        if enforce_eager is None:
            enforce_eager = enforce_eager_default()
        if self.device.type == "cuda":
            # cuDNN attention builds an execution plan per new shape (tens of ms): with a
            # context that grows every decode step that is paid on every step.
            torch.backends.cuda.enable_cudnn_sdp(False)
            # Under TP the NCCL all-reduces are captured in the graphs too (every rank
            # captures the same shapes in the same order). HPCSERVE_TP_CUDA_GRAPHS=0 opts out.
            tp_graphs = env_flag("HPCSERVE_TP_CUDA_GRAPHS", True)
            # Mixed prefill + decode steps replay graphs too; HPCSERVE_MIXED_CUDA_GRAPHS=0: eager.
            mixed_graphs = env_flag("HPCSERVE_MIXED_CUDA_GRAPHS", True)
            if not enforce_eager and (model.tp.size == 1 or tp_graphs):
                self._add_scratch_block()
                max_blocks = -(-model.rotary.cos.shape[0] // self.block_size)
                self.graphs = StepGraphs(
                    model, self.block_size, min(max_blocks, kv_cache.num_blocks),
                    kv_cache.num_blocks * self.block_size, self.device, max_num_seqs,
                    decode_attention=self.decode_attention,
                    varlen=self.varlen_kernel and mixed_graphs,
                    max_mixed_tokens=min(max_num_batched_tokens, MAX_MIXED_GRAPH_TOKENS),
                )  # fmt: skip
        model.bind_kv_cache(kv_cache.k, kv_cache.v)

    def _add_scratch_block(self) -> None:
        """One block past the pool (never handed out) where graph padding rows write."""
        cache = self.kv_cache
        empty = [torch.empty(0)] * len(cache.k)
        self.model.bind_kv_cache(empty, empty)  # drop the layers' references to the old pool
        for kv in (cache.k, cache.v):
            for i in range(len(kv)):
                shape, dtype = (kv[i].shape[0] + 1, *kv[i].shape[1:]), kv[i].dtype
                kv[i] = torch.empty(0)  # free before allocating: peak is one layer's extra
                kv[i] = torch.zeros(shape, dtype=dtype, device=self.device)

    def _slots(self, block_tables: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Cache slots of `positions` ([..., L]) through `block_tables` ([..., blocks])."""
        bs = self.block_size
        blocks = torch.gather(block_tables, -1, torch.div(positions, bs, rounding_mode="floor"))
        return blocks * bs + positions % bs

    def tensors(self, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """(input_ids, positions, attention metadata) of a plan, on this rank's device."""
        dev = self.device
        input_ids = to_device(plan.input_ids, torch.long, dev)
        positions = to_device(plan.positions, torch.long, dev)
        meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long))
        slot_parts: list[torch.Tensor] = []
        if plan.decode_tables:
            num_decode = len(plan.decode_tables)
            self._prepare_decode(plan, meta, positions[:num_decode], slot_parts)
        if plan.prefills and self.varlen_kernel:
            slot_parts.append(self._prepare_varlen(plan, meta, positions))
            plan_prefills = []
        else:
            plan_prefills = plan.prefills
        for start, n, done, block_table in plan_prefills:
            table = to_device(block_table, torch.long, dev)
            chunk_pos = positions[start : start + n]
            slot_parts.append(self._slots(table, chunk_pos))
            ctx = done + n
            gather = mask = None
            if done > 0:
                gather = self._slots(table, torch.arange(ctx, device=dev))
                mask = AttentionMetadata.bottom_right_mask(n, ctx, dev)
            meta.prefills.append(PrefillChunk(start, start + n, gather, mask))
        meta.slot_mapping = torch.cat(slot_parts) if len(slot_parts) > 1 else slot_parts[0]
        return input_ids, positions, meta

    def _prepare_varlen(
        self, plan: StepPlan, meta: AttentionMetadata, positions: torch.Tensor
    ) -> torch.Tensor:
        """Varlen-kernel metadata of the plan's prefill chunks; returns their write slots."""
        first = plan.prefills[0][0]
        width = max(len(table) for *_, table in plan.prefills)
        tables = [table + [0] * (width - len(table)) for *_, table in plan.prefills]
        starts = [start - first for start, *_ in plan.prefills]
        starts.append(len(plan.input_ids) - first)
        lens = [done + n for _, n, done, _ in plan.prefills]
        flat = [*starts, *lens, *itertools.chain.from_iterable(tables)]
        packed = to_device(flat, torch.long, self.device)
        runs = len(lens)
        meta.varlen_first = first
        meta.varlen_query_start = packed[: runs + 1]
        meta.varlen_context_lens = packed[runs + 1 : 2 * runs + 1]
        meta.varlen_tables = packed[2 * runs + 1 :].view(runs, width)
        rows = torch.repeat_interleave(
            torch.arange(runs, device=self.device),
            meta.varlen_query_start.diff(), output_size=len(plan.input_ids) - first,
        )
        return self._slots(meta.varlen_tables[rows], positions[first:].unsqueeze(1)).squeeze(1)

    def _prepare_decode(
        self,
        plan: StepPlan,
        meta: AttentionMetadata,
        positions: torch.Tensor,
        slot_parts: list[torch.Tensor],
    ) -> None:
        dev = self.device
        lengths = plan.decode_lens
        num_decode = len(lengths)
        max_len = max(lengths)
        max_blocks = -(-max_len // self.block_size)
        rows = [t[:max_blocks] + [0] * (max_blocks - len(t)) for t in plan.decode_tables]
        tables = to_device(rows, torch.long, dev)
        slot_parts.append(self._slots(tables, positions.unsqueeze(1)).squeeze(1))
        padded_len = max_blocks * self.block_size
        meta.block_size = self.block_size
        meta.num_decode = num_decode
        meta.decode_max_len = padded_len
        if self.decode_attention is not None:
            meta.decode_attention = self.decode_attention
            meta.decode_block_tables = tables
            meta.decode_lens = to_device(lengths, torch.long, dev)
            return
        # Read whole blocks (the tail of each row's last block is masked out).
        meta.decode_gather_blocks = tables.reshape(-1)
        if min(lengths) != padded_len:
            span = torch.arange(padded_len, device=dev)
            lens = to_device(lengths, torch.long, dev).unsqueeze(1)
            meta.decode_mask = (span < lens).view(num_decode, 1, 1, padded_len)

    @torch.inference_mode()
    def execute(
        self, plan: StepPlan, pending: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Forward a plan; logits [sampled rows, vocab] (None: nothing sampled, or a TP
        follower, which still takes part in every collective).

        Overlapped scheduling: an input id `-(k + 1)` stands for the token the step still
        in flight samples in its row k; `pending` holds those tokens on the device, and
        they are put in place on the GPU (no host sync)."""
        fill = None
        if pending is not None and plan.input_ids and min(plan.input_ids) < 0:
            fill = pending
        self.prompt_logprobs = None
        if self.graphs is not None and not plan.prompt_rows and self.graphs.accepts(plan):
            hidden = self.graphs.run(plan, fill)
        else:
            input_ids, positions, meta = self.tensors(plan)
            if fill is not None:
                fill_pending(input_ids, fill)
            embeds = mask = None
            if plan.embeds is not None:
                shape = (len(plan.input_ids), plan.embeds.shape[1])
                embeds = torch.zeros(shape, dtype=self.model.dtype, device=self.device)
                mask = torch.empty(shape[0], dtype=torch.bool, device=self.device)
                place_image_rows(plan, embeds, mask)
            hidden = self.model(input_ids, positions, meta, embeds, mask)
        if plan.prompt_rows:
            self.prompt_logprobs = self._prompt_logprobs(plan, hidden)
        self.pooled = None
        if plan.pool_rows:  # (a graph's output buffer is overwritten by its next replay)
            pool = to_device(plan.pool_rows, torch.long, hidden.device)
            self.pooled = hidden.index_select(0, pool).float()
        rows = plan.sample_rows
        if not rows:
            return None
        if len(rows) != hidden.shape[0]:
            hidden = hidden.index_select(0, to_device(rows, torch.long, hidden.device))
        return self.model.compute_logits(hidden)


    def _prompt_logprobs(self, plan: StepPlan, hidden: torch.Tensor) -> PromptLogprobs | None:
        """The logprobs of `plan.prompt_targets` at `plan.prompt_rows` (and the top
        `plan.prompt_top`), from logits made `PROMPT_LOGPROB_SLICE` rows at a time. Under TP
        every rank computes the same slices (`compute_logits` is a collective); only the
        one that gets the logits (rank 0) returns them."""
        rows = to_device(plan.prompt_rows, torch.long, hidden.device)
        targets = to_device(plan.prompt_targets, torch.long, hidden.device)
        k = plan.prompt_top
        chosen: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        ids: list[torch.Tensor] = []
        for lo in range(0, len(plan.prompt_rows), PROMPT_LOGPROB_SLICE):
            part = slice(lo, lo + PROMPT_LOGPROB_SLICE)
            logits = self.model.compute_logits(hidden.index_select(0, rows[part]))
            if logits is None:
                continue
            logprobs = logits.float().log_softmax(dim=-1)
            chosen.append(logprobs.gather(1, targets[part].unsqueeze(1)).squeeze(1))
            if k:
                top = logprobs.topk(k, dim=-1)
                values.append(top.values)
                ids.append(top.indices)
            del logits, logprobs
        if not chosen:
            return None
        empty = torch.empty(len(plan.prompt_rows), 0)
        return PromptLogprobs(
            torch.cat(chosen).cpu(),
            torch.cat(values).cpu() if k else empty,
            torch.cat(ids).cpu() if k else empty.long(),
        )
