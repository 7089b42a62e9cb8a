"""`n` choices through the real frontend (uvicorn, etcd, nats-server) with FAKE workers (and
one real simulated worker, whose choices must differ as sampled ones do): all
choices on one worker, their seeds, the official client's view, aborts of every choice on a
disconnect or a failing choice, per-choice migration, the frontend.max_n cap."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from real_workers import mocker_worker
from test_frontend_integration import CHAT, assert_error, sse_events

pytestmark = pytest.mark.integration


async def test_all_choices_go_to_one_worker_with_seed_plus_index(make_frontend: Any) -> None:
    fe = await make_frontend(router="round_robin")
    first = await fe.add_worker("w-1")
    second = await fe.add_worker("w-2")
    client = openai.AsyncOpenAI(base_url=fe.base_url + "/v1", api_key="unused", max_retries=0)
    async with client:
        for _ in range(2):  # round robin: the second request goes to the other worker
            response = await client.chat.completions.create(
                model="smol", messages=CHAT["messages"], n=4, seed=70, temperature=0.9
            )
            assert [c.index for c in response.choices] == [0, 1, 2, 3]
            assert all(c.finish_reason == "stop" for c in response.choices)
            assert response.usage is not None
            assert response.usage.completion_tokens == 4 * (len(fe.script) + 1)
            assert response.usage.total_tokens == (
                response.usage.prompt_tokens + response.usage.completion_tokens
            )
    for worker in (first, second):
        assert [r.sampling.seed for r in worker.requests] == [70, 71, 72, 73]
        assert [r.choice_index for r in worker.requests] == [0, 1, 2, 3]  # on the wire
        assert len({r.client_id for r in worker.requests}) == 1
        assert len({tuple(r.token_ids) for r in worker.requests}) == 1
    assert first.requests[0].client_id != second.requests[0].client_id


async def test_streamed_completions_with_usage(make_frontend: Any) -> None:
    fe = await make_frontend()
    await fe.add_worker(tokens_per_chunk=2, delay_s=0.001)
    client = openai.AsyncOpenAI(base_url=fe.base_url + "/v1", api_key="unused", max_retries=0)
    async with client:
        stream = await client.completions.create(
            model="smol", prompt="Once", n=3, max_tokens=5, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        texts = {0: "", 1: "", 2: ""}
        finishes: dict[int, str] = {}
        usage = None
        async for chunk in stream:
            for choice in chunk.choices:
                texts[choice.index] += choice.text
                if choice.finish_reason:
                    assert choice.index not in finishes  # one finish per choice
                    finishes[choice.index] = choice.finish_reason
            if chunk.usage is not None:
                usage = chunk.usage
    assert finishes == {0: "length", 1: "length", 2: "length"}
    assert len(set(texts.values())) == 1 and texts[0]
    assert usage is not None and usage.completion_tokens == 15


async def test_a_disconnect_aborts_every_choice(make_frontend: Any) -> None:
    fe = await make_frontend()
    worker = await fe.add_worker(delay_s=0.05, script=list(range(100, 400)))
    async with fe.client() as client:
        body = {"model": "smol", "prompt": "x", "stream": True, "max_tokens": 200, "n": 3}
        async with client.stream("POST", "/v1/completions", json=body) as stream:
            lines = stream.aiter_lines()
            await anext(lines)
    async with asyncio.timeout(5):
        while len(worker.aborted) < 3:
            await asyncio.sleep(0.01)
    assert sorted(worker.aborted) == sorted(r.request_id for r in worker.requests)
    # not streamed: the client gives up while the choices are still generating
    worker.aborted.clear()
    async with fe.client(timeout=0.3) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/v1/completions", json={**body, "stream": False})
    async with asyncio.timeout(5):
        while len(worker.aborted) < 3:
            await asyncio.sleep(0.01)
    assert sorted(worker.aborted) == sorted(r.request_id for r in worker.requests[3:])
    state = fe.app.state.frontend
    async with asyncio.timeout(5):
        while state.client.in_flight:
            await asyncio.sleep(0.01)


async def test_a_failing_choice_fails_the_request_and_aborts_the_others(
    make_frontend: Any,
) -> None:
    fe = await make_frontend()
    worker = await fe.add_worker(delay_s=0.02, error_on_seed=666)
    async with fe.client() as client:
        # choice 2 of seed 664 samples with 666, which this fake refuses: a 400 naming seed
        response = await client.post("/v1/chat/completions", json={**CHAT, "n": 3, "seed": 664})
        assert_error(response, 400, "seed")
        streamed = await client.post(
            "/v1/chat/completions", json={**CHAT, "n": 3, "seed": 664, "stream": True}
        )
        assert_error(streamed, 400, "seed")
    running = {r.request_id for r in worker.requests if r.sampling.seed != 666}
    async with asyncio.timeout(5):
        while not running <= set(worker.aborted):
            await asyncio.sleep(0.01)
    assert fe.app.state.frontend.client.in_flight == 0


async def test_a_lost_worker_moves_each_choice_on(make_frontend: Any) -> None:
    fe = await make_frontend()
    doomed = await fe.add_worker("a-doomed", delay_s=0.05, script=list(range(100, 400)))
    spare = await fe.add_worker("b-spare", delay_s=0.001, register=False)
    async with fe.client() as client:
        body = {"model": "smol", "prompt": "x", "stream": True, "max_tokens": 12, "n": 2,
                "ignore_eos": True}  # fmt: skip
        async with client.stream("POST", "/v1/completions", json=body) as stream:
            events: list[str] = []
            moved = False
            async for line in stream.aiter_lines():
                if line:
                    events.append(line)
                if not moved and len(events) >= 4:  # both choices have tokens
                    moved = True
                    await spare.register()
                    await fe.wait_for_workers(lambda ids: "b-spare" in ids)
                    await doomed.stop()  # leaves the directory: both choices migrate
    parsed = sse_events("\n\n".join(events) + "\n\n")
    assert parsed[-1] == "[DONE]"
    finishes = [c["finish_reason"] for e in parsed[:-1] for c in e["choices"] if c["finish_reason"]]
    assert finishes == ["length", "length"]
    continued = [r for r in spare.requests if len(r.token_ids) > len(doomed.requests[0].token_ids)]
    assert len(continued) == 2  # each choice continued with its own tokens
    assert {r.sampling.max_tokens + len(r.token_ids) for r in continued} == {
        12 + len(doomed.requests[0].token_ids)
    }


async def test_n_over_the_configured_cap_and_the_context_check_are_400s(
    make_frontend: Any,
) -> None:
    fe = await make_frontend(max_n=2)
    worker = await fe.add_worker(max_model_len=64)
    async with fe.client() as client:
        error = assert_error(
            await client.post("/v1/chat/completions", json={**CHAT, "n": 3}), 400, "n"
        )
        assert "frontend.max_n" in error["message"]
        too_long = {**CHAT, "n": 2, "max_tokens": 60}  # each choice's prompt + max_tokens
        assert_error(
            await client.post("/v1/chat/completions", json=too_long), 400, "max_tokens",
            "context_length_exceeded",
        )  # fmt: skip
        assert not worker.requests
        response = await client.post("/v1/chat/completions", json={**CHAT, "n": 2})
        assert response.status_code == 200
    assert len(worker.requests) == 2
    # the budget the context leaves goes to every choice
    room = 64 - len(worker.requests[0].token_ids)
    assert {r.sampling.max_tokens for r in worker.requests} == {room}


async def test_the_mockers_sampled_choices_differ_and_seeded_ones_repeat(
    make_frontend: Any, model_dir: Path
) -> None:
    """A real simulated worker (MockerEngine served by `Worker`) behind the frontend: an
    unseeded n=3 request at temperature > 0 answers three different texts, choice 0 the text
    a single-choice request gets; seeded choices differ and come back the same; greedy ones
    are one text."""
    fe = await make_frontend()
    async with mocker_worker(fe, model_dir):

        async def texts(**body: Any) -> list[str]:
            async with fe.client() as client:
                response = await client.post(
                    "/v1/chat/completions", json={**CHAT, "max_tokens": 8, **body}
                )
            assert response.status_code == 200, response.text
            choices = sorted(response.json()["choices"], key=lambda c: c["index"])
            return [c["message"]["content"] for c in choices]

        sampled = await texts(n=3, temperature=0.9)
        assert len(set(sampled)) == 3 and all(sampled)
        assert await texts(temperature=0.9) == sampled[:1]
        seeded = await texts(n=3, temperature=0.9, seed=11)
        assert len(set(seeded)) == 3
        assert await texts(n=3, temperature=0.9, seed=11) == seeded
        assert len(set(await texts(n=3, temperature=0.0))) == 1
