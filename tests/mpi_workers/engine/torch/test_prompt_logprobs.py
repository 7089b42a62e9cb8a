"""Prompt logprobs (`SamplingParams.prompt_logprobs`) on the real SmolLM2-135M against HF
transformers' `log_softmax(logits)`: a prompt longer than one prefill chunk, its prefix
already in the prefix cache, mixed with requests that want none, and overlapped scheduling.

fp32 on CPU: the logprobs agree to float rounding (tolerance 2e-3 nats).
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from torch_engines import running_engine

from contract.messages import GenerateOutput, GenerateRequest, SamplingParams
from mpi_workers.engine.torch.engine import TorchEngine

pytestmark = pytest.mark.model

TOP = 3
CHUNK = 32  # max_num_batched_tokens: the prompt spans several prefill chunks
TEXT = (
    "The Message Passing Interface lets the ranks of a parallel program exchange data. "
    "A job on a cluster asks the scheduler for nodes, and the launcher starts one rank "
    "per core. Collective operations such as all-reduce combine values from every rank, "
    "while point-to-point sends move a buffer from one rank to another. "
)
_ids = iter(range(10**6))


def request(ids: list[int], prompt_logprobs: int | None = TOP, **kw) -> GenerateRequest:
    kw.setdefault("max_tokens", 4)
    sampling = SamplingParams(temperature=0.0, prompt_logprobs=prompt_logprobs, **kw)
    return GenerateRequest(request_id=f"p{next(_ids)}", token_ids=ids, sampling=sampling)


@pytest.fixture(scope="module")
def prompt(smol_dir) -> list[int]:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(smol_dir)(TEXT)["input_ids"]
    assert len(ids) > 2 * CHUNK
    return list(ids)


@pytest.fixture(scope="module")
def reference(smol_dir, prompt) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HF's (logprob of token i + 1 at position i, top-TOP values, their ids)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        logprobs = model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    del model
    chosen = logprobs[:-1].gather(1, torch.tensor(prompt[1:]).unsqueeze(1)).squeeze(1)
    top = logprobs[:-1].topk(TOP, dim=-1)
    return chosen, top.values, top.indices


@pytest.fixture(scope="module")
def engine(smol_dir):
    with running_engine(smol_dir, num_blocks=256, max_num_seqs=8,
                        max_num_batched_tokens=CHUNK) as e:  # fmt: skip
        yield e


def assert_matches(out: GenerateOutput, prompt: list[int], reference) -> None:
    chosen, top_values, top_ids = reference
    entries = out.prompt_logprobs
    assert entries is not None and len(entries) == len(prompt) - 1
    assert [e.token_id for e in entries] == prompt[1:]
    got = torch.tensor([e.logprob for e in entries])
    assert torch.allclose(got, chosen, atol=2e-3), (got - chosen).abs().max()
    for i, entry in enumerate(entries):
        assert len(entry.top) == TOP
        values = torch.tensor([t.logprob for t in entry.top])
        assert torch.allclose(values, top_values[i], atol=2e-3)
        # ids in order, where the values are not a near tie
        gaps = top_values[i].diff().abs() > 1e-3
        ids = [t.token_id for t in entry.top]
        assert ids[0] == top_ids[i][0] or not gaps[0]
        assert set(ids) == set(top_ids[i].tolist()) or not gaps.all()


async def test_chunked_prompt_logprobs_match_transformers(engine, prompt, reference):
    await engine.reset_prefix_cache()
    before = engine.stats.num_steps
    out = await engine.generate_all(request(prompt))
    assert engine.stats.num_steps - before > len(prompt) // CHUNK  # several prefill chunks
    assert_matches(out, prompt, reference)
    assert len(out.token_ids) == 4 and out.logprobs is None


async def test_cached_prefix_is_recomputed_and_gives_the_same(engine, prompt, reference):
    await engine.reset_prefix_cache()
    plain = await engine.generate_all(request(prompt, prompt_logprobs=None))
    assert plain.prompt_logprobs is None
    again = await engine.generate_all(request(prompt, prompt_logprobs=None))
    assert again.num_cached_tokens >= len(prompt) - CHUNK  # the prefix is cached ...
    computed = engine.stats.num_computed_prompt_tokens
    out = await engine.generate_all(request(prompt))
    # ... yet the request wanting prompt logprobs computes every position
    assert engine.stats.num_computed_prompt_tokens - computed == len(prompt)
    assert out.num_cached_tokens == 0
    assert_matches(out, prompt, reference)
    assert out.token_ids == plain.token_ids


async def test_batched_with_others_and_zero_top(engine, prompt, reference):
    others = [request(prompt[:40], prompt_logprobs=None), request(prompt[5:], None, logprobs=2)]
    outs = await asyncio.gather(
        *(engine.generate_all(r) for r in [others[0], request(prompt, 0), others[1]])
    )
    assert outs[0].prompt_logprobs is None and outs[2].prompt_logprobs is None
    entries = outs[1].prompt_logprobs
    assert entries is not None and all(not e.top for e in entries)
    got = torch.tensor([e.logprob for e in entries])
    assert torch.allclose(got, reference[0], atol=2e-3)


async def test_overlapped_engine_gives_the_same(smol_dir, prompt, reference):
    e = TorchEngine(smol_dir, num_blocks=256, max_num_batched_tokens=CHUNK, overlap=True)
    await e.start()
    try:
        outs = await asyncio.gather(
            e.generate_all(request(prompt[:50], prompt_logprobs=None, max_tokens=20)),
            e.generate_all(request(prompt)),
        )
        assert_matches(outs[1], prompt, reference)
    finally:
        await e.shutdown()


async def test_one_token_prompt_has_no_prompt_logprobs(engine):
    out = await engine.generate_all(request([42]))
    assert out.prompt_logprobs == [] and len(out.token_ids) == 4
