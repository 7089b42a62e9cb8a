"""Prefix caching, eviction order and KV events of the block manager (no model)."""

from __future__ import annotations

from contract.block_hash import block_hashes
from contract.messages import KvRemoved, KvStored, SamplingParams
from mpi_workers.engine.block_manager import BlockManager
from mpi_workers.engine.scheduler import Scheduler
from mpi_workers.engine.sequence import Sequence

BS = 4


def seq(tokens: list[int], rid: str = "r") -> Sequence:
    return Sequence(rid, list(tokens), SamplingParams(), max_len=1000)


def compute_all(bm: BlockManager, s: Sequence) -> None:
    """Pretend the whole sequence's KV was computed."""
    bm.allocate(s, s.num_tokens)
    s.num_computed = s.num_tokens
    bm.commit(s)


def stored_hashes(events) -> list[int]:
    return [h for e in events if isinstance(e, KvStored) for h in e.block_hashes]


def test_commit_emits_chained_hashes_with_parent():
    bm = BlockManager(8, BS)
    tokens = list(range(10))
    s = seq(tokens)
    assert bm.admit(s, 5)
    s.num_computed = 5
    bm.commit(s)
    events = bm.take_events()
    assert stored_hashes(events) == block_hashes(tokens, BS)[:1]
    assert events[0].parent_hash is None
    bm.allocate(s, 10)
    s.num_computed = 10
    bm.commit(s)
    events = bm.take_events()
    assert stored_hashes(events) == block_hashes(tokens, BS)[1:2]
    assert events[0].parent_hash == block_hashes(tokens, BS)[0]
    assert sorted(bm.cached_hashes()) == sorted(block_hashes(tokens, BS))


def test_prefix_hit_never_covers_last_token():
    bm = BlockManager(8, BS)
    a = seq(list(range(8)), "a")
    assert bm.admit(a, 8)
    compute_all(bm, a)
    bm.free(a)
    b = seq(list(range(8)), "b")  # identical 2-block prompt: only the first block may hit
    assert bm.admit(b, 100)
    assert b.num_computed == 4
    c = seq(list(range(9)), "c")
    assert bm.admit(c, 100)
    assert c.num_computed == 8


def test_collision_guard_compares_token_ids():
    bm = BlockManager(8, BS)
    a = seq(list(range(9)), "a")
    assert bm.admit(a, 9)
    compute_all(bm, a)
    # Corrupt the stored ids as if another block had collided on the same hash.
    bm.blocks[a.block_table[0]].token_ids = (99, 99, 99, 99)
    b = seq(list(range(9)), "b")
    assert bm.admit(b, 9)
    assert b.num_computed == 0


def test_freed_blocks_keep_hash_and_are_evicted_lru_with_removed_event():
    bm = BlockManager(4, BS)
    a = seq(list(range(9)), "a")  # 3 blocks, 2 full
    assert bm.admit(a, 9)
    compute_all(bm, a)
    bm.free(a)
    hashes = block_hashes(a.token_ids, BS)
    bm.take_events()
    assert bm.num_free_blocks == 4
    assert sorted(bm.cached_hashes()) == sorted(hashes)
    # 3 fresh blocks: the 2 unhashed ones go first, then the tail hashed block (hashes[1]).
    b = seq(list(range(100, 112)), "b")
    assert bm.admit(b, 12)
    events = bm.take_events()
    assert events == [KvRemoved(block_hashes=[hashes[1]])]
    assert bm.cached_hashes() == [hashes[0]]


def test_admit_fails_cleanly_when_pool_is_short():
    bm = BlockManager(2, BS)
    s = seq(list(range(12)))
    assert not bm.admit(s, 12)
    assert s.block_table == [] and bm.num_free_blocks == 2


def test_scheduler_preempts_newest_when_blocks_run_out():
    bm = BlockManager(4, BS)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = seq(list(range(7)), "a"), seq(list(range(50, 57)), "b")
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["a", "b"]
    for s, n in zip(batch.seqs, batch.num_tokens, strict=True):
        s.num_computed += n
        s.token_ids.append(1)  # sampled token: 8 tokens, still 2 blocks each
    for s in batch.seqs:
        s.num_computed = s.num_tokens
        s.token_ids.append(1)  # 9 tokens: each needs a third block, pool has 0 free
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["a"]
    assert sched.num_preemptions == 1
    assert list(sched.waiting) == [b] and b.num_computed == 0 and b.block_table == []
