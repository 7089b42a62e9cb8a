"""MockerEngine: real block manager events and prefix hits, timing model, pseudo tokens."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from contract.block_hash import block_hashes
from contract.config import MockerConfig, load_config
from contract.messages import (
    GenerateRequest,
    KvEvent,
    KvRemoved,
    KvStored,
    PoolingParams,
    SamplingParams,
    choice_seed,
    decode_embedding,
)
from mpi_workers.engine.factory import build_engine
from mpi_workers.engine.mocker import MockerEngine, ModelShape
from mpi_workers.engine.scheduler import ScheduledBatch
from mpi_workers.engine.sequence import Sequence

FAST = MockerConfig(speedup=1000.0)


def request(rid: str, tokens: list[int], max_tokens: int = 4, **sampling) -> GenerateRequest:
    return GenerateRequest(
        request_id=rid,
        token_ids=tokens,
        sampling=SamplingParams(max_tokens=max_tokens, **sampling),
    )


async def run(engine: MockerEngine, req: GenerateRequest) -> tuple[list[int], object]:
    tokens: list[int] = []
    last = None
    async for out in engine.generate(req):
        tokens.extend(out.token_ids)
        last = out
    return tokens, last


@pytest.fixture
async def engine():
    eng = MockerEngine(FAST, shape=ModelShape(vocab_size=100, eos_token_ids=(2,)), num_blocks=64)
    await eng.start()
    yield eng
    await eng.shutdown()


async def test_runs_to_max_tokens_with_deterministic_tokens_never_eos(engine) -> None:
    prompt = list(range(3, 40))
    first, last = await run(engine, request("a", prompt, max_tokens=50, stop_token_ids=[2, 7]))
    assert len(first) == 50 and last.finish_reason == "length"
    assert all(0 <= t < 100 and t not in (2, 7) for t in first)
    again, _ = await run(engine, request("b", prompt, max_tokens=50, stop_token_ids=[2, 7]))
    assert again == first
    other, _ = await run(engine, request("c", prompt[::-1], max_tokens=50))
    assert other != first
    assert engine.simulated and last.num_prompt_tokens == len(prompt)


async def test_kv_events_match_contract_hashes(engine) -> None:
    events: list[KvEvent] = []
    engine.set_kv_event_sink(events.extend)
    prompt = list(range(3, 43))  # 40 tokens: 2 full blocks of 16
    await run(engine, request("a", prompt, max_tokens=1))
    stored = [h for e in events if isinstance(e, KvStored) for h in e.block_hashes]
    assert stored[:2] == block_hashes(prompt, 16)
    assert set(engine.cached_block_hashes()) >= set(block_hashes(prompt, 16))


async def test_prefix_hit_is_reported_and_skips_prefill_time(engine) -> None:
    shared = list(range(3, 67))  # 4 blocks
    _, first = await run(engine, request("a", [*shared, 70, 71], max_tokens=1))
    assert first.num_cached_tokens == 0
    _, second = await run(engine, request("b", [*shared, 80, 81, 82], max_tokens=1))
    assert second.num_cached_tokens == 64
    assert engine.stats.num_cached_prompt_tokens == 64


async def test_choices_sent_together_prefill_once_and_seeds_make_them_differ(engine) -> None:
    """The n choices of one request: one prompt, seeds seed + i, all submitted at once."""
    import asyncio

    prompt = list(range(3, 53))  # 50 tokens: 3 full blocks of 16 can be shared
    reqs = [request(f"c{i}", prompt, max_tokens=8, temperature=0.8, seed=40 + i)
            for i in range(4)]  # fmt: skip
    results = await asyncio.gather(*(run(engine, r) for r in reqs))
    assert [last.num_cached_tokens for _, last in results] == [0, 48, 48, 48]
    assert engine.stats.num_cached_prompt_tokens == 3 * 48
    assert len({tuple(tokens) for tokens, _ in results}) == 4  # the seeds differ
    again, _ = await run(engine, request("again", prompt, 8, temperature=0.8, seed=42))
    assert again == results[2][0]  # reproducible per seed
    greedy, _ = await run(engine, request("g", prompt, 8, temperature=0.0, seed=42))
    plain, _ = await run(engine, request("p", prompt, 8, temperature=0.0))
    assert greedy == plain  # a seed changes nothing at temperature 0


# main's tokens (dd69b76, before the choice index) for the prompt 3..52, 12 tokens at
# temperature 0.8, on `engine`'s 100-token vocabulary: what the benchmarks' texts rest on
FROZEN_UNSEEDED = [47, 12, 40, 52, 45, 75, 16, 62, 1, 14, 19, 70]
FROZEN_SEED_42 = [30, 72, 85, 6, 53, 89, 39, 64, 46, 29, 46, 6]


def choice(rid: str, prompt: list[int], index: int, **sampling) -> GenerateRequest:
    """Choice `index` of a request, as the frontend sends it (`frontend.choices`)."""
    seed = sampling.pop("seed", None)
    if seed is not None:
        sampling["seed"] = choice_seed(seed, index)
    return GenerateRequest(
        request_id=rid, token_ids=prompt, choice_index=index,
        sampling=SamplingParams(max_tokens=12, **sampling),
    )  # fmt: skip


async def test_choices_differ_by_index_and_choice_0_keeps_its_tokens(engine) -> None:
    """Unseeded choices at temperature > 0 differ from each other (their index is mixed in);
    choice 0 keeps the tokens it had before the index existed; seeded choices differ and
    repeat themselves; greedy choices are one text."""
    prompt = list(range(3, 53))
    unseeded = [(await run(engine, choice(f"u{i}", prompt, i, temperature=0.8)))[0]
                for i in range(4)]  # fmt: skip
    assert unseeded[0] == FROZEN_UNSEEDED
    assert len({tuple(tokens) for tokens in unseeded}) == 4
    again, _ = await run(engine, choice("u2-again", prompt, 2, temperature=0.8))
    assert again == unseeded[2]

    seeded = [(await run(engine, choice(f"s{i}", prompt, i, temperature=0.8, seed=42)))[0]
              for i in range(4)]  # fmt: skip
    assert seeded[0] == FROZEN_SEED_42
    assert len({tuple(tokens) for tokens in seeded + unseeded}) == 8
    again, _ = await run(engine, choice("s3-again", prompt, 3, temperature=0.8, seed=42))
    assert again == seeded[3]
    # choice 1 of seed 42 samples with seed 43 but is not the seed-43 request's sample
    seed_43, _ = await run(engine, choice("s43", prompt, 0, temperature=0.8, seed=43))
    assert seed_43 != seeded[1]

    greedy = [(await run(engine, choice(f"g{i}", prompt, i, temperature=0.0)))[0]
              for i in range(3)]  # fmt: skip
    assert greedy[0] == greedy[1] == greedy[2]


async def test_eviction_emits_removed() -> None:
    eng = MockerEngine(FAST, shape=ModelShape(vocab_size=100), num_blocks=4)
    events: list[KvEvent] = []
    eng.set_kv_event_sink(events.extend)
    await eng.start()
    try:
        await run(eng, request("a", list(range(3, 52)), max_tokens=1))  # 3 full blocks
        await run(eng, request("b", list(range(52, 99)), max_tokens=1))  # needs the pool
    finally:
        await eng.shutdown()
    removed = [h for e in events if isinstance(e, KvRemoved) for h in e.block_hashes]
    assert set(removed) & set(block_hashes(list(range(3, 52)), 16))


async def test_abort_frees_blocks_and_ends_stream(engine) -> None:
    slow = MockerEngine(MockerConfig(decode_ms_base=50.0), shape=ModelShape(vocab_size=100))
    await slow.start()
    try:
        stream = slow.generate(request("a", list(range(3, 40)), max_tokens=1000))
        out = await stream.__anext__()
        assert out.token_ids
        await stream.aclose()
        assert slow.load_metrics().active_blocks == 0
        assert slow.scheduler.find("a") is None
    finally:
        await slow.shutdown()


async def test_validation_names_the_parameter(engine) -> None:
    with pytest.raises(ValueError) as info:
        engine.generate(request("a", [], max_tokens=1))
    assert info.value.param == "token_ids"
    with pytest.raises(ValueError, match="token_ids"):
        engine.generate(request("a", [500], max_tokens=1))
    with pytest.raises(ValueError, match="max_tokens"):
        engine.generate(request("a", [5], max_tokens=0))


def _seq(n_prompt: int, computed: int, total: int | None = None) -> Sequence:
    seq = Sequence("r", list(range(total or n_prompt)), SamplingParams(), max_len=10_000)
    seq.num_prompt_tokens = n_prompt
    seq.num_computed = computed
    return seq


def test_timing_model_scales() -> None:
    timing = MockerConfig(
        prefill_ms_per_token=0.1,
        decode_ms_base=5.0,
        decode_ms_per_seq=1.0,
        decode_ms_per_ctx_token=0.01,
        speedup=2.0,
    )
    eng = MockerEngine(timing)
    prefill_100 = ScheduledBatch([_seq(100, 0)], [100])
    prefill_200 = ScheduledBatch([_seq(200, 0)], [200])
    assert eng.step_time_s(prefill_100) == pytest.approx(0.1 * 100 / 1000 / 2)
    assert eng.step_time_s(prefill_200) == pytest.approx(2 * eng.step_time_s(prefill_100))
    # a cached prefix is not scheduled: only the 20 uncached tokens cost
    assert eng.step_time_s(ScheduledBatch([_seq(100, 80)], [20])) == pytest.approx(0.001)
    one = ScheduledBatch([_seq(10, 10, 11)], [1])
    four = ScheduledBatch([_seq(10, 10, 11) for _ in range(4)], [1] * 4)
    assert eng.step_time_s(one) == pytest.approx((5 + 1 + 0.11) / 1000 / 2)
    assert eng.step_time_s(four) == pytest.approx((5 + 4 + 0.44) / 1000 / 2)
    long_ctx = ScheduledBatch([_seq(1000, 1000, 1001)], [1])
    assert eng.step_time_s(long_ctx) > eng.step_time_s(one)


async def test_wall_time_follows_the_model() -> None:
    timing = MockerConfig(prefill_ms_per_token=0.0, decode_ms_base=20.0, decode_ms_per_seq=0.0,
                          decode_ms_per_ctx_token=0.0, speedup=1.0)  # fmt: skip
    eng = MockerEngine(timing, shape=ModelShape(vocab_size=100))
    await eng.start()
    try:
        t0 = time.perf_counter()
        await run(eng, request("a", [5, 6, 7], max_tokens=6))  # 1 prefill + 5 decode steps
        elapsed = time.perf_counter() - t0
    finally:
        await eng.shutdown()
    assert 0.09 <= elapsed < 1.0


def test_factory_builds_a_mocker_from_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        '{"vocab_size": 777, "max_position_embeddings": 300, "eos_token_id": [5, 6]}'
    )
    config = load_config(
        overrides=["engine.kind=mocker", "engine.mocker.speedup=10", "engine.block_size=8"],
        environ={},
    )
    eng = build_engine(config, tmp_path)
    assert isinstance(eng, MockerEngine) and eng.simulated
    assert (eng.vocab_size, eng.max_model_len, eng.block_size) == (777, 300, 8)
    assert eng.timing.speedup == 10
    assert isinstance(build_engine(config, tmp_path / "missing"), MockerEngine)


async def test_listening_gets_every_output_in_order_like_iterating(engine) -> None:
    """`OutputStream.listen` (the worker's path: no task wake-up per token) delivers what
    iteration would: outputs queued before it first, then each one as it comes, the last
    with the finish reason; the same tokens as iterating the same prompt."""
    import asyncio

    prompt = list(range(10, 30))
    expected, _ = await run(engine, request("iterated", prompt, max_tokens=12))
    stream = engine.generate(request("listened", prompt, max_tokens=12))
    await asyncio.sleep(0.01)  # let a few steps queue outputs before listening
    outputs = []
    done = asyncio.get_running_loop().create_future()

    def on_output(out) -> None:
        outputs.append(out)
        if out.finish_reason is not None:
            done.set_result(None)

    stream.listen(on_output)
    await asyncio.wait_for(done, 10)
    assert [t for out in outputs for t in out.token_ids] == expected
    assert [out.finish_reason for out in outputs][-1] == "length"
    assert all(out.finish_reason is None for out in outputs[:-1])


async def test_short_steps_reach_the_caller_in_chunks_of_several_tokens() -> None:
    """Sped up below the loop's timer resolution, the tokens of the steps run between two
    yields come as one chunk (the same tokens, in order); at real-time steps (5 ms, above
    the 2 ms the mocker sums before sleeping) every step's token is its own chunk."""
    shape = ModelShape(vocab_size=100, eos_token_ids=(2,))
    prompt = list(range(3, 40))
    streams: dict[float, list[list[int]]] = {}
    for speedup in (1e6, 1.0):
        eng = MockerEngine(MockerConfig(speedup=speedup), shape=shape, num_blocks=64)
        await eng.start()
        try:
            chunks = [out.token_ids async for out in eng.generate(request("r", prompt, 12))]
        finally:
            await eng.shutdown()
        streams[speedup] = chunks
    fast, real_time = streams[1e6], streams[1.0]
    assert [t for c in fast for t in c] == [t for c in real_time for t in c]
    assert len([t for c in fast for t in c]) == 12
    assert len(fast) < 12  # 12 steps in far less than the 0.5 ms between yields
    assert [len(c) for c in real_time if c] == [1] * 12


async def test_kv_events_of_blocks_filled_while_decoding_chain_in_order(engine) -> None:
    """A step calls the block manager only when a block filled: the blocks a request
    fills while decoding are still each stored once, in order, each the parent of the
    next, with the contract's hashes of prompt + generated tokens."""
    events: list[KvEvent] = []
    engine.set_kv_event_sink(events.extend)
    prompt = list(range(3, 23))  # 20 tokens: 1 full block, 3 more filled by decoding
    tokens, _ = await run(engine, request("a", prompt, max_tokens=45))
    stored = [e for e in events if isinstance(e, KvStored)]
    hashes = [h for e in stored for h in e.block_hashes]
    # the last token is sampled from a step that computes the one before it: its KV is never
    # computed, so a block it would complete stays unstored
    assert hashes == block_hashes([*prompt, *tokens][: len(prompt) + len(tokens) - 1], 16)
    assert len(hashes) == 4  # 64 tokens with KV: the prompt's block and 3 filled by decoding
    parents = [e.parent_hash for e in stored]
    assert parents[0] is None
    assert all(p == hashes[i - 1] for i, p in enumerate(parents) if i)  # one block per event


async def test_listened_chunks_are_the_outputs_and_closing_aborts_only_a_running_request(
    engine,
) -> None:
    """`listen_chunks` (the worker's path) gets the engine's `Chunk`s: each one's `output()`
    is what iteration yields. Closing a listened stream aborts the request while it runs
    (its blocks are freed), and is a no-op once the engine finished it."""
    import asyncio

    from mpi_workers.engine.streaming import Chunk

    prompt = list(range(10, 30))
    expected = [out async for out in engine.generate(request("iterated", prompt, 6))]
    chunks: list[Chunk] = []
    done = asyncio.get_running_loop().create_future()

    def on_chunk(chunk: Chunk) -> None:
        chunks.append(chunk)
        if chunk.finish_reason is not None:
            done.set_result(None)

    stream = engine.generate(request("listened", prompt, 6))
    stream.listen_chunks(on_chunk)
    await asyncio.wait_for(done, 10)
    got = [chunk.output() for chunk in chunks]
    assert [t for o in got for t in o.token_ids] == [t for o in expected for t in o.token_ids]
    apart = {"request_id", "token_ids", "num_cached_tokens"}  # the second one hits the cache
    assert got[-1].model_dump(exclude=apart) == expected[-1].model_dump(exclude=apart)
    assert got[-1].num_cached_tokens == 16 and got[-1].finish_reason == "length"
    aborted: list[str] = []
    real_abort = engine.abort
    engine.abort = lambda rid: aborted.append(rid) or real_abort(rid)  # type: ignore[method-assign]
    await stream.aclose()  # finished: nothing to abort
    assert aborted == []

    slow = MockerEngine(MockerConfig(decode_ms_base=50.0), shape=ModelShape(vocab_size=100))
    await slow.start()
    try:
        running = slow.generate(request("long", prompt, max_tokens=1000))
        first = asyncio.get_running_loop().create_future()
        running.listen_chunks(lambda chunk: first.done() or first.set_result(None))
        await asyncio.wait_for(first, 10)  # running: its first token is out
        assert slow.load_metrics().active_blocks > 0
        await running.aclose()
        assert slow.load_metrics().active_blocks == 0 and slow.scheduler.find("long") is None
    finally:
        await slow.shutdown()


async def test_shutdown_aborts_running_requests_and_a_restarted_engine_serves() -> None:
    """Stepping is timer callbacks: shutdown cancels the pending one (requests in flight end
    with "abort", new ones are refused) and a later start steps again."""
    eng = MockerEngine(MockerConfig(speedup=1.0), shape=ModelShape(vocab_size=100), num_blocks=64)
    await eng.start()
    stream = eng.generate(request("long", list(range(3, 20)), max_tokens=1000))
    first = await anext(stream)  # real-time pace: ~5 ms a token, far from done
    await eng.shutdown()
    rest = [out async for out in stream]
    assert rest and rest[-1].finish_reason == "abort"
    assert len(first.token_ids) + sum(len(out.token_ids) for out in rest) < 1000
    with pytest.raises(RuntimeError, match="not started"):
        eng.generate(request("late", [5, 6, 7]))
    await eng.start()
    try:
        tokens, last = await run(eng, request("again", [5, 6, 7], max_tokens=3))
        assert len(tokens) == 3 and last.finish_reason == "length"
    finally:
        await eng.shutdown()


def embed_request(rid: str, tokens: list[int], **pooling) -> GenerateRequest:
    return GenerateRequest(request_id=rid, token_ids=tokens, pooling=PoolingParams(**pooling))


async def test_simulated_embedding_after_the_prompt_time_same_prompt_same_vector() -> None:
    slow = MockerConfig(prefill_ms_per_token=1.0, speedup=1.0)
    engine = MockerEngine(slow, shape=ModelShape(vocab_size=100, hidden_size=48), num_blocks=64)
    await engine.start()
    try:
        prompt = list(range(3, 43))  # 40 tokens: 40 ms of simulated prefill
        started = time.perf_counter()
        tokens, last = await run(engine, embed_request("e1", prompt))
        assert time.perf_counter() - started >= 0.035
        assert tokens == [] and last.finish_reason == "stop" and last.embedding is not None
        vector = np.array(decode_embedding(last.embedding))
        assert vector.shape == (48,) and abs(np.linalg.norm(vector) - 1) < 1e-5
        _, again = await run(engine, embed_request("e2", prompt))
        assert again.embedding == last.embedding
        _, other = await run(engine, embed_request("e3", prompt[::-1]))
        assert other.embedding != last.embedding
        _, cut = await run(engine, embed_request("e4", prompt, dimensions=8, normalize=False))
        assert len(decode_embedding(cut.embedding)) == 8
        with pytest.raises(ValueError, match="pooling"):
            engine.generate(embed_request("e5", prompt, dimensions=49))
        # a prompt of max_model_len tokens is embedded (no room for output is needed)
        _, whole = await run(engine, embed_request("e6", [5] * engine.max_model_len))
        assert whole.finish_reason == "stop"
    finally:
        await engine.shutdown()
