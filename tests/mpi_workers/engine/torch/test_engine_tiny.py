"""Engine behaviour on a tiny random model: validation, abort, errors, limits, metrics."""

from __future__ import annotations

import asyncio

import pytest
from torch_engines import running_engine

from contract.messages import GenerateRequest, SamplingParams
from mpi_workers.engine.torch.engine import TorchEngine

_counter = iter(range(10**6))


def req(token_ids=None, rid=None, **sampling) -> GenerateRequest:
    sampling.setdefault("temperature", 0.0)
    return GenerateRequest(
        request_id=rid or f"t{next(_counter)}",
        token_ids=list(range(3, 13)) if token_ids is None else token_ids,
        sampling=SamplingParams(**sampling),
    )


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    with running_engine(tiny_llama_dir, block_size=4, num_blocks=32, max_num_seqs=4) as e:
        yield e


async def wait_idle(engine: TorchEngine) -> None:
    for _ in range(200):
        m = engine.load_metrics()
        if m.active_sequences == 0 and m.waiting_sequences == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("engine did not become idle")


@pytest.mark.parametrize(
    ("param", "kwargs"),
    [
        ("token_ids", dict(token_ids=[])),
        ("token_ids", dict(token_ids=[5, 128])),
        ("token_ids", dict(token_ids=[-1])),
        ("token_ids", dict(token_ids=[5] * 128)),  # max_model_len = 32 blocks * 4
        ("max_tokens", dict(max_tokens=0)),
        ("temperature", dict(temperature=-0.5)),
        ("top_p", dict(top_p=0.0)),
        ("top_p", dict(top_p=1.5)),
        ("top_k", dict(top_k=-2)),
        ("min_p", dict(min_p=1.5)),
        ("logprobs", dict(logprobs=21)),
        ("logprobs", dict(logprobs=-1)),
        ("repetition_penalty", dict(repetition_penalty=0.0)),
    ],
)
async def test_bad_input_names_parameter_then_engine_serves(engine, param, kwargs):
    with pytest.raises(ValueError, match=param) as info:
        engine.generate(req(**kwargs))
    assert info.value.param == param
    out = await engine.generate_all(req(max_tokens=3, ignore_eos=True))
    assert out.finish_reason == "length" and len(out.token_ids) == 3


async def test_outputs_stream_with_counts_and_logprobs(engine):
    chunks = [c async for c in engine.generate(req(max_tokens=5, ignore_eos=True, logprobs=3))]
    assert [len(c.token_ids) for c in chunks] == [1] * 5
    assert chunks[-1].finish_reason == "length"
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert chunks[0].num_prompt_tokens == 10
    lp = chunks[0].logprobs[0]
    assert lp.token_id == chunks[0].token_ids[0] and len(lp.top) == 3
    assert lp.top[0].token_id == lp.token_id  # greedy picks the top token


async def test_stop_token_ends_with_stop(engine):
    first = await engine.generate_all(req(max_tokens=4, ignore_eos=True))
    stop = first.token_ids[1]
    out = await engine.generate_all(req(max_tokens=4, ignore_eos=True, stop_token_ids=[stop]))
    assert out.finish_reason == "stop"
    assert out.token_ids == first.token_ids[: first.token_ids.index(stop) + 1]


async def test_max_tokens_is_clamped_to_max_model_len(engine):
    prompt = list(range(3, 123))  # 120 of 128 tokens
    out = await engine.generate_all(req(prompt, max_tokens=50, ignore_eos=True))
    assert out.finish_reason == "length"
    assert len(out.token_ids) == engine.max_model_len - len(prompt)


async def test_abort_frees_blocks(engine):
    await wait_idle(engine)
    total = engine.load_metrics().total_blocks
    request = req(max_tokens=100, ignore_eos=True)
    stream = engine.generate(request)
    first = await stream.__anext__()
    assert first.finish_reason is None
    await engine.abort(request.request_id)
    rest = [c async for c in stream]
    assert rest[-1].finish_reason == "abort"
    m = engine.load_metrics()
    assert m.free_blocks == total and m.active_sequences == 0


