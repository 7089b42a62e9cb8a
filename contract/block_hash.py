"""Chained KV block hashes, identical in every process and on every machine.

A full block of `block_size` tokens is named by hashing its parent's hash together with
its own token ids, so one hash stands for the whole prefix up to and including the block.
The engine's prefix cache, its KV events and the KV router all use these functions.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

_NO_PARENT = 0


def hash_block(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """64-bit hash of one block given its parent's hash (None for the first block)."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(struct.pack("<Q", _NO_PARENT if parent_hash is None else parent_hash))
    digest.update(struct.pack(f"<{len(token_ids)}i", *token_ids))
    return int.from_bytes(digest.digest(), "little")


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Hashes of every full block of `token_ids`, in order; a partial tail block has none."""
    hashes: list[int] = []
    parent: int | None = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes
