"""TensorRT-LLM KV events (their JSON shape, their own block hashes) → our router's events."""

from __future__ import annotations

from contract.block_hash import block_hashes
from contract.messages import KvRemoved, KvStored
from mpi_workers.engine.trtllm.kv_events import KvEventTranslator

BLOCK = 4


def stored(parent: int | None, blocks: list[tuple[int, list[int]]], window: int = 4096) -> dict:
    return {
        "event_id": 1,
        "window_size": window,
        "data": {
            "type": "stored",
            "parent_hash": parent,
            "blocks": [
                {
                    "type": "stored_block",
                    "block_hash": trt_hash,
                    "tokens": [
                        {"type": "unique_token", "token_id": t, "token_extra_id": 0} for t in toks
                    ],
                    "cache_level": 0,
                    "priority": 35,
                }
                for trt_hash, toks in blocks
            ],
        },
    }


def created(window: int = 4096) -> dict:
    return {"event_id": 0, "window_size": window,
            "data": {"type": "created", "num_blocks_per_cache_level": [64, 0]}}  # fmt: skip


def test_stored_blocks_get_our_chained_hashes_and_children_chain_on_them() -> None:
    tokens = list(range(100, 112))
    ours = block_hashes(tokens, BLOCK)
    translator = KvEventTranslator(BLOCK)
    events = translator.translate(
        [created(), stored(None, [(901, tokens[0:4]), (902, tokens[4:8])]),
         stored(902, [(903, tokens[8:12])])]
    )  # fmt: skip
    assert events == [
        KvStored(parent_hash=None, block_hashes=[ours[0], ours[1]]),
        KvStored(parent_hash=ours[1], block_hashes=[ours[2]]),
    ]  # fmt: skip
    assert sorted(translator.cached_hashes()) == sorted(ours)
    removed = translator.translate([{"event_id": 5, "window_size": 4096,
                                     "data": {"type": "removed", "block_hashes": [903, 777]}}])
    assert removed == [KvRemoved(block_hashes=[ours[2]])]  # 777 was never ours: dropped
    assert sorted(translator.cached_hashes()) == sorted(ours[:2])


def test_partial_blocks_other_windows_and_orphans_are_dropped() -> None:
    translator = KvEventTranslator(BLOCK)
    translator.translate([created(4096), created(128)])  # a sliding-window layer group too
    events = translator.translate([
        stored(None, [(1, [1, 2, 3, 4]), (2, [5, 6])]),  # stops at the partial block
        stored(None, [(3, [7, 7, 7, 7])], window=128),  # the smaller window's copy
        stored(12345, [(4, [8, 8, 8, 8])]),  # parent never seen: the router could not place it
        {"event_id": 9, "window_size": 4096,
         "data": {"type": "updated", "block_hash": 1, "priority": {"type": "event_diff"}}},
    ])  # fmt: skip
    assert events == [
        KvStored(parent_hash=None, block_hashes=[block_hashes([1, 2, 3, 4], 4)[0]])
    ]  # fmt: skip


def test_a_stored_event_stops_at_the_first_block_with_image_rows() -> None:
    translator = KvEventTranslator(BLOCK, vocab_size=1000)
    translator.translate([created()])
    image_row = 1001  # TensorRT-LLM marks image rows past the vocabulary
    events = translator.translate(
        [stored(None, [(1, [1, 2, 3, 4]), (2, [5, image_row, image_row, 6]), (3, [7, 8, 9, 10])])]
    )
    assert events == [
        KvStored(parent_hash=None, block_hashes=[block_hashes([1, 2, 3, 4], 4)[0]])
    ]  # fmt: skip
    assert translator.translate([stored(2, [(4, [1, 1, 1, 1])])]) == []  # its children too
