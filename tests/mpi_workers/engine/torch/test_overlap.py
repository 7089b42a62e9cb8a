"""Overlapped scheduling (step N+1 launched before step N's tokens reach the host) gives
exactly the tokens of synchronous stepping: checked on the CPU, where `overlap=True` runs
the same bookkeeping (placeholders, late resolution, wasted steps) without a GPU."""

from __future__ import annotations

import asyncio

import pytest

from contract.messages import GenerateRequest, SamplingParams
from mpi_workers.engine.torch.engine import TorchEngine

_counter = iter(range(10**6))


def req(prompt: list[int], **sampling) -> GenerateRequest:
    sampling.setdefault("temperature", 0.0)
    return GenerateRequest(request_id=f"o{next(_counter)}", token_ids=prompt,
                           sampling=SamplingParams(**sampling))  # fmt: skip


def prompts(count: int) -> list[list[int]]:
    return [[3 + (i * 7 + j * 5) % 100 for j in range(5 + 3 * (i % 4))] for i in range(count)]


async def run_all(engine: TorchEngine, requests: list[GenerateRequest]):
    outs = await asyncio.gather(*(engine.generate_all(r) for r in requests))
    return [(o.token_ids, o.finish_reason) for o in outs]


def engines(model_dir, **kwargs) -> tuple[TorchEngine, TorchEngine]:
    return (TorchEngine(model_dir, block_size=4, overlap=False, **kwargs),
            TorchEngine(model_dir, block_size=4, overlap=True, **kwargs))  # fmt: skip


async def both(model_dir, make_requests, **kwargs):
    results = []
    for engine in engines(model_dir, **kwargs):
        await engine.start()
        try:
            results.append((await run_all(engine, make_requests()), engine))
        finally:
            await engine.shutdown()
    return results


async def test_overlapped_tokens_equal_synchronous_tokens(tiny_llama_dir):
    lengths = [1, 2, 5, 9, 16, 3, 7, 12]

    def make():
        return [req(p, max_tokens=lengths[i % 8], ignore_eos=True)
                for i, p in enumerate(prompts(12))]  # fmt: skip

    (sync_out, _), (over_out, over) = await both(tiny_llama_dir, make, num_blocks=64,
                                                 max_num_seqs=8)  # fmt: skip
    assert over_out == sync_out
    assert [len(t) for t, _ in over_out] == [lengths[i % 8] for i in range(12)]
    assert over.stats.num_overlapped_steps > over.stats.num_steps // 2
    assert over.block_manager.num_free_blocks == 64  # nothing leaked by the wasted steps


async def test_stop_tokens_and_eos_end_at_the_same_token(tiny_llama_dir):
    probe = TorchEngine(tiny_llama_dir, block_size=4, num_blocks=64, overlap=False)
    await probe.start()
    first = await probe.generate_all(req(prompts(1)[0], max_tokens=6, ignore_eos=True))
    await probe.shutdown()
    stop = first.token_ids[2]

    def make():
        return [req(p, max_tokens=12, stop_token_ids=[stop]) for p in prompts(6)]

    (sync_out, _), (over_out, _) = await both(tiny_llama_dir, make, num_blocks=64)
    assert over_out == sync_out
    ends = first.token_ids.index(stop) + 1
    assert over_out[0] == (first.token_ids[:ends], "stop")


async def test_preemption_under_a_small_pool_keeps_the_tokens(tiny_llama_dir):
    def make():
        return [req(p, max_tokens=20, ignore_eos=True) for p in prompts(8)]

    (sync_out, _), (over_out, over) = await both(tiny_llama_dir, make, num_blocks=20,
                                                 max_num_seqs=8)  # fmt: skip
    assert over_out == sync_out
    assert over.stats.num_preemptions > 0
    assert over.block_manager.num_free_blocks == 20


