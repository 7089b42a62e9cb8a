"""TensorRT-LLM KV cache events → our `KvStored` / `KvRemoved` events.

The router names blocks by `contract.block_hash` over token ids; TensorRT-LLM names them by
its own hashes. So each stored block is re-hashed from its tokens (chained on our hash of its
parent) and a map from TensorRT-LLM's hash to ours serves later children and removals.
Rules (as Dynamo's publisher): a stored event stops at its first partial block; only the
largest attention window seen in the `created` event is kept (sliding-window layers repeat
events for their own window); an event whose parent we never saw is dropped (the router
could not place it).

Blocks holding image rows: TensorRT-LLM's input processor marks them with ids past the
vocabulary (`vocab_size + 1`) and keys them by its own image hashes, which are not our
`MediaRef.content_hash`: our hash of such a block could never match the frontend's (its
blocks hold `<image>` ids and our image hash) and would merge different images into one
name. So a stored event stops at its first block with an out-of-vocabulary id, like at a
partial block: the router sees text prefixes up to the first image, never a false image hit.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from contract.block_hash import hash_block
from contract.messages import KvEvent, KvRemoved, KvStored

logger = logging.getLogger(__name__)


class KvEventTranslator:
    def __init__(self, block_size: int, vocab_size: int | None = None) -> None:
        self.block_size = block_size
        self.vocab_size = vocab_size  # ids at or past it are image rows (None: no check)
        self.window_size: int | None = None
        self._ours: dict[int, int] = {}  # TensorRT-LLM block hash -> our block hash

    def cached_hashes(self) -> list[int]:
        return list(self._ours.values())

    def translate(self, raw_events: Iterable[dict[str, Any]]) -> list[KvEvent]:
        events: list[KvEvent] = []
        for raw in raw_events:
            event = self._one(raw)
            if event is not None:
                events.append(event)
        return events

    def _one(self, raw: dict[str, Any]) -> KvEvent | None:
        data = raw.get("data") or {}
        kind = data.get("type")
        window = raw.get("window_size")
        if kind == "created":
            if window is not None:
                self.window_size = max(self.window_size or 0, int(window))
            return None
        if window is not None and self.window_size is not None and window != self.window_size:
            return None
        if kind == "stored":
            return self._stored(data)
        if kind == "removed":
            ours = [self._ours.pop(h) for h in data.get("block_hashes", []) if h in self._ours]
            return KvRemoved(block_hashes=ours) if ours else None
        return None  # "updated" (priority / cache level) changes nothing the router keeps

    def _stored(self, data: dict[str, Any]) -> KvStored | None:
        trt_parent = data.get("parent_hash")
        parent = None
        if trt_parent is not None:
            parent = self._ours.get(trt_parent)
            if parent is None:
                return None
        first_parent = parent
        blocks: list[int] = []
        for block in data.get("blocks", []):
            tokens = [int(token["token_id"]) for token in block.get("tokens", [])]
            if len(tokens) != self.block_size:
                break  # a partial block: the router only knows full ones
            if self.vocab_size is not None and any(t >= self.vocab_size or t < 0 for t in tokens):
                break  # image rows: named by TensorRT-LLM's image hash, not ours
            ours = hash_block(parent, tokens)
            self._ours[block["block_hash"]] = ours
            blocks.append(ours)
            parent = ours
        if not blocks:
            return None
        return KvStored(parent_hash=first_parent, block_hashes=blocks)
