"""The engine on the real SmolLM2-135M: exactness vs. HF transformers, prefix cache, preemption.

fp32 on CPU, so greedy decoding must give the very tokens HF `generate` gives.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from contract.block_hash import block_hashes
from contract.messages import GenerateRequest, KvRemoved, KvStored, SamplingParams
from mpi_workers.engine.torch.engine import TorchEngine

pytestmark = pytest.mark.model

NEW_TOKENS = 24
SYSTEM = (
    "You are a concise assistant for a team of high-performance-computing engineers. "
    "Answer in one or two sentences and prefer concrete facts."
)
QUESTIONS = [
    "What is the capital of France?",
    "Why is the sky blue?",
    "Name three prime numbers.",
    "What does a GPU do?",
    "Give one tip for writing clean Python code.",
]
OTHERS = ["Hello!", "Write a haiku about autumn leaves falling on a quiet river at dusk."]
_ids = iter(range(10**6))


def chat(tokenizer, question: str, system: bool = True) -> list[int]:
    messages = [{"role": "system", "content": SYSTEM}] if system else []
    messages.append({"role": "user", "content": question})
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def greedy(ids: list[int], max_tokens: int = NEW_TOKENS, **kw) -> GenerateRequest:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)
    return GenerateRequest(request_id=f"s{next(_ids)}", token_ids=ids, sampling=sampling)


@pytest.fixture(scope="module")
def tokenizer(smol_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_dir)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [chat(tokenizer, q) for q in QUESTIONS]


@pytest.fixture(scope="module")
def hf_reference(smol_dir, prompts) -> list[list[int]]:
    """HF transformers greedy continuations (stops at EOS like our engine)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).eval()
    refs = []
    with torch.inference_mode():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
            refs.append(out[0, len(ids) :].tolist())
    del model
    return refs


async def test_greedy_alone_matches_hf(engine, prompts, hf_reference):
    await engine.reset_prefix_cache()
    for i, (ids, ref) in enumerate(zip(prompts, hf_reference, strict=True)):
        out = await engine.generate_all(greedy(ids))
        assert out.token_ids == ref, f"prompt {i}"
        assert out.finish_reason == ("stop" if ref[-1] == 2 else "length")
        assert out.num_prompt_tokens == len(ids)
        if i > 0:  # the shared system prompt came from the prefix cache
            assert out.num_cached_tokens >= 32


async def test_greedy_batched_matches_hf(engine, tokenizer, prompts, hf_reference):
    await engine.reset_prefix_cache()
    extra = [greedy(chat(tokenizer, q, system=False), max_tokens=40) for q in OTHERS]
    reqs = [greedy(ids) for ids in prompts]
    outs = await asyncio.gather(*(engine.generate_all(r) for r in [*extra, *reqs]))
    assert [o.token_ids for o in outs[len(extra) :]] == hf_reference


async def test_greedy_with_cached_prefix_and_chunked_prefill(smol_dir, prompts, hf_reference):
    # Small token budget: prompts are prefilled in chunks over cached prefixes.
    e = TorchEngine(smol_dir, num_blocks=256, max_num_batched_tokens=24)
    await e.start()
    try:
        before = e.stats.num_computed_prompt_tokens
        outs = await asyncio.gather(*(e.generate_all(greedy(ids)) for ids in prompts[:3]))
        assert [o.token_ids for o in outs] == hf_reference[:3]
        computed_first = e.stats.num_computed_prompt_tokens - before
        out = await e.generate_all(greedy(prompts[3]))
        assert out.token_ids == hf_reference[3]
        assert out.num_cached_tokens >= 32
        computed = e.stats.num_computed_prompt_tokens - before - computed_first
        assert computed == len(prompts[3]) - out.num_cached_tokens
    finally:
        await e.shutdown()


async def test_seeded_sampling_reproducible_across_batches(engine, tokenizer, prompts):
    def sampled(ids, seed, rid):
        params = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.95, seed=seed)
        return GenerateRequest(request_id=rid, token_ids=ids, sampling=params)

    alone = await engine.generate_all(sampled(prompts[1], 1234, "seed-alone"))
    others = [sampled(chat(tokenizer, q), None, f"noise{i}") for i, q in enumerate(OTHERS)]
    others.append(sampled(prompts[2], 99, "noise-seeded"))
    outs = await asyncio.gather(
        *(
            engine.generate_all(r)
            for r in [others[0], sampled(prompts[1], 1234, "seed-b"), *others[1:]]
        )
    )
    assert outs[1].token_ids == alone.token_ids
    other_seed = await engine.generate_all(sampled(prompts[1], 4321, "seed-c"))
    assert other_seed.token_ids != alone.token_ids