async def test_rows_that_need_the_host_fall_back_to_synchronous_steps(tiny_llama_dir):
    def make():
        ps = prompts(4)
        return [
            req(ps[0], max_tokens=6, ignore_eos=True),
            req(ps[1], max_tokens=6, ignore_eos=True, logprobs=2),
            req(ps[2], max_tokens=6, ignore_eos=True, temperature=0.9, seed=7),
            req(ps[3], max_tokens=6, ignore_eos=True, repetition_penalty=1.3),
        ]

    (sync_out, _), (over_out, over) = await both(tiny_llama_dir, make, num_blocks=64)
    assert over_out == sync_out  # the seeded row too: its generator draws the same
    assert over.stats.num_overlapped_steps == 0


async def test_unseeded_sampling_overlaps(tiny_llama_dir):
    engine = TorchEngine(tiny_llama_dir, block_size=4, num_blocks=64, overlap=True)
    await engine.start()
    try:
        outs = await run_all(engine, [req(p, max_tokens=8, ignore_eos=True, temperature=1.0,
                                          top_p=0.9) for p in prompts(4)])  # fmt: skip
    finally:
        await engine.shutdown()
    assert all(len(tokens) == 8 and reason == "length" for tokens, reason in outs)
    assert all(0 <= t < engine.vocab_size for tokens, _ in outs for t in tokens)
    assert engine.stats.num_overlapped_steps > 0


async def test_abort_mid_stream_and_prefix_hits_while_overlapping(tiny_llama_dir):
    engine = TorchEngine(tiny_llama_dir, block_size=4, num_blocks=64, overlap=True)
    await engine.start()
    try:
        long = req(prompts(1)[0], max_tokens=40, ignore_eos=True)
        stream = engine.generate(long)
        got = 0
        async for out in stream:
            got += len(out.token_ids)
            if got >= 3:
                await engine.abort(long.request_id)
        assert 3 <= got < 40
        prompt = list(range(3, 3 + 17))  # four full blocks
        first = await engine.generate_all(req(prompt, max_tokens=5, ignore_eos=True))
        again = await engine.generate_all(req(prompt, max_tokens=5, ignore_eos=True))
        assert again.token_ids == first.token_ids and again.num_cached_tokens == 16
        for _ in range(100):  # the wasted step after the last one is settled when idle
            if engine.block_manager.num_free_blocks == 64:
                break
            await asyncio.sleep(0.01)
        assert engine.block_manager.num_free_blocks == 64
    finally:
        await engine.shutdown()


@pytest.mark.parametrize("overlap", [False, True])
async def test_engine_counts_generated_tokens_once(tiny_llama_dir, overlap):
    engine = TorchEngine(tiny_llama_dir, block_size=4, num_blocks=64, overlap=overlap)
    await engine.start()
    try:
        await run_all(engine, [req(p, max_tokens=5, ignore_eos=True) for p in prompts(3)])
    finally:
        await engine.shutdown()
    assert engine.stats.num_generated_tokens >= 15
    assert engine.stats.num_finished == 3


async def test_logit_bias_and_min_tokens_rows_take_synchronous_steps(tiny_llama_dir):
    """The overlapped launch samples with `choose` alone, which applies no logit_bias and
    no min_tokens mask: such rows must keep their steps synchronous, and get the same
    tokens as without overlap (the bias and the mask applied)."""
    probe = TorchEngine(tiny_llama_dir, block_size=4, num_blocks=64, overlap=False)
    await probe.start()
    first = await probe.generate_all(req(prompts(1)[0], max_tokens=6, ignore_eos=True))
    await probe.shutdown()
    stop, forced = first.token_ids[2], first.token_ids[0] + 1

    def make():
        ps = prompts(3)
        return [
            req(ps[0], max_tokens=8, stop_token_ids=[stop], min_tokens=6),
            req(ps[1], max_tokens=5, ignore_eos=True, logit_bias={forced: 100.0}),
            req(ps[2], max_tokens=6, ignore_eos=True),
        ]

    (sync_out, _), (over_out, over) = await both(tiny_llama_dir, make, num_blocks=64)
    assert over_out == sync_out
    assert over.stats.num_overlapped_steps == 0
    tokens, _ = over_out[0]
    assert len(tokens) >= 6 and stop not in tokens[:6]  # without min_tokens: by the 3rd
    assert over_out[1] == ([forced] * 5, "length")
