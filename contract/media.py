"""The media side channel: how an image or an embedding file travels from the frontend to a
worker without passing NATS's message size limit (1 MiB by default).

The frontend keeps each request's media payloads (the image file's bytes as the client sent
them; an embedding tensor's raw bytes) in memory and answers chunk requests for them on its
own subject (`contract.bus.media_subject`: one per frontend process). A `GenerateRequest`
names each payload with a `MediaRef` (id, size, content hash); the worker pulls the chunks it needs
(`fetch_media`: several in flight, each at most the server's `max_payload`), joins them and
checks the size and the hash before using a byte of it. A payload thus crosses the bus once
per worker that computes it, in messages of the bus's own size limit, and nothing of it sits
in a request message.

Protocol: request `MediaChunkRequest` JSON to the frontend's subject; the reply is the raw bytes
`[offset, offset + length)` of the payload, or an empty reply with the header `MEDIA_ERROR`
naming why (unknown or expired id, a range past the end).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict

logger = logging.getLogger(__name__)

MEDIA_ERROR = "Hpcserve-Media-Error"
# Reply bytes per chunk at most (and at most the server's max_payload less header room).
MAX_CHUNK_BYTES = 4 * 2**20
_HEADER_ROOM = 4096
CHUNKS_IN_FLIGHT = 8


class MediaUnavailable(RuntimeError):
    """A payload could not be fetched (the frontend forgot it, or it arrived damaged)."""


class MediaChunkRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    media_id: str
    offset: int
    length: int


def content_hash(payload: bytes) -> int:
    """64-bit hash of a payload: it names the media in KV block hashes and checks a fetch."""
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little")


def chunk_size(max_payload: int) -> int:
    """Bytes per reply for a server whose messages hold at most `max_payload` bytes."""
    return max(1024, min(MAX_CHUNK_BYTES, max_payload - _HEADER_ROOM))


async def serve_media(nc: Any, subject: str, lookup: Callable[[str], bytes | None]) -> Any:
    """Answer chunk requests on `subject` from `lookup(media_id)` (None: unknown). Returns
    the NATS subscription (unsubscribe it to stop)."""

    async def answer(msg: Any) -> None:
        if not msg.reply:
            return
        try:
            ask = MediaChunkRequest.model_validate_json(msg.data)
        except ValueError:
            await nc.publish(msg.reply, b"", headers={MEDIA_ERROR: "malformed chunk request"})
            return
        payload = lookup(ask.media_id)
        if payload is None:
            await nc.publish(msg.reply, b"", headers={MEDIA_ERROR: "unknown or expired media"})
            return
        end = ask.offset + ask.length
        if ask.offset < 0 or ask.length < 1 or end > len(payload):
            await nc.publish(msg.reply, b"", headers={MEDIA_ERROR: "range outside the payload"})
            return
        await nc.publish(msg.reply, payload[ask.offset : end])

    return await nc.subscribe(subject, cb=answer)


async def fetch_media(
    nc: Any, subject: str, media_id: str, nbytes: int, expected_hash: int, timeout_s: float = 30.0
) -> bytes:
    """The whole payload `media_id` from the frontend serving `subject`, checked against its
    size and content hash; MediaUnavailable when it cannot be had intact."""
    step = chunk_size(int(getattr(nc, "max_payload", 0) or 1 << 20))
    ranges = [(offset, min(step, nbytes - offset)) for offset in range(0, nbytes, step)]
    parts: list[bytes] = [b""] * len(ranges)
    gate = asyncio.Semaphore(CHUNKS_IN_FLIGHT)

    async def one(index: int, offset: int, length: int) -> None:
        ask = MediaChunkRequest(media_id=media_id, offset=offset, length=length)
        async with gate:
            try:
                reply = await nc.request(subject, ask.model_dump_json().encode(), timeout=timeout_s)
            except Exception as exc:  # timeout, no responders: the frontend is gone
                raise MediaUnavailable(
                    f"media {media_id}: no answer from {subject} ({type(exc).__name__})"
                ) from None
        error = (reply.headers or {}).get(MEDIA_ERROR)
        if error:
            raise MediaUnavailable(f"media {media_id}: {error}")
        if len(reply.data) != length:
            raise MediaUnavailable(f"media {media_id}: chunk at {offset} has the wrong size")
        parts[index] = reply.data

    await asyncio.gather(*(one(i, offset, length) for i, (offset, length) in enumerate(ranges)))
    payload = b"".join(parts)
    if len(payload) != nbytes or content_hash(payload) != expected_hash:
        raise MediaUnavailable(f"media {media_id}: the payload does not match its hash")
    return payload
