"""Continuous batching: which tokens of which sequences run in the next step.

Each step first gives every running sequence its next token(s) (decode, or the next chunk
of a partly prefilled prompt), then admits waiting sequences with (chunked) prefill, all
under `max_num_batched_tokens` and `max_num_seqs`. When the pool runs out of blocks the
newest running sequence is preempted: its blocks are freed (hashed ones stay in the prefix
cache) and it goes back to the front of the waiting queue to be recomputed later.

Requests with a common prompt that arrive together (the `n` choices of one OpenAI request,
or one system prompt sent by many users at once) compute it once: a waiting sequence whose
next uncached prompt block a running sequence is still computing (or has computed but not
yet published) waits until that block is in the prefix cache, then is admitted with the
shared prefix as a cache hit. The others behind it in the queue are admitted meanwhile.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from mpi_workers.engine.block_manager import BlockManager
from mpi_workers.engine.sequence import SeqStatus, Sequence

logger = logging.getLogger(__name__)


@dataclass
class ScheduledBatch:
    """Sequences of one step and how many new tokens each computes (same order)."""

    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(
        self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int
    ) -> None:
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_cached_prompt_tokens = 0
        self.num_deferred_admissions = 0  # steps a sequence waited for a shared prefix

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def find(self, request_id: str) -> Sequence | None:
        for seq in self.running:
            if seq.request_id == request_id:
                return seq
        for seq in self.waiting:
            if seq.request_id == request_id:
                return seq
        return None

    def remove(self, seq: Sequence) -> None:
        """Take `seq` out of the queues and free its blocks (finish or abort)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if not seq.hold_blocks:  # a disaggregated prefill frees them after the KV transfer
            self.bm.free(seq)
        seq.status = SeqStatus.FINISHED

    def _preempt(self, seq: Sequence) -> None:
        logger.debug("preempting %s (%d tokens)", seq.request_id, seq.num_tokens)
        self.running.remove(seq)
        self.bm.free(seq)
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        # 1. Running sequences, oldest first; preempt from the newest end when short of blocks.
        # Every step of a real-time mocker runs this for every running sequence: plain reads
        # (`seq.remaining` and `bm.num_new_blocks` written out), the block manager called only
        # when a block is needed.
        bm = self.bm
        block_size = bm.block_size
        running = self.running
        seqs, counts = batch.seqs, batch.num_tokens
        index = 0
        while index < len(running) and budget > 0:
            seq = running[index]
            computed = seq.num_computed
            n = len(seq.token_ids) - computed
            if n > budget:
                n = budget
            need = -(-(computed + n) // block_size) - len(seq.block_table)
            if need > 0:  # most decode steps fit in the last block: nothing to check or take
                while not bm.can_allocate(need) and running[-1] is not seq:
                    self._preempt(running[-1])
                if not bm.can_allocate(need):
                    self._preempt(seq)  # it is the newest: it waits for the others to finish
                    break
                bm.allocate(seq, computed + n)
            seqs.append(seq)
            counts.append(n)
            budget -= n
            index += 1
        # 2. Waiting sequences in order, while there is room; no preemption for them. One
        # whose prompt blocks a running sequence is computing right now waits a step or more.
        deferred: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self._awaits_shared_prefix(seq):
                deferred.append(self.waiting.popleft())
                continue
            if not self.bm.admit(seq, budget):
                break
            self.waiting.popleft()
            if not seq.admitted_once:
                seq.num_cached_tokens = min(seq.num_computed, seq.num_prompt_tokens)
                self.num_cached_prompt_tokens += seq.num_cached_tokens
                seq.admitted_once = True
            n = min(seq.remaining, budget)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            budget -= n
        self.waiting.extendleft(reversed(deferred))
        self.num_deferred_admissions += len(deferred)
        return batch

    def _awaits_shared_prefix(self, seq: Sequence) -> bool:
        """Whether a running sequence holds the block that would extend `seq`'s cached
        prefix without having published it yet (it is computing it, or computed it in a step
        not yet committed): admitting `seq` now would compute those tokens a second time."""
        bm = self.bm
        if not bm.enable_prefix_caching or seq.reads_no_cache:
            return False  # (one wanting its prompt's logprobs reads no cache: no need to wait)
        bs = bm.block_size
        first = seq.token_ids[:bs]
        if len(first) < bs:
            return False
        # cheap filter first: running sequences with unpublished full blocks and the same
        # first block (hashing `seq`'s prefix only when one exists)
        sharers = [
            other
            for other in self.running
            if len(other.block_hashes) < other.num_tokens // bs and other.token_ids[:bs] == first
        ]
        if not sharers:
            return False
        cached = bm.num_cached_blocks(seq)
        end = (cached + 1) * bs  # the next block `seq` would have to compute
        if end > seq.num_tokens - 1:  # the last token is always computed: no block to share
            return False
        want = seq.token_ids[:end]
        extras = _extras_below(seq, cached + 1)
        return any(
            len(other.block_hashes) <= cached
            and other.num_tokens >= end
            and other.token_ids[:end] == want
            and _extras_below(other, cached + 1) == extras
            for other in sharers
        )


def _extras_below(seq: Sequence, num_blocks: int) -> dict[int, int]:
    """The image hashes of `seq`'s first `num_blocks` blocks (equal prefixes share them)."""
    return {i: h for i, h in seq.block_extras.items() if i < num_blocks}
