"""A batch of prompts on /v1/completions, `echo`, and `GET /v1/models/{model}`, through the
real frontend (uvicorn, etcd, nats-server) with the official `openai` client: against a real
simulated worker (MockerEngine served by `Worker`, whose tokens depend on the prompt) each
batch choice is what its prompt alone gives; against FAKE workers, per-prompt routing, the
refusals before anything is routed, the choice cap, aborts and migration of every choice."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import openai
import pytest
from real_workers import mocker_worker, openai_client
from test_frontend_integration import assert_error, sse_events

from frontend.tokenization import TextTokenizer

pytestmark = pytest.mark.integration

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):"]


def counts(usage: Any) -> tuple[int, int, int]:
    """Usage without its cached tokens (the prefix cache warms up between requests)."""
    return usage.prompt_tokens, usage.completion_tokens, usage.total_tokens


async def streamed(client: openai.AsyncOpenAI, **body: Any) -> tuple[dict[int, list[str]], Any]:
    """Each choice index's text pieces, in order, and the usage chunk's usage."""
    stream = await client.completions.create(
        stream=True, stream_options={"include_usage": True}, **body
    )
    pieces: dict[int, list[str]] = {}
    finishes: dict[int, str] = {}
    usage = None
    async for chunk in stream:
        for choice in chunk.choices:
            pieces.setdefault(choice.index, []).append(choice.text)
            if choice.finish_reason:
                assert choice.index not in finishes  # one finish per choice
                finishes[choice.index] = choice.finish_reason
        if chunk.usage is not None:
            usage = chunk.usage
    assert set(finishes) == set(pieces)
    return pieces, usage


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 0.9, "seed": 7}])
async def test_a_batch_answers_each_prompt_as_it_alone_would(
    make_frontend: Any, model_dir: Path, tokenizer: TextTokenizer, sampling: dict[str, Any]
) -> None:
    """3 text prompts x n=2 (greedy, and seeded sampling: choice j of prompt i samples as
    choice j of that prompt's own request), streamed and not, and the same as token ids:
    6 choices, index = prompt * 2 + choice, each one's text the one its prompt's own
    request gives, usage the sum of those requests'."""
    fe = await make_frontend()
    body = {"model": "smol", "max_tokens": 8, "n": 2, **sampling}
    async with mocker_worker(fe, model_dir), openai_client(fe) as client:
        alone = [await client.completions.create(prompt=p, **body) for p in PROMPTS]
        expected = [c.text for r in alone for c in sorted(r.choices, key=lambda c: c.index)]
        assert all(expected)
        if sampling["temperature"]:
            assert expected[0] != expected[1]  # the two choices of a prompt differ
        assert len(set(expected[::2])) == 3  # the prompts' texts differ
        summed = tuple(sum(parts) for parts in zip(*(counts(r.usage) for r in alone), strict=True))

        batch = await client.completions.create(prompt=PROMPTS, **body)
        assert [c.index for c in batch.choices] == [0, 1, 2, 3, 4, 5]
        assert [c.text for c in batch.choices] == expected
        assert counts(batch.usage) == summed

        pieces, usage = await streamed(client, prompt=PROMPTS, **body)
        assert sorted(pieces) == [0, 1, 2, 3, 4, 5]
        assert ["".join(pieces[i]) for i in range(6)] == expected
        assert counts(usage) == summed

        ids = [tokenizer.encode(p) for p in PROMPTS]
        by_ids = await client.completions.create(prompt=ids, **body)
        assert [c.text for c in by_ids.choices] == expected
        assert counts(by_ids.usage) == summed


async def test_each_prompt_is_routed_on_its_own_under_one_client_id(make_frontend: Any) -> None:
    """Round robin over two workers: each prompt's first choice is routed by itself (one
    prompt per worker), its other choice follows it there; every engine request carries
    the response's id, and its choice index within its prompt."""
    fe = await make_frontend(router="round_robin")
    first = await fe.add_worker("w-1")
    second = await fe.add_worker("w-2")
    async with fe.client() as client:
        body = {"model": "smol", "prompt": [[11, 12, 13], [21, 22]], "n": 2, "max_tokens": 4}
        response = await client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2, 3]
    assert response.headers["x-request-id"] == answer["id"]
    prompts = set()
    for worker in (first, second):
        assert [r.choice_index for r in worker.requests] == [0, 1]
        assert len({tuple(r.token_ids) for r in worker.requests}) == 1
        prompts.add(tuple(worker.requests[0].token_ids))
        assert {r.client_id for r in worker.requests} == {answer["id"]}
    assert prompts == {(11, 12, 13), (21, 22)}
    assert answer["usage"]["prompt_tokens"] == 5  # each prompt once


