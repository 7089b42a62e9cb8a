"""The double's KV block pool: prefix reuse, LRU eviction and the KV cache events.

Why: routers and adapters consume `stored`/`removed` events and `cached_tokens`; this pool
produces them with the real engine's rules (full blocks only, chained hashes, eviction of
unreferenced blocks in LRU order, a `created` event first) without holding any tensors.

Accounting: a stored (hashed) block is referenced by the requests using it and is evictable
when unreferenced; tokens beyond a request's stored chain sit in private blocks. Free blocks
= capacity - stored - private; the "used" blocks of the stats are the referenced ones.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from . import hashing

PRIORITY_DEFAULT = 35  # KvCacheRetentionConfig's default priority in the real events


@dataclass(slots=True)
class _Block:
    block_hash: int
    parent: int | None
    tokens: tuple[int, ...]
    refs: int = 0
    children: set[int] = field(default_factory=set)


@dataclass(slots=True)
class ReuseMatch:
    hashes: list[int]
    tokens: int


class BlockPool:
    """Fixed number of blocks of `tokens_per_block` tokens each."""

    def __init__(
        self,
        num_blocks: int,
        tokens_per_block: int,
        *,
        reuse: bool,
        emit: Callable[[dict], None] | None,
    ) -> None:
        self.num_blocks = num_blocks
        self.tokens_per_block = tokens_per_block
        self.reuse = reuse
        self._emit = emit
        self._stored: dict[int, _Block] = {}
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.private = 0
        # cumulative counters for kvCacheStats
        self.alloc_total = 0
        self.alloc_new = 0
        self.reused = 0
        self.missed = 0
        if self._emit is not None:
            self._emit({"type": "created", "num_blocks_per_cache_level": [num_blocks, 0]})

    # --- capacity ------------------------------------------------------------------------
    @property
    def free(self) -> int:
        return self.num_blocks - len(self._stored) - self.private

    @property
    def evictable(self) -> int:
        return len(self._evictable)

    @property
    def used(self) -> int:
        return self.num_blocks - self.free - self.evictable

    def is_evictable(self, block_hash: int) -> bool:
        return block_hash in self._evictable

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.tokens_per_block)

    # --- reuse ---------------------------------------------------------------------------
    def chain(self, tokens: Sequence[int], parent: int | None, salt: int | None) -> list[int]:
        """Hashes of the full blocks of `tokens`, chained on `parent`."""
        hashes, tpb = [], self.tokens_per_block
        for start in range(0, len(tokens) - tpb + 1, tpb):
            parent = hashing.block_hash(parent, tokens[start : start + tpb], salt)
            hashes.append(parent)
        return hashes

    def match(self, prompt: Sequence[int], salt: int | None) -> ReuseMatch:
        """Longest stored prefix of full blocks; the last prompt token is always recomputed."""
        if not self.reuse:
            return ReuseMatch([], 0)
        hashes = []
        for block_hash in self.chain(prompt, None, salt):
            if block_hash not in self._stored:
                break
            hashes.append(block_hash)
        if hashes and len(hashes) * self.tokens_per_block >= len(prompt):
            hashes.pop()
        return ReuseMatch(hashes, len(hashes) * self.tokens_per_block)

    def acquire(self, hashes: Sequence[int]) -> None:
        for block_hash in hashes:
            block = self._stored[block_hash]
            block.refs += 1
            self._evictable.pop(block_hash, None)

    def release(self, hashes: Sequence[int]) -> None:
        for block_hash in hashes:
            block = self._stored.get(block_hash)
            if block is None:
                continue
            block.refs -= 1
            if block.refs == 0:
                self._evictable[block_hash] = None

    def count_lookup(self, reused: int, missed: int) -> None:
        self.reused += reused
        self.missed += missed
        self.alloc_total += reused + missed
        self.alloc_new += missed

    # --- private blocks ------------------------------------------------------------------
    def can_allocate(self, count: int) -> bool:
        return self.free + self.evictable >= count

    def allocate(self, count: int) -> None:
        """Take `count` private blocks, evicting LRU unreferenced stored blocks if needed."""
        while self.free < count and self._evictable:
            self._evict(next(iter(self._evictable)))
        if self.free < count:
            raise RuntimeError("KV cache exhausted (the double checks can_allocate first)")
        self.private += count

    def free_private(self, count: int) -> None:
        self.private -= count

    def _evict(self, block_hash: int) -> None:
        """Drop an unreferenced block and its (then unreachable) descendants."""
        root = self._stored[block_hash]
        removed, stack = [], [block_hash]
        while stack:
            current = self._stored.pop(stack.pop())
            self._evictable.pop(current.block_hash, None)
            removed.append(current.block_hash)
            stack.extend(current.children)
        parent = self._stored.get(root.parent) if root.parent is not None else None
        if parent is not None:
            parent.children.discard(block_hash)
        if self._emit is not None:
            self._emit({"type": "removed", "block_hashes": removed})

    # --- storing -------------------------------------------------------------------------
    def store(
        self,
        tokens: Sequence[int],
        parent: int | None,
        hashes: Sequence[int],
        *,
        private_blocks: int,
        keep_refs: bool,
    ) -> None:
        """Turn private full blocks into stored ones (one `stored` event for the new ones).

        `hashes[i]` is the hash of tokens[i*tpb:(i+1)*tpb]. Blocks already stored (the same
        content stored by another request) are shared and their private copy freed.
        `keep_refs`: the caller keeps referencing the blocks (context phase) or not (finish).
        """
        tpb, new_blocks = self.tokens_per_block, []
        for i, block_hash in enumerate(hashes):
            block = self._stored.get(block_hash)
            if block is None:
                block = _Block(block_hash, parent, tuple(tokens[i * tpb : (i + 1) * tpb]))
                self._stored[block_hash] = block
                if parent is not None and parent in self._stored:
                    self._stored[parent].children.add(block_hash)
                new_blocks.append(block)
            if keep_refs:
                block.refs += 1
                self._evictable.pop(block_hash, None)
            elif block.refs == 0:
                self._evictable.pop(block_hash, None)
                self._evictable[block_hash] = None  # most recently used
            parent = block_hash
        self.private -= private_blocks
        if new_blocks and self._emit is not None:
            self._emit(
                {
                    "type": "stored",
                    "parent_hash": new_blocks[0].parent,
                    "blocks": [self._block_json(b) for b in new_blocks],
                }
            )

    @staticmethod
    def _block_json(block: _Block) -> dict:
        return {
            "type": "stored_block",
            "block_hash": block.block_hash,
            "tokens": [
                {"type": "unique_token", "token_id": t, "token_extra_id": 0} for t in block.tokens
            ],
            "cache_level": 0,
            "priority": PRIORITY_DEFAULT,
        }

    def stats(self) -> dict:
        lookups = self.reused + self.missed
        return {
            "maxNumBlocks": self.num_blocks,
            "freeNumBlocks": self.num_blocks - self.used,
            "usedNumBlocks": self.used,
            "tokensPerBlock": self.tokens_per_block,
            "allocTotalBlocks": self.alloc_total,
            "allocNewBlocks": self.alloc_new,
            "reusedBlocks": self.reused,
            "missedBlocks": self.missed,
            "cacheHitRate": (self.reused / lookups) if lookups else 0.0,
        }


def event_json(event_id: int, data: dict, window_size: int) -> str:
    """The serialised event exactly as the real KVCacheEventSerializer shapes it."""
    return json.dumps({"event_id": event_id, "data": data, "window_size": window_size})
