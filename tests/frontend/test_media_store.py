"""The media store: payloads held per request, shared when equal, released, bounded."""

from __future__ import annotations

import pytest

from contract.media import content_hash
from frontend.errors import OpenAIError
from frontend.media_store import MediaStore


def entry(payload: bytes) -> tuple[bytes, int]:
    return payload, content_hash(payload)


def test_held_until_released_and_equal_payloads_kept_once() -> None:
    store = MediaStore(max_bytes=100, ttl_s=60)
    first = store.hold([entry(b"a" * 30), entry(b"b" * 20)])
    second = store.hold([entry(b"a" * 30)])  # the same image in another request
    assert second.media_ids == first.media_ids[:1]
    assert store.bytes == 50 and len(store) == 2
    assert store.lookup(first.media_ids[1]) == b"b" * 20
    first.release()
    first.release()  # idempotent
    assert store.lookup(first.media_ids[1]) is None
    assert store.lookup(second.media_ids[0]) == b"a" * 30  # still held by the second
    second.release()
    assert store.bytes == 0 and len(store) == 0


def test_the_same_image_twice_in_one_request_has_two_ids() -> None:
    store = MediaStore(max_bytes=100, ttl_s=60)
    hold = store.hold([entry(b"x" * 10), entry(b"x" * 10)])
    assert len(set(hold.media_ids)) == 2
    hold.release()
    assert store.bytes == 0


def test_a_full_store_refuses_with_503_and_keeps_nothing_new() -> None:
    store = MediaStore(max_bytes=100, ttl_s=60)
    held = store.hold([entry(b"a" * 80)])
    with pytest.raises(OpenAIError) as caught:
        store.hold([entry(b"b" * 10), entry(b"c" * 20)])
    assert caught.value.status == 503 and caught.value.code == "media_store_full"
    assert "store_max_bytes" in caught.value.message
    assert store.bytes == 80 and len(store) == 1
    store.hold([entry(b"a" * 80)]).release()  # already held: costs nothing more
    held.release()
    store.hold([entry(b"b" * 10), entry(b"c" * 20)])


def test_a_hold_never_released_expires() -> None:
    now = [0.0]
    store = MediaStore(max_bytes=100, ttl_s=10, clock=lambda: now[0])
    hold = store.hold([entry(b"a" * 60)])
    now[0] = 11.0
    assert store.lookup(hold.media_ids[0]) is None
    store.hold([entry(b"b" * 60)])  # the expired one no longer counts
    assert store.bytes == 60
    hold.release()  # late release of an expired entry: harmless
    assert store.bytes == 60