async def test_a_bad_prompt_in_a_batch_is_refused_by_position_before_routing(
    make_frontend: Any,
) -> None:
    fe = await make_frontend()
    worker = await fe.add_worker(max_model_len=64)
    async with fe.client() as client:
        cases: list[tuple[Any, dict[str, Any], str, str | None]] = [
            ([[1, 2], [5] * 64, [3]], {}, "prompt.1", "context_length_exceeded"),
            (["short", "x " * 200, "short"], {}, "prompt.1", "context_length_exceeded"),
            ([[1, 2], [3] * 40], {"max_tokens": 30}, "max_tokens", "context_length_exceeded"),
            ([[1, 2], [3], [10**9]], {}, "prompt.2", None),
            ([[1, 2], []], {}, "prompt.1", None),
        ]
        for prompt, extra, param, code in cases:
            for stream in (False, True):
                body = {"model": "smol", "prompt": prompt, "n": 2, "stream": stream, **extra}
                assert_error(await client.post("/v1/completions", json=body), 400, param, code)
    assert not worker.requests  # not even the good prompts before the bad one
    state = fe.app.state.frontend
    assert state.client.in_flight == 0 and state.tracker.requests_on(worker.worker_id) == 0


async def test_a_batch_sent_before_any_worker_is_checked_whole_before_anything_is_sent(
    make_frontend: Any,
) -> None:
    """No worker to check the context against when the batch arrives: it waits for one
    (frontend.no_worker_timeout_s); the first prompt's routing then checks every prompt, so
    a too-long prompt 1 is refused before prompt 0 is sent."""
    fe = await make_frontend(no_worker_timeout_s=10)
    state = fe.app.state.frontend
    async with fe.client() as client:
        body = {"model": "smol", "prompt": [[1, 2], [5] * 64], "n": 2}
        pending = asyncio.create_task(client.post("/v1/completions", json=body))
        async with asyncio.timeout(5):
            while not state.metrics.in_flight._value.get():
                await asyncio.sleep(0.01)
        worker = await fe.add_worker(max_model_len=64)
        assert_error(await pending, 400, "prompt.1", "context_length_exceeded")
        # a request sent after it: its engine requests come after any the refused one sent
        good = await client.post("/v1/completions", json={**body, "prompt": [[1, 2], [3]]})
        assert good.status_code == 200, good.text
    assert {r.client_id for r in worker.requests} == {good.json()["id"]}
    assert state.client.in_flight == 0


async def test_the_choice_cap_counts_prompts_times_n(make_frontend: Any) -> None:
    fe = await make_frontend(max_n=2, max_choices_per_request=4)
    worker = await fe.add_worker()
    async with fe.client() as client:
        over = {"model": "smol", "prompt": ["a", "b", "c"], "n": 2}
        error = assert_error(await client.post("/v1/completions", json=over), 400, "prompt")
        assert "frontend.max_choices_per_request" in error["message"]
        error = assert_error(
            await client.post("/v1/completions", json={**over, "prompt": "a", "n": 3}), 400, "n"
        )
        assert "frontend.max_n" in error["message"]
        assert not worker.requests
        response = await client.post("/v1/completions", json={**over, "prompt": ["a", "b"]})
        assert response.status_code == 200, response.text
        assert len(response.json()["choices"]) == 4


async def test_echo_puts_each_prompt_before_its_completion(
    make_frontend: Any, tokenizer: TextTokenizer
) -> None:
    fe = await make_frontend()
    await fe.add_worker(tokens_per_chunk=3)
    body = {"model": "smol", "max_tokens": 6, "extra_body": {"ignore_eos": True}}
    async with openai_client(fe) as client:
        plain = (await client.completions.create(prompt="Hello", **body)).choices[0].text
        assert plain
        echoed = await client.completions.create(prompt="Hello", echo=True, **body)
        assert echoed.choices[0].text == "Hello" + plain
        assert counts(echoed.usage) == counts(
            (await client.completions.create(prompt="Hello", **body)).usage
        )  # the prompt is not counted as completion tokens
        pieces, _ = await streamed(client, prompt="Hello", echo=True, **body)
        assert pieces[0][0] == "Hello" and "".join(pieces[0]) == "Hello" + plain

        texts = ["Hi", "Good morning"]
        ids = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
        for batch in (texts, ids):  # token ids echo as their text
            echoed = await client.completions.create(prompt=batch, echo=True, n=2, **body)
            wanted = [text + plain for text in texts for _ in range(2)]
            assert [c.text for c in echoed.choices] == wanted
            pieces, _ = await streamed(client, prompt=batch, echo=True, n=2, **body)
            assert [pieces[i][0] for i in range(4)] == ["Hi", "Hi", "Good morning", "Good morning"]
            assert ["".join(pieces[i]) for i in range(4)] == wanted


    # echo + logprobs asks for the prompt's logprobs: a worker declaring it cannot is refused
    fe = await make_frontend()
    await fe.add_worker(unsupported_params=["prompt_logprobs"])
    async with openai_client(fe) as client:
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as info:
                await client.completions.create(
                    prompt="Hello", echo=True, logprobs=1, stream=stream, **body
                )
            error = info.value.body
            assert isinstance(error, dict) and error["param"] == "echo", error
            assert "logprobs" in error["message"]


