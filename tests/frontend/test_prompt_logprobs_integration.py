"""`echo` + `logprobs` on /v1/completions as lm-evaluation-harness reads it, through the
real frontend (uvicorn, etcd, nats-server) and the official `openai` client, served by a
real `Worker` running the real SmolLM2 `TorchEngine`; and the 400 naming `echo` from an
engine that declares it cannot (the mocker)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import openai
import pytest
from real_workers import engine_worker, mocker_worker, openai_client

from contract.messages import GenerateRequest, SamplingParams
from frontend.tokenization import TextTokenizer
from mpi_workers.engine.torch.engine import TorchEngine

pytestmark = [pytest.mark.integration, pytest.mark.model]

PROMPTS = ["The capital of France is Paris, and the capital of Spain is", "Once upon a time"]


def torch_worker(fe: Any, model_dir: Path) -> contextlib.AbstractAsyncContextManager[Any]:
    """The real engine behind `fe` (prefill chunks of 8 tokens: prompts span several)."""
    engine = TorchEngine(model_dir, num_blocks=256, max_num_batched_tokens=8, model_name="smol")
    return engine_worker(fe, engine)


async def engine_logprobs(engine: TorchEngine, ids: list[int]) -> list[float]:
    """The prompt logprobs the engine gives directly (the reference for the HTTP answer)."""
    sampling = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
    request = GenerateRequest(request_id=f"ref{len(ids)}", token_ids=ids, sampling=sampling)
    out = await engine.generate_all(request)
    assert out.prompt_logprobs is not None
    return [entry.logprob for entry in out.prompt_logprobs]


def check_choice(
    choice: Any, prompt: str, ids: list[int], completion: str, reference: list[float]
) -> None:
    """One choice as lm-eval reads it: prompt tokens first (the first one's logprob and
    top_logprobs null), then the completion's; offsets over the echoed text."""
    logprobs = choice.logprobs
    assert choice.text == prompt + completion
    generated = len(logprobs.tokens) - len(ids)
    assert generated == (1 if completion else 0)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.token_logprobs[1 : len(ids)] == pytest.approx(reference, abs=1e-4)
    assert all(len(top) == 1 for top in logprobs.top_logprobs[1:])
    assert "".join(logprobs.tokens) == prompt + completion
    assert logprobs.text_offset[0] == 0
    for i in range(1, len(logprobs.tokens)):
        assert logprobs.text_offset[i] == logprobs.text_offset[i - 1] + len(logprobs.tokens[i - 1])
    # greedy: the completion token is the top one at its position
    if completion:
        assert list(logprobs.top_logprobs[-1]) == [logprobs.tokens[-1]]


async def test_echo_logprobs_of_a_batch_as_lm_eval_reads_them(
    make_frontend: Any, model_dir: Path, tokenizer: TextTokenizer
) -> None:
    fe = await make_frontend()
    body = {"model": "smol", "temperature": 0.0, "echo": True, "logprobs": 1}
    ids = [tokenizer.encode(p, add_special_tokens=True) for p in PROMPTS]
    async with torch_worker(fe, model_dir) as engine, openai_client(fe) as client:
        plain = await client.completions.create(
            model="smol", prompt=PROMPTS, max_tokens=1, temperature=0.0
        )
        completions = [c.text for c in plain.choices]
        reference = [await engine_logprobs(engine, i) for i in ids]

        answer = await client.completions.create(prompt=PROMPTS, max_tokens=1, **body)
        assert answer.usage.prompt_tokens == sum(len(i) for i in ids)
        assert answer.usage.completion_tokens == 2
        for k, choice in enumerate(answer.choices):
            assert len(choice.logprobs.tokens) == len(ids[k]) + 1
            check_choice(choice, PROMPTS[k], ids[k], completions[k], reference[k])

        # token-id prompts, streamed: the echo piece carries the prompt's logprobs
        stream = await client.completions.create(prompt=ids, max_tokens=1, stream=True, **body)
        pieces: dict[int, list[Any]] = {0: [], 1: []}
        async for chunk in stream:
            for choice in chunk.choices:
                pieces[choice.index].append(choice)
        for k in range(2):
            first = pieces[k][0]
            assert first.text == PROMPTS[k] and len(first.logprobs.tokens) == len(ids[k])
            assert first.logprobs.token_logprobs[0] is None
            tokens = [t for c in pieces[k] if c.logprobs for t in c.logprobs.tokens]
            offsets = [t for c in pieces[k] if c.logprobs for t in c.logprobs.text_offset]
            assert "".join(c.text for c in pieces[k]) == PROMPTS[k] + completions[k]
            assert len(tokens) == len(ids[k]) + 1
            assert offsets[-1] == len(PROMPTS[k])  # counted over the echoed text
            assert pieces[k][-1].finish_reason == "length"

        # max_tokens 0: the prompt alone (vLLM's answer for lm-eval's loglikelihood)
        for stream_it in (False, True):
            if stream_it:
                events = await client.completions.create(
                    prompt=PROMPTS, max_tokens=0, stream=True, **body
                )
                chosen: dict[int, list[Any]] = {0: [], 1: []}
                async for chunk in events:
                    for choice in chunk.choices:
                        chosen[choice.index].append(choice)
                for k in range(2):
                    assert "".join(c.text for c in chosen[k]) == PROMPTS[k]
                    assert chosen[k][-1].finish_reason == "length"
                continue
            only = await client.completions.create(prompt=PROMPTS, max_tokens=0, **body)
            assert only.usage.completion_tokens == 0
            for k, choice in enumerate(only.choices):
                assert choice.finish_reason == "length"
                check_choice(choice, PROMPTS[k], ids[k], "", reference[k])

        for bad in ({"echo": False}, {"logprobs": None}):  # 0 only for the prompt's logprobs
            with pytest.raises(openai.BadRequestError) as info:
                await client.completions.create(prompt="Hi", max_tokens=0, **{**body, **bad})
            error = info.value.body
            assert isinstance(error, dict) and error["param"] == "max_tokens", error


async def test_an_engine_without_prompt_logprobs_refuses_naming_echo(
    make_frontend: Any, model_dir: Path
) -> None:
    fe = await make_frontend()
    async with mocker_worker(fe, model_dir), openai_client(fe) as client:
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as info:
                await client.completions.create(
                    model="smol", prompt=["Hello", "Hi"], echo=True, logprobs=1,
                    max_tokens=1, stream=stream,
                )  # fmt: skip
            error = info.value.body
            assert isinstance(error, dict) and error["param"] == "echo", error
            assert "mocker" in error["message"] and "logprobs" in error["message"]
        # echo alone is served
        answer = await client.completions.create(
            model="smol", prompt="Hello", echo=True, max_tokens=2
        )
        assert answer.choices[0].text.startswith("Hello")
