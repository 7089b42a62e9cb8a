"""Paged KV block bookkeeping with prefix caching by chained block hash, and KV events.

Rules (the points where KV events are born):
- a full block gets its hash (contract.block_hash) only after its KV has been computed;
  that is a `KvStored` event;
- a block holding image positions hashes the image too (`Sequence.block_extras`), so only
  the same image at the same place is a hit;
- a prefix hit compares the stored token ids too (collision guard) and never covers the
  last token of a sequence, so at least one token is computed and yields logits;
- freed blocks keep their hash and stay reusable until the pool needs them; they are
  reclaimed least-recently-freed first (blocks with no hash before any hashed one), and
  dropping a hash is a `KvRemoved` event.
Events accumulate until `take_events()` (once per engine step).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

from contract.block_hash import hash_block
from contract.messages import KvEvent, KvRemoved, KvStored
from mpi_workers.engine.sequence import Sequence

logger = logging.getLogger(__name__)


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] | None = None


class BlockManager:
    """Owns the ids of the KV pool; the tensors themselves live in `kv_cache.KvCache`."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._hash_to_block: dict[int, int] = {}
        self._events: list[KvEvent] = []

    # ----- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks not referenced by any sequence (cached ones included: they can be reclaimed)."""
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Fresh blocks `seq` needs so that its table covers `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def cached_hashes(self) -> list[int]:
        return list(self._hash_to_block)

    # ----- prefix cache --------------------------------------------------------------------
    def _lookup(self, seq: Sequence) -> list[tuple[int, int]]:
        """(hash, block id) of the longest cached prefix of `seq`, leaving >= 1 token to compute.
        Nothing for a sequence that wants every position's hidden state (its prompt's
        logprobs, a MEAN embedding): it computes every position."""
        if not self.enable_prefix_caching or seq.reads_no_cache:
            return []
        hits: list[tuple[int, int]] = []
        parent: int | None = None
        bs = self.block_size
        for i in range((seq.num_tokens - 1) // bs):
            chunk = seq.token_ids[i * bs : (i + 1) * bs]
            h = hash_block(parent, chunk, seq.block_extras.get(i))
            block_id = self._hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tuple(chunk):
                break
            hits.append((h, block_id))
            parent = h
        return hits

    def num_cached_blocks(self, seq: Sequence) -> int:
        """Full blocks of `seq`'s prefix that `admit` would take from the prefix cache."""
        return len(self._lookup(seq))

    def admit(self, seq: Sequence, num_tokens: int) -> bool:
        """Give a sequence with no blocks its cached prefix plus fresh blocks for `num_tokens`.

        `num_tokens` is the number of tokens to compute in this step beyond the cached
        prefix, capped by the caller; returns False (and changes nothing) if the pool is short.
        On success `seq.num_computed` is the cached prefix length.
        """
        assert not seq.block_table
        hits = self._lookup(seq)
        cached = len(hits) * self.block_size
        num_tokens = min(num_tokens, seq.num_tokens - cached)
        reclaimed = sum(1 for _, b in hits if self.blocks[b].ref_count == 0)
        fresh = self.blocks_for(cached + num_tokens) - len(hits)
        if fresh + reclaimed > self.num_free_blocks:
            return False
        for h, block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            seq.block_hashes.append(h)
        seq.num_computed = cached
        self.allocate(seq, cached + num_tokens)
        return True

    # ----- allocation ----------------------------------------------------------------------
    def _take_free_block(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:
            if self._hash_to_block.get(block.block_hash) == block_id:
                del self._hash_to_block[block.block_hash]
                self._emit_removed(block.block_hash)
            block.block_hash = None
            block.token_ids = None
        block.ref_count = 1
        return block_id

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int) -> list[int]:
        """Extend `seq.block_table` to cover `num_tokens`; the caller checked `can_allocate`."""
        need = self.num_new_blocks(seq, num_tokens)
        if need > self.num_free_blocks:
            raise RuntimeError(f"KV pool exhausted: need {need}, free {self.num_free_blocks}")
        new = [self._take_free_block() for _ in range(need)]
        seq.block_table.extend(new)
        return new

    def free(self, seq: Sequence) -> None:
        """Release `seq`'s blocks; hashed ones stay reusable until reclaimed (tail first)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.block_hash is None:
                    self._free.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed = 0

    # ----- hashing and events --------------------------------------------------------------
    def commit(self, seq: Sequence) -> None:
        """Hash and publish every block of `seq` that became full and computed."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        run: list[int] = []
        run_parent: int | None = None
        for idx in range(len(seq.block_hashes), seq.num_computed // bs):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            chunk = seq.token_ids[idx * bs : (idx + 1) * bs]
            h = hash_block(parent, chunk, seq.block_extras.get(idx))
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[idx]]
            if block.block_hash == h or h in self._hash_to_block:
                # Already published (prefix hit, or an identical block computed elsewhere).
                self._flush_stored(run_parent, run)
                run = []
                continue
            block.block_hash = h
            block.token_ids = tuple(chunk)
            self._hash_to_block[h] = block.block_id
            if not run:
                run_parent = parent
            run.append(h)
        self._flush_stored(run_parent, run)

    def _flush_stored(self, parent: int | None, run: list[int]) -> None:
        if run:
            self._events.append(KvStored(parent_hash=parent, block_hashes=list(run)))

    def _emit_removed(self, block_hash: int) -> None:
        if self._events and isinstance(self._events[-1], KvRemoved):
            self._events[-1].block_hashes.append(block_hash)
        else:
            self._events.append(KvRemoved(block_hashes=[block_hash]))

    def take_events(self) -> list[KvEvent]:
        events, self._events = self._events, []
        return events

    def reset_prefix_cache(self) -> None:
        """Forget every reusable hash of unreferenced blocks (emits KvRemoved)."""
        for block_id in list(self._free):
            block = self.blocks[block_id]
            if block.block_hash is not None:
                self._hash_to_block.pop(block.block_hash, None)
                self._emit_removed(block.block_hash)
                block.block_hash = None
                block.token_ids = None
