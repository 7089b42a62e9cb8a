"""Chained block hashes: stable across processes and releases, chained, full blocks only."""

from __future__ import annotations

import subprocess
import sys

from contract.block_hash import block_hashes, hash_block


def test_known_values() -> None:
    # Fixed forever: the router and KV events of other processes and machines rely on them.
    assert hash_block(None, [1, 2, 3, 4]) == 658132497017838498
    assert block_hashes(list(range(10)), 4) == [5919486166599431679, 3142802598544154706]


def test_chaining() -> None:
    tokens = list(range(12))
    first, second, third = block_hashes(tokens, 4)
    assert first == hash_block(None, tokens[0:4])
    assert second == hash_block(first, tokens[4:8])
    assert third == hash_block(second, tokens[8:12])
    # Same block content after a different prefix: a different hash.
    assert block_hashes([9, 9, 9, 9, *tokens[4:8]], 4)[1] != second
    # A shared prefix gives shared leading hashes.
    assert block_hashes([*tokens[:8], 100, 101, 102, 103], 4)[:2] == [first, second]


def test_partial_blocks_have_no_hash() -> None:
    assert block_hashes([1, 2, 3], 4) == []
    assert block_hashes(list(range(7)), 4) == block_hashes(list(range(4)), 4)
    assert len(block_hashes(list(range(8)), 4)) == 2
    assert block_hashes([], 4) == []


def test_same_in_another_process() -> None:
    code = "from contract.block_hash import block_hashes; print(block_hashes(list(range(32)), 16))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={"PYTHONHASHSEED": "123"},
    )  # fmt: skip
    assert out.stdout.strip() == str(block_hashes(list(range(32)), 16))


def test_media_extras_separate_images_and_keep_text_blocks() -> None:
    from contract.block_hash import block_hashes, media_block_extras

    ids = [7] * 4 + [99] * 20 + [8] * 8  # an image run at 4..23 in 16-token blocks
    plain = block_hashes(ids, 16)
    one = block_hashes(ids, 16, media_block_extras([(4, 20, 111)], 16))
    same = block_hashes(ids, 16, media_block_extras([(4, 20, 111)], 16))
    other = block_hashes(ids, 16, media_block_extras([(4, 20, 222)], 16))
    assert one == same
    assert one[0] != other[0] and one[1] != other[1]  # both blocks hold image positions
    assert one[0] != plain[0]
    assert block_hashes(ids, 16, {}) == plain
    # the same image one token later is another prefix
    shifted = media_block_extras([(5, 20, 111)], 16)
    assert block_hashes(ids, 16, shifted)[0] != one[0]


def test_block_hashes_equal_chained_hash_block_on_random_prompts() -> None:
    """`block_hashes` packs the prompt once; it must name every block as `hash_block` does,
    image extras included."""
    import random

    rng = random.Random(3)
    for _ in range(200):
        size = rng.choice([1, 4, 16, 32])
        tokens = [rng.randrange(0, 2**31) for _ in range(rng.randrange(0, 200))]
        extras = {i: rng.randrange(2**64) for i in range(10) if rng.random() < 0.3}
        chained, parent = [], None
        for index in range(len(tokens) // size):
            block = tokens[index * size : (index + 1) * size]
            parent = hash_block(parent, block, extras.get(index))
            chained.append(parent)
        assert block_hashes(tokens, size, extras) == chained