async def test_prefix_cache_hit_computes_only_the_tail_and_reports_events(engine):
    bs = engine.block_size
    g = torch.Generator().manual_seed(11)
    prefix = torch.randint(100, 40000, (3 * bs,), generator=g).tolist()
    first = prefix + torch.randint(100, 40000, (7,), generator=g).tolist()
    second = prefix + torch.randint(100, 40000, (9,), generator=g).tolist()
    events: list = []
    engine.set_kv_event_sink(events.extend)
    try:
        base = engine.stats.num_computed_prompt_tokens
        out1 = await engine.generate_all(greedy(first, max_tokens=2))
        assert engine.stats.num_computed_prompt_tokens - base == len(first)
        assert out1.num_cached_tokens == 0
        stored = [h for e in events if isinstance(e, KvStored) for h in e.block_hashes]
        assert stored == block_hashes(first, bs)  # 3 full blocks, in prefix order
        first_event = next(e for e in events if isinstance(e, KvStored))
        assert first_event.parent_hash is None
        assert set(stored) <= set(engine.cached_block_hashes())

        events.clear()
        base = engine.stats.num_computed_prompt_tokens
        out2 = await engine.generate_all(greedy(second, max_tokens=2))
        assert out2.num_cached_tokens == 3 * bs
        assert engine.stats.num_computed_prompt_tokens - base == len(second) - 3 * bs
        assert not [e for e in events if isinstance(e, KvStored)]  # tail block is not full

        events.clear()
        await engine.reset_prefix_cache()
        removed = {h for e in events if isinstance(e, KvRemoved) for h in e.block_hashes}
        assert set(block_hashes(prefix, bs)) <= removed
        assert engine.cached_block_hashes() == []
    finally:
        engine.set_kv_event_sink(None)


async def test_block_exhaustion_preempts_and_stays_exact(smol_dir, tokenizer, prompts):
    # 14 blocks of 16 tokens; 6 requests growing to ~5 blocks each cannot all fit at once.
    e = TorchEngine(smol_dir, num_blocks=14, max_num_seqs=8)
    events: list = []
    e.set_kv_event_sink(events.extend)
    await e.start()
    try:
        reqs = [greedy(chat(tokenizer, q, system=False), 40, ignore_eos=True) for q in QUESTIONS]
        reqs.append(greedy(prompts[0][-40:], 30, ignore_eos=True))
        alone = []
        for i, r in enumerate(reqs):
            alone.append(await e.generate_all(r.model_copy(update={"request_id": f"a{i}"})))
        assert e.stats.num_preemptions == 0
        outs = await asyncio.gather(*(e.generate_all(r) for r in reqs))
        assert e.stats.num_preemptions > 0
        assert all(o.finish_reason == "length" for o in outs)
        assert [o.token_ids for o in outs] == [a.token_ids for a in alone]
        m = e.load_metrics()
        assert m.free_blocks == m.total_blocks == 14 and m.active_sequences == 0
        # Replaying the events gives exactly the engine's reusable hashes.
        live: set[int] = set()
        for ev in events:
            if isinstance(ev, KvStored):
                live.update(ev.block_hashes)
            else:
                assert set(ev.block_hashes) <= live
                live.difference_update(ev.block_hashes)
        assert any(isinstance(ev, KvRemoved) for ev in events)
        assert live == set(e.cached_block_hashes())
    finally:
        await e.shutdown()


async def test_prompt_longer_than_pool_is_rejected(smol_dir):
    e = TorchEngine(smol_dir, num_blocks=4, block_size=16)
    await e.start()
    try:
        assert e.max_model_len == 64
        with pytest.raises(ValueError, match="token_ids"):
            e.generate(greedy(list(range(100, 170))))
        out = await e.generate_all(greedy(list(range(100, 110)), max_tokens=4, ignore_eos=True))
        assert len(out.token_ids) == 4
    finally:
        await e.shutdown()


async def test_logit_bias_steers_greedy_decoding(engine, tokenizer, prompts):
    """OpenAI's logit_bias on the real model: +100 on one token makes greedy decoding emit
    it at every step; -100 on the greedy first token makes it pick another; a row beside
    them in the batch keeps its own tokens."""
    plain = await engine.generate_all(greedy(prompts[0], max_tokens=6))
    banana = tokenizer.encode(" banana")[0]
    away = {plain.token_ids[0]: -100.0}
    forced, pushed_away, beside = await asyncio.gather(
        engine.generate_all(greedy(prompts[0], max_tokens=6, logit_bias={banana: 100.0})),
        engine.generate_all(greedy(prompts[0], max_tokens=6, logit_bias=away)),
        engine.generate_all(greedy(prompts[0], max_tokens=6)),
    )
    assert forced.token_ids == [banana] * 6
    assert pushed_away.token_ids[0] != plain.token_ids[0]
    assert beside.token_ids == plain.token_ids


async def test_min_tokens_keeps_eos_from_ending_a_short_answer(engine, tokenizer):
    """A question the model answers in a few tokens then EOS (ignore_eos off): with
    min_tokens the answer goes on past EOS's place, and EOS appears nowhere before it."""
    ids = chat(tokenizer, "What is the capital of France?", system=False)
    short = await engine.generate_all(greedy(ids, max_tokens=40))
    assert short.finish_reason == "stop" and len(short.token_ids) < 16, short.token_ids
    assert short.token_ids[-1] in engine.eos_token_ids
    longer = await engine.generate_all(greedy(ids, max_tokens=40, min_tokens=16))
    assert len(longer.token_ids) >= 16
    assert not set(longer.token_ids[:16]) & engine.eos_token_ids
    # stop_token_ids (the frontend sends EOS there) wait for min_tokens as well
    stop = short.token_ids[1]
    stopped = await engine.generate_all(greedy(ids, max_tokens=40, stop_token_ids=[stop]))
    assert stopped.token_ids == short.token_ids[:2] and stopped.finish_reason == "stop"
    held = await engine.generate_all(greedy(ids, max_tokens=40, stop_token_ids=[stop],
                                            min_tokens=5))  # fmt: skip
    assert len(held.token_ids) >= 5 and stop not in held.token_ids[:5]
