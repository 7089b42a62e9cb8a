"""A request's chunks joined in the worker's outbox carry the same stream."""

from __future__ import annotations

import itertools
import random

from contract.messages import TokenLogprob
from mpi_workers.engine.streaming import Chunk, coalesce_chunks


def _random_chunks(rng: random.Random) -> list[Chunk]:
    """Chunks of three interleaved requests as a worker's outbox holds them ("c" asked for
    logprobs, but a chunk of it may carry none: such a pair is kept apart)."""
    chunks: list[Chunk] = []
    finished: set[str] = set()
    for _ in range(rng.randrange(0, 15)):
        request_id = rng.choice("abc")
        if request_id in finished:
            continue
        tokens = [rng.randrange(1000) for _ in range(rng.randrange(0, 3))]
        with_logprobs = request_id == "c" and rng.random() < 0.8
        roll = rng.random()
        chunk = Chunk(
            request_id,
            tokens,
            [TokenLogprob(token_id=t, logprob=-1.0) for t in tokens] if with_logprobs else None,
            "length" if roll < 0.15 else None,
            rng.choice([0, 7]),
            rng.choice([0, 3]),
            None,
        )
        if chunk.finish_reason is not None:
            finished.add(request_id)
        chunks.append(chunk)
    return chunks


def test_coalesced_chunks_carry_the_same_stream_per_request() -> None:
    """Joining a request's consecutive chunks keeps its tokens, logprobs and finish in
    order; counts come from the last chunk that had them; only logprobs on one side split."""
    rng = random.Random(7)
    joined_some = False
    for _ in range(400):
        chunks = _random_chunks(rng)
        before = [c._replace(token_ids=list(c.token_ids)) for c in chunks]
        coalesced = coalesce_chunks(chunks)
        assert chunks == before  # inputs untouched
        joined_some |= len(coalesced) < len(chunks)
        for request_id in "abc":
            mine = [c for c in chunks if c.request_id == request_id]
            theirs = [c for c in coalesced if c.request_id == request_id]
            tokens = [t for c in mine for t in c.token_ids]
            assert [t for c in theirs for t in c.token_ids] == tokens
            assert [e for c in theirs for e in c.logprobs or []] == [
                e for c in mine for e in c.logprobs or []
            ]
            assert [c.finish_reason for c in theirs if c.finish_reason] == [
                c.finish_reason for c in mine if c.finish_reason
            ]
            if mine:
                assert theirs[-1].finish_reason == mine[-1].finish_reason
                assert max(c.num_prompt_tokens for c in theirs) == max(
                    c.num_prompt_tokens for c in mine
                )
            for prev, nxt in itertools.pairwise(theirs):  # only logprobs on one side split
                assert (prev.logprobs is None) != (nxt.logprobs is None)
    assert joined_some


def test_the_prompt_logprobs_stay_on_the_first_chunk_when_joined() -> None:
    """A request's first chunk carries its prompt's logprobs: joined with the chunks after
    it, the one chunk still carries them (once); a chunk carrying them is never joined onto
    an earlier one (they would land after tokens of the answer)."""
    prompt = [TokenLogprob(token_id=5, logprob=-2.0)]
    first = Chunk("a", [1], None, None, 3, 0, None, prompt)
    joined = coalesce_chunks([first, Chunk("a", [2], None, None, 3, 0, None)])
    assert len(joined) == 1 and joined[0].token_ids == [1, 2]
    assert joined[0].prompt_logprobs == prompt
    assert joined[0].output().prompt_logprobs == prompt
    empty = Chunk("a", [], None, None, 0, 0, None)
    assert len(coalesce_chunks([empty, first])) == 2
