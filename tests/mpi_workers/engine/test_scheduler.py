"""Scheduler admission of sequences that share a prompt with one being computed (no model).

The n choices of one request reach the engine together; each must not prefill the prompt
again: the later ones wait until the first has published the shared blocks, then take them
from the prefix cache.
"""

from __future__ import annotations

from contract.messages import SamplingParams
from mpi_workers.engine.block_manager import BlockManager
from mpi_workers.engine.scheduler import ScheduledBatch, Scheduler
from mpi_workers.engine.sequence import Sequence

BS = 4


def seq(tokens: list[int], rid: str) -> Sequence:
    return Sequence(rid, list(tokens), SamplingParams(), max_len=1000)


def run_step(sched: Scheduler, batch: ScheduledBatch, sampled: int = 7) -> None:
    """What an engine does after a forward: count the tokens computed, append the sampled
    token of each sequence whose prompt is complete, publish full blocks."""
    for s, n in zip(batch.seqs, batch.num_tokens, strict=True):
        s.num_computed += n
        if s.num_computed == s.num_tokens:
            s.token_ids.append(sampled)
        sched.bm.commit(s)


def ids(batch: ScheduledBatch) -> list[str]:
    return [s.request_id for s in batch.seqs]


def test_choices_arriving_together_prefill_the_prompt_once() -> None:
    sched = Scheduler(BlockManager(64, BS), max_num_seqs=8, max_num_batched_tokens=256)
    prompt = list(range(10, 23))  # 13 tokens: 3 full blocks can be shared
    choices = [seq(prompt, f"c{i}") for i in range(4)]
    for s in choices:
        sched.add(s)
    first = sched.schedule()
    assert ids(first) == ["c0"] and first.num_tokens == [13]
    assert list(sched.waiting) == choices[1:]  # in their order, not admitted
    assert sched.num_deferred_admissions == 3
    run_step(sched, first)
    second = sched.schedule()
    assert ids(second) == ["c0", "c1", "c2", "c3"]
    assert second.num_tokens == [1, 1, 1, 1]  # each computes only the last prompt token
    assert [s.num_cached_tokens for s in choices] == [0, 12, 12, 12]
    assert sched.num_cached_prompt_tokens == 36
    # they share the prompt's blocks, not copies of them
    assert len({tuple(s.block_table[:3]) for s in choices}) == 1


def test_a_chunked_prefill_is_shared_whole() -> None:
    sched = Scheduler(BlockManager(64, BS), max_num_seqs=8, max_num_batched_tokens=6)
    prompt = list(range(30, 43))  # 13 tokens, 6 per step
    a, b = seq(prompt, "a"), seq(prompt, "b")
    sched.add(a)
    sched.add(b)
    for _ in range(2):  # 6 + 6 tokens: a's chunk takes the whole step budget
        batch = sched.schedule()
        assert ids(batch) == ["a"] and batch.num_tokens == [6]
        run_step(sched, batch)
    batch = sched.schedule()  # a's last prompt token; b finds 3 blocks cached
    assert ids(batch) == ["a", "b"] and batch.num_tokens == [1, 1]
    assert b.num_cached_tokens == 12


def test_only_the_shared_blocks_are_waited_for() -> None:
    sched = Scheduler(BlockManager(64, BS), max_num_seqs=8, max_num_batched_tokens=256)
    a = seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "a")
    b = seq([1, 2, 3, 4, 50, 60, 70, 80, 90], "b")  # shares the first block only
    sched.add(a)
    sched.add(b)
    first = sched.schedule()
    assert ids(first) == ["a"]
    run_step(sched, first)
    batch = sched.schedule()
    assert ids(batch) == ["a", "b"] and batch.num_tokens == [1, 5]
    assert b.num_cached_tokens == 4


def test_others_are_admitted_while_a_choice_waits() -> None:
    sched = Scheduler(BlockManager(64, BS), max_num_seqs=8, max_num_batched_tokens=256)
    prompt = list(range(10, 20))
    a, b, other = seq(prompt, "a"), seq(prompt, "b"), seq(list(range(60, 70)), "other")
    for s in (a, b, other):
        sched.add(s)
    assert ids(sched.schedule()) == ["a", "other"]
    assert list(sched.waiting) == [b]


def test_nothing_waits_without_prefix_caching_or_a_block_to_share() -> None:
    sched = Scheduler(BlockManager(64, BS, enable_prefix_caching=False), 8, 256)
    prompt = list(range(10, 20))
    for i in range(3):
        sched.add(seq(prompt, f"c{i}"))
    assert ids(sched.schedule()) == ["c0", "c1", "c2"]
    sched = Scheduler(BlockManager(64, BS), 8, 256)
    for i in range(3):  # 4 tokens: the only block holds the last token, never shared
        sched.add(seq([5, 6, 7, 8], f"d{i}"))
    assert ids(sched.schedule()) == ["d0", "d1", "d2"]


def test_blocks_computed_but_not_yet_published_are_waited_for() -> None:
    """Overlapped scheduling: step N+1 is scheduled before step N's blocks are committed."""
    sched = Scheduler(BlockManager(64, BS), max_num_seqs=8, max_num_batched_tokens=256)
    prompt = list(range(10, 19))
    a = seq(prompt, "a")
    sched.add(a)
    first = sched.schedule()
    a.num_computed += first.num_tokens[0]
    a.token_ids.append(-1)  # the placeholder of the token still on the device
    b = seq(prompt, "b")
    sched.add(b)
    assert ids(sched.schedule()) == ["a"]  # a's decode launched; b waits for a's commit
    a.token_ids[-1] = 7
    sched.bm.commit(a)
    assert "b" in ids(sched.schedule()) and b.num_cached_tokens == 8
