"""The payloads of this frontend process's in-flight image requests, served to the workers.

A request's images are held (`hold`) from before it is sent until it is answered: all its
choices, every migration attempt, the stream's end or the client's leaving (`MediaHold.
release`, idempotent). Workers pull the bytes over NATS (`contract.media.serve_media` on
this process's own `media_subject`), so a payload never rides in a request message.

The same payload in several requests is kept once (keyed by content hash and size,
reference-counted). Two bounds keep memory in check: `max_bytes` in total (a new request that
would pass it gets a 503, nothing is evicted under a running request) and a TTL safety net
(a hold never released, by a bug, expires after `ttl_s`).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from frontend import errors

logger = logging.getLogger(__name__)


@dataclass
class _Entry:
    payload: bytes
    holders: int
    expires: float


class MediaHold:
    """The store's hold on one request's payloads; `media_ids[i]` names payload i."""

    def __init__(self, store: MediaStore, media_ids: list[str]) -> None:
        self._store = store
        self.media_ids = media_ids
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._store._release(self.media_ids)


class MediaStore:
    def __init__(
        self,
        max_bytes: int,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_size: Callable[[int], None] | None = None,
    ) -> None:
        """`on_size(bytes)` hears every change of the bytes held (the metrics gauge)."""
        self.max_bytes = max_bytes
        self._on_size = on_size
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, media_id: object) -> bool:
        return media_id in self._entries

    def hold(self, payloads: Sequence[tuple[bytes, int]]) -> MediaHold:
        """Keep `payloads` ((bytes, content hash) each) until the hold is released; 503 when
        the new ones would pass `max_bytes` (then nothing is kept)."""
        now = self._clock()
        self._expire(now)
        ids: list[str] = []
        new = 0
        for payload, digest in payloads:
            media_id = f"{digest & 0xFFFFFFFFFFFFFFFF:016x}-{len(payload)}"
            entry = self._entries.get(media_id)
            if (entry is not None and entry.payload != payload) or media_id in ids:
                media_id = uuid.uuid4().hex  # a hash collision (or a repeat): its own entry
                entry = None
            if entry is None:
                new += len(payload)
            ids.append(media_id)
        if self.bytes + new > self.max_bytes:
            raise errors.OpenAIError(
                503,
                f"the frontend holds {self.bytes} bytes of images for requests in flight; "
                f"this request's {new} more would pass multimodal.store_max_bytes "
                f"({self.max_bytes}): retry shortly",
                type="service_unavailable",
                code="media_store_full",
            )
        expires = now + self.ttl_s
        for media_id, (payload, _) in zip(ids, payloads, strict=True):
            entry = self._entries.get(media_id)
            if entry is None:
                self._entries[media_id] = _Entry(payload, 1, expires)
                self.bytes += len(payload)
            else:
                entry.holders += 1
                entry.expires = max(entry.expires, expires)
        if new and self._on_size is not None:
            self._on_size(self.bytes)
        return MediaHold(self, ids)

    def lookup(self, media_id: str) -> bytes | None:
        """The payload `media_id`, or None (unknown, released or expired)."""
        entry = self._entries.get(media_id)
        if entry is None:
            return None
        if entry.expires <= self._clock():
            self._drop(media_id)
            return None
        return entry.payload

    def _release(self, media_ids: Sequence[str]) -> None:
        for media_id in media_ids:
            entry = self._entries.get(media_id)
            if entry is None:
                continue  # expired meanwhile
            entry.holders -= 1
            if entry.holders <= 0:
                self._drop(media_id)

    def _drop(self, media_id: str) -> None:
        entry = self._entries.pop(media_id, None)
        if entry is not None:
            self.bytes -= len(entry.payload)
            if self._on_size is not None:
                self._on_size(self.bytes)

    def _expire(self, now: float) -> None:
        expired = [media_id for media_id, e in self._entries.items() if e.expires <= now]
        for media_id in expired:
            logger.warning("media %s expired while still held (never released)", media_id)
            self._drop(media_id)