async def test_models_retrieve_gives_the_served_card_and_404_for_another(
    make_frontend: Any,
) -> None:
    for served in ("smol", "org/smol-135m"):  # a name with a slash, as hub ids are
        fe = await make_frontend(served_name=served)
        await fe.add_worker(max_model_len=512)
        async with openai_client(fe) as client:
            listed = (await client.models.list()).data
            card = await client.models.retrieve(served)
            assert [card.model_dump()] == [m.model_dump() for m in listed]
            assert card.id == served and card.model_dump()["max_model_len"] == 512
            with pytest.raises(openai.NotFoundError) as info:
                await client.models.retrieve("gpt-9")
        error = info.value.body
        assert isinstance(error, dict)
        assert (error["type"], error["code"], error["param"]) == (
            "invalid_request_error", "model_not_found", "model",
        )  # fmt: skip


async def test_the_openapi_document_tells_of_batches_echo_and_one_model(
    make_frontend: Any,
) -> None:
    fe = await make_frontend()
    async with fe.client() as client:
        schema = (await client.get("/openapi.json")).json()
    fields = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert "batch" in fields["prompt"]["description"]
    assert "prompt_i * n + j" in fields["prompt"]["description"]
    assert "logprobs" in fields["echo"]["description"]
    one = schema["paths"]["/v1/models/{model}"]["get"]
    assert one["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ModelCard"
    )
    assert "404" in one["responses"]


async def test_a_disconnect_aborts_every_choice_of_every_prompt(make_frontend: Any) -> None:
    fe = await make_frontend()
    worker = await fe.add_worker(delay_s=0.05, script=list(range(100, 400)))
    async with fe.client() as client:
        body = {"model": "smol", "prompt": ["x", "y", "z"], "stream": True, "max_tokens": 200,
                "n": 2}  # fmt: skip
        async with client.stream("POST", "/v1/completions", json=body) as stream:
            await anext(stream.aiter_lines())
    async with asyncio.timeout(5):
        while len(worker.aborted) < 6:
            await asyncio.sleep(0.01)
    assert sorted(worker.aborted) == sorted(r.request_id for r in worker.requests)
    state = fe.app.state.frontend
    async with asyncio.timeout(5):
        while state.client.in_flight or state.tracker.requests_on(worker.worker_id):
            await asyncio.sleep(0.01)


async def test_a_lost_worker_moves_each_choice_of_each_prompt_on(make_frontend: Any) -> None:
    fe = await make_frontend()
    doomed = await fe.add_worker("a-doomed", delay_s=0.05, script=list(range(100, 400)))
    spare = await fe.add_worker("b-spare", delay_s=0.001, register=False)
    prompts = [[5, 6, 7], [8, 9]]
    async with fe.client() as client:
        body = {"model": "smol", "prompt": prompts, "stream": True, "max_tokens": 12, "n": 2,
                "ignore_eos": True}  # fmt: skip
        async with client.stream("POST", "/v1/completions", json=body) as stream:
            events: list[str] = []
            moved = False
            async for line in stream.aiter_lines():
                if line:
                    events.append(line)
                if not moved and len(events) >= 8:  # every choice has tokens, or nearly
                    moved = True
                    await spare.register()
                    await fe.wait_for_workers(lambda ids: "b-spare" in ids)
                    await doomed.stop()  # leaves the directory: every choice migrates
    parsed = sse_events("\n\n".join(events) + "\n\n")
    assert parsed[-1] == "[DONE]"
    finishes = {c["index"]: c["finish_reason"] for e in parsed[:-1] for c in e["choices"]
                if c["finish_reason"]}  # fmt: skip
    assert finishes == {0: "length", 1: "length", 2: "length", 3: "length"}
    assert len(doomed.requests) == 4
    # each choice continued its own prompt on the spare, with the budget its prompt left
    continued = []
    for request in spare.requests:
        prompt = next(p for p in prompts if request.token_ids[: len(p)] == p)
        assert len(request.token_ids) > len(prompt)  # prompt + the tokens so far
        assert request.sampling.max_tokens + len(request.token_ids) == 12 + len(prompt)
        continued.append(tuple(prompt))
    assert sorted(continued) == [(5, 6, 7), (5, 6, 7), (8, 9), (8, 9)]