async def test_closing_the_generator_aborts_and_frees(engine):
    await wait_idle(engine)
    total = engine.load_metrics().total_blocks
    stream = engine.generate(req(max_tokens=100, ignore_eos=True))
    await stream.__anext__()
    await stream.aclose()
    m = engine.load_metrics()
    assert m.free_blocks == total and m.active_sequences == 0


async def test_failing_step_fails_only_that_request(engine, monkeypatch):
    import mpi_workers.engine.torch.engine as engine_module

    real_plan = engine_module.build_plan

    def flaky(batch):
        if any(s.request_id == "boom" for s in batch.seqs):
            raise RuntimeError("injected fault")
        return real_plan(batch)

    monkeypatch.setattr(engine_module, "build_plan", flaky)
    out = await engine.generate_all(req(rid="boom", max_tokens=3))
    assert out.finish_reason == "error" and "injected fault" in out.error
    ok = await engine.generate_all(req(max_tokens=3, ignore_eos=True))
    assert ok.finish_reason == "length" and len(ok.token_ids) == 3
    assert engine.load_metrics().free_blocks == engine.load_metrics().total_blocks


async def test_duplicate_request_id_is_rejected(engine):
    stream = engine.generate(req(rid="dup", max_tokens=50, ignore_eos=True))
    with pytest.raises(ValueError, match="request_id"):
        engine.generate(req(rid="dup"))
    await stream.aclose()


async def test_many_concurrent_requests_and_metrics(engine):
    reqs = [req(list(range(3, 3 + 5 + i)), max_tokens=6, ignore_eos=True) for i in range(10)]
    outs = await asyncio.gather(*(engine.generate_all(r) for r in reqs))
    assert all(o.finish_reason == "length" and len(o.token_ids) == 6 for o in outs)
    alone = await engine.generate_all(reqs[7].model_copy(update={"request_id": "alone"}))
    assert alone.token_ids == outs[7].token_ids
    m = engine.load_metrics()
    assert m.total_blocks == 32 and m.active_sequences == 0


async def test_choices_of_one_prompt_share_its_prefill(engine):
    """The n choices of one request (seeds seed + i) compute the prompt once between them,
    and sharing it changes no token: each equals the same request run alone."""
    await wait_idle(engine)
    prompt = list(range(40, 58))  # 18 tokens: 4 full blocks of 4 can be shared
    before = engine.stats.num_computed_prompt_tokens
    reqs = [req(prompt, max_tokens=5, ignore_eos=True, temperature=1.0, seed=7 + i)
            for i in range(4)]  # fmt: skip
    outs = await asyncio.gather(*(engine.generate_all(r) for r in reqs))
    assert engine.stats.num_computed_prompt_tokens - before == 18 + 3 * 2
    assert sorted(o.num_cached_tokens for o in outs) == [0, 16, 16, 16]
    assert len({tuple(o.token_ids) for o in outs}) > 1  # different seeds, different samples
    alone = await engine.generate_all(reqs[2].model_copy(update={"request_id": "alone-2"}))
    assert alone.token_ids == outs[2].token_ids


async def test_shutdown_aborts_unfinished(tiny_llama_dir):
    e = TorchEngine(tiny_llama_dir, block_size=4, num_blocks=32)
    await e.start()
    stream = e.generate(req(max_tokens=100, ignore_eos=True))
    await stream.__anext__()
    await e.shutdown()
    rest = [c async for c in stream]
    assert rest[-1].finish_reason == "abort"


async def test_qwen2_engine_greedy_matches_hf(tiny_qwen2_dir):
    import torch
    from transformers import AutoModelForCausalLM

    prompt = list(range(5, 25))
    hf = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = hf.generate(
            torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False
        )[0, len(prompt) :].tolist()
    e = TorchEngine(tiny_qwen2_dir, block_size=4, num_blocks=32)
    await e.start()
    try:
        out = await e.generate_all(req(prompt, max_tokens=12, ignore_eos=True))
        assert out.token_ids == ref
    finally:
        await e.shutdown()
