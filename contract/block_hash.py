"""Chained KV block hashes, identical in every process and on every machine.

A full block of `block_size` tokens is named by hashing its parent's hash together with
its own token ids, so one hash stands for the whole prefix up to and including the block.
A block that holds positions of an image (whose placeholder token ids are all the same) also
hashes which image sits there and where (`media_block_extras`): two requests with different
images never share a block, the same image at the same place does. The engine's prefix
cache, its KV events and the KV router all use these functions.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping, Sequence

_NO_PARENT = 0
_U64 = struct.Struct("<Q")
_BLAKE2B_8 = hashlib.blake2b(digest_size=8)


def hash_block(parent_hash: int | None, token_ids: Sequence[int], extra: int | None = None) -> int:
    """64-bit hash of one block given its parent's hash (None for the first block) and, for
    a block with image positions, its `media_block_extras` entry."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(struct.pack("<Q", _NO_PARENT if parent_hash is None else parent_hash))
    digest.update(struct.pack(f"<{len(token_ids)}i", *token_ids))
    if extra is not None:
        digest.update(struct.pack("<Q", extra))
    return int.from_bytes(digest.digest(), "little")


def media_block_extras(media: Iterable[tuple[int, int, int]], block_size: int) -> dict[int, int]:
    """Block index → a 64-bit digest of the images overlapping that block, for `media`
    given as (offset, length, content_hash) per image: each image's hash and where its run
    starts relative to the block. Blocks without image positions have no entry."""
    per_block: dict[int, list[tuple[int, int]]] = {}
    for offset, length, content in media:
        for index in range(offset // block_size, (offset + length - 1) // block_size + 1):
            per_block.setdefault(index, []).append((content, offset - index * block_size))
    extras: dict[int, int] = {}
    for index, items in per_block.items():
        digest = hashlib.blake2b(digest_size=8)
        for content, start in sorted(items, key=lambda item: item[1]):
            digest.update(struct.pack("<Qq", content & 0xFFFFFFFFFFFFFFFF, start))
        extras[index] = int.from_bytes(digest.digest(), "little")
    return extras


def block_hashes(
    token_ids: Sequence[int], block_size: int, extras: Mapping[int, int] | None = None
) -> list[int]:
    """Hashes of every full block of `token_ids`, in order; a partial tail block has none.
    `extras`: `media_block_extras` of the request's images (None or empty: text only).

    The same hashes as chaining `hash_block`, computed from one packing of the whole prompt
    (the frontend hashes every prompt at each block size its workers use, so this is on the
    request path)."""
    full = len(token_ids) // block_size
    if not full:
        return []
    packed = struct.pack(f"<{full * block_size}i", *token_ids[: full * block_size])
    width = 4 * block_size
    # copying a ready 8-byte BLAKE2b state costs less than building one per block
    new_digest, pack_u64, from_bytes = _BLAKE2B_8.copy, _U64.pack, int.from_bytes
    hashes: list[int] = []
    parent = _NO_PARENT
    for index, start in enumerate(range(0, full * width, width)):
        digest = new_digest()
        digest.update(pack_u64(parent) + packed[start : start + width])
        extra = extras.get(index) if extras else None
        if extra is not None:
            digest.update(pack_u64(extra))
        parent = from_bytes(digest.digest(), "little")
        hashes.append(parent)
    return hashes
