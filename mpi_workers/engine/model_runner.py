"""Turn one scheduled step into tensors, run the model, and return logits of the sampled rows.

Single-token sequences (decode) go first in the flat batch so the attention layer can serve
them with one padded SDPA call; multi-token chunks (prefill) follow. All per-step index
math (slots, gather indices, masks) is done here once, vectorised, and shared by all layers.
"""

from __future__ import annotations

import torch

from mpi_workers.engine.attention import AttentionMetadata, PrefillChunk
from mpi_workers.engine.kv_cache import KvCache
from mpi_workers.engine.model import LlamaForCausalLM
from mpi_workers.engine.scheduler import ScheduledBatch
from mpi_workers.engine.sequence import Sequence


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_cache: KvCache) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.device = kv_cache.k[0].device
        model.bind_kv_cache(kv_cache.k, kv_cache.v)

    def _slots(self, block_tables: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Cache slots of `positions` ([..., L]) through `block_tables` ([..., blocks])."""
        bs = self.block_size
        blocks = torch.gather(block_tables, -1, torch.div(positions, bs, rounding_mode="floor"))
        return blocks * bs + positions % bs

    def prepare(
        self, batch: ScheduledBatch
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[Sequence], list[int]]:
        """Build (input_ids, positions, metadata, sampled seqs, their flat row indices)."""
        order = sorted(range(len(batch.seqs)), key=lambda i: batch.num_tokens[i] > 1)
        ids: list[int] = []
        pos: list[int] = []
        decode: list[Sequence] = []
        prefill: list[tuple[Sequence, int, int]] = []  # (seq, start, n)
        sample_seqs: list[Sequence] = []
        sample_rows: list[int] = []
        for i in order:
            seq, n = batch.seqs[i], batch.num_tokens[i]
            start = len(ids)
            ids.extend(seq.token_ids[seq.num_computed : seq.num_computed + n])
            pos.extend(range(seq.num_computed, seq.num_computed + n))
            if n == 1:
                decode.append(seq)
            else:
                prefill.append((seq, start, n))
            if seq.num_computed + n == seq.num_tokens:
                sample_seqs.append(seq)
                sample_rows.append(start + n - 1)
        dev = self.device
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        positions = torch.tensor(pos, dtype=torch.long, device=dev)
        meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long))
        slot_parts: list[torch.Tensor] = []
        if decode:
            self._prepare_decode(decode, meta, positions[: len(decode)], slot_parts)
        for seq, start, n in prefill:
            table = torch.tensor(seq.block_table, dtype=torch.long, device=dev)
            chunk_pos = positions[start : start + n]
            slot_parts.append(self._slots(table, chunk_pos))
            ctx = seq.num_computed + n
            gather = mask = None
            if seq.num_computed > 0:
                gather = self._slots(table, torch.arange(ctx, device=dev))
                mask = AttentionMetadata.bottom_right_mask(n, ctx, dev)
            meta.prefills.append(PrefillChunk(start, start + n, ctx, gather, mask))
        meta.slot_mapping = torch.cat(slot_parts) if len(slot_parts) > 1 else slot_parts[0]
        return input_ids, positions, meta, sample_seqs, sample_rows

    def _prepare_decode(
        self,
        decode: list[Sequence],
        meta: AttentionMetadata,
        positions: torch.Tensor,
        slot_parts: list[torch.Tensor],
    ) -> None:
        dev = self.device
        lengths = [s.num_computed + 1 for s in decode]
        max_len = max(lengths)
        max_blocks = -(-max_len // self.block_size)
        tables = torch.zeros(len(decode), max_blocks, dtype=torch.long, device=dev)
        for row, seq in enumerate(decode):
            table = seq.block_table[:max_blocks]
            tables[row, : len(table)] = torch.tensor(table, dtype=torch.long)
        slot_parts.append(self._slots(tables, positions.unsqueeze(1)).squeeze(1))
        span = torch.arange(max_len, device=dev).expand(len(decode), max_len)
        meta.decode_gather_slots = self._slots(tables, span).reshape(-1)
        meta.num_decode = len(decode)
        meta.decode_max_len = max_len
        if min(lengths) != max_len:
            lens = torch.tensor(lengths, device=dev).unsqueeze(1)
            meta.decode_mask = (span < lens).view(len(decode), 1, 1, max_len)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor | None, list[Sequence]]:
        """Forward the step; logits [num sampled, vocab] (None if nothing is sampled)."""
        input_ids, positions, meta, sample_seqs, rows = self.prepare(batch)
        hidden = self.model(input_ids, positions, meta)
        if not sample_seqs:
            return None, []
        if len(rows) != hidden.shape[0]:
            hidden = hidden.index_select(0, torch.tensor(rows, device=hidden.device))
        return self.model.compute_logits(hidden), sample_seqs
