"""The media side channel over a real nats-server: payloads larger than one NATS message
arrive whole and checked; a forgotten or damaged payload is refused, never half used."""

from __future__ import annotations

import os

import pytest

from contract.bus import connect, media_subject
from contract.media import (
    MediaUnavailable,
    chunk_size,
    content_hash,
    fetch_media,
    serve_media,
)


@pytest.fixture
async def nc(nats_url: str):
    client = await connect(nats_url, "test-media")
    yield client
    await client.close()


async def test_payload_larger_than_a_message_arrives_whole(nc) -> None:
    payload = os.urandom(3 * nc.max_payload + 12345)  # several chunks, a short last one
    store = {"m1": payload}
    subject = media_subject("t", "front-a")
    sub = await serve_media(nc, subject, store.get)
    try:
        got = await fetch_media(nc, subject, "m1", len(payload), content_hash(payload))
        assert got == payload
        assert chunk_size(nc.max_payload) < len(payload)
    finally:
        await sub.unsubscribe()


async def test_unknown_media_and_wrong_hash_are_refused(nc) -> None:
    payload = b"x" * 5000
    subject = media_subject("t", "front-b")
    sub = await serve_media(nc, subject, {"m": payload}.get)
    try:
        with pytest.raises(MediaUnavailable, match="unknown or expired"):
            await fetch_media(nc, subject, "gone", len(payload), content_hash(payload))
        with pytest.raises(MediaUnavailable, match="does not match its hash"):
            await fetch_media(nc, subject, "m", len(payload), content_hash(payload) ^ 1)
        with pytest.raises(MediaUnavailable, match="range outside"):
            await fetch_media(nc, subject, "m", len(payload) + 10, content_hash(payload))
    finally:
        await sub.unsubscribe()


async def test_no_frontend_answering_is_unavailable(nc) -> None:
    with pytest.raises(MediaUnavailable, match="no answer"):
        await fetch_media(nc, media_subject("t", "nobody"), "m", 10, 0, timeout_s=0.5)
