"""/v1/responses with `background: true` against real etcd and nats-server and FAKE workers
(scripted answers at a set pace): polled to its end, cancelled (the worker's request
aborted), streamed and re-attached, across two frontend processes of one deployment, and a
frontend process killed while it runs one. The official openai client where it has the
call."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from real_workers import openai_client
from test_frontend_integration import assert_error
from test_responses_api_integration import sse_typed

from contract.readiness import free_port
from tests.frontend.conftest import FrontendHarness, server_port, start_frontend

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
LONG = {"script": list(range(100, 400)), "delay_s": 0.02}  # ~6 s to its 300 tokens
ASK = {"model": "smol", "input": "Say hello", "temperature": 0}


async def poll(client: openai.AsyncOpenAI, response_id: str, until: set[str]) -> Any:
    """The response once its status is one of `until` (10 s at most)."""
    async with asyncio.timeout(10):
        while True:
            response = await client.responses.retrieve(response_id)
            if response.status in until:
                return response
            await asyncio.sleep(0.02)


async def wait_for(condition: Any, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def second_process(fe: FrontendHarness) -> AsyncIterator[openai.AsyncOpenAI]:
    """Another frontend of `fe`'s deployment (its own NATS connection, store client and
    id, as a process of frontend.workers has), and an openai client of it."""
    server, task, _ = await start_frontend(fe.config)
    base = f"http://127.0.0.1:{server_port(server)}/v1"
    client = openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0)
    try:
        yield client
    finally:
        await client.close()
        server.should_exit = True
        await task


async def test_a_background_response_is_polled_to_the_foreground_answer(
    make_frontend: Any,
) -> None:
    """Queued at once, then completed with the output and usage a foreground request
    gets (greedy); cancelling it then returns it unchanged; a client that leaves a
    background stream stops nothing. Bad input is a 4xx naming the field."""
    fe = await make_frontend()
    worker = await fe.add_worker(delay_s=0.01)
    async with openai_client(fe) as client:
        foreground = await client.responses.create(**ASK)
        queued = await client.responses.create(background=True, **ASK)
        assert queued.status == "queued" and queued.background is True and queued.store
        assert queued.output == [] and queued.usage is None
        done = await poll(client, queued.id, {"completed", "failed", "incomplete"})
        assert done.status == "completed" and done.background is True
        assert done.output_text == foreground.output_text and done.output_text
        assert done.usage.output_tokens == foreground.usage.output_tokens
        again = await client.responses.cancel(queued.id)  # idempotent: as it was
        assert again.status == "completed" and again.output_text == done.output_text
        with pytest.raises(openai.BadRequestError) as caught:
            await client.responses.cancel(foreground.id)
        assert caught.value.body["param"] == "response_id"
        assert "only background responses" in caught.value.body["message"]
        with pytest.raises(openai.NotFoundError):
            await client.responses.cancel("resp_" + "0" * 32)
        with pytest.raises(openai.BadRequestError) as caught:
            await client.responses.create(background=True, store=False, **ASK)
        assert caught.value.body["param"] == "store"
    async with fe.client() as http:  # a streamed one whose client leaves at once
        body = {**ASK, "background": True, "stream": True}
        async with http.stream("POST", "/v1/responses", json=body) as stream:
            first = await anext(stream.aiter_lines())
        assert first == "event: response.created"
        response_id = stream.headers["x-request-id"]
        not_int = await http.get(f"/v1/responses/{queued.id}",
                                 params={"stream": "true", "starting_after": "x"})  # fmt: skip
        assert_error(not_int, 400, "starting_after")
        not_streamed = await http.get(f"/v1/responses/{queued.id}", params={"stream": "true"})
        assert_error(not_streamed, 400, "stream")
    async with openai_client(fe) as client:
        left = await poll(client, response_id, {"completed", "failed", "cancelled"})
    assert left.status == "completed" and left.output_text == foreground.output_text
    assert not worker.aborted


async def test_cancel_stops_the_generation_and_the_limit_answers_429(make_frontend: Any) -> None:
    """Cancelled mid-generation: status cancelled with the text so far, the worker's
    request aborted, nothing left in flight. With frontend.max_background_responses 1, a
    second background request meanwhile is a 429."""
    fe = await make_frontend(max_background_responses=1)
    worker = await fe.add_worker(**LONG)
    state = fe.app.state.frontend
    async with openai_client(fe) as client:
        running = await client.responses.create(background=True, max_output_tokens=250, **ASK)
        await poll(client, running.id, {"in_progress"})
        with pytest.raises(openai.RateLimitError) as caught:
            await client.responses.create(background=True, **ASK)
        assert caught.value.body["param"] == "background"
        assert caught.value.body["code"] == "rate_limit_exceeded"
        await wait_for(lambda: len(worker.requests) == 1)
        cancelled = await client.responses.cancel(running.id)
        assert cancelled.status == "cancelled" and cancelled.id == running.id
        assert (await client.responses.retrieve(running.id)).status == "cancelled"
        await wait_for(lambda: worker.aborted == [worker.requests[0].request_id])
        await wait_for(lambda: not state.client.in_flight)
        assert not state.tracker.requests_on(worker.worker_id)
        again = await client.responses.create(background=True, max_output_tokens=2, **ASK)
        assert (await poll(client, again.id, {"incomplete"})).output[0].status == "incomplete"
    lines = {'hpcserve_frontend_background_responses_ended_total{status="cancelled"} 1.0',
             'hpcserve_frontend_background_responses_ended_total{status="incomplete"} 1.0',
             "hpcserve_frontend_background_responses 0.0"}  # fmt: skip
    async with fe.client() as http, asyncio.timeout(5):  # counted just after the record
        while not lines <= set((await http.get("/metrics")).text.splitlines()):
            await asyncio.sleep(0.01)


async def test_two_processes_share_status_cancel_and_events(make_frontend: Any) -> None:
    """A background response made on one process is read and cancelled through the other
    (which asks the owner over NATS); a streamed one's events are re-attached with
    starting_after on the owner and, relayed, on the other: the parts add up to the
    whole stream."""
    fe = await make_frontend()
    worker = await fe.add_worker(**LONG)
    async with openai_client(fe) as owner, second_process(fe) as other:
        running = await owner.responses.create(background=True, **ASK)
        await poll(other, running.id, {"in_progress"})
        cancelled = await other.responses.cancel(running.id)
        assert cancelled.status == "cancelled"
        assert (await owner.responses.retrieve(running.id)).status == "cancelled"
        await wait_for(lambda: worker.aborted == [worker.requests[0].request_id])

        worker.behaviour.delay_s = 0.005
        ask = {**ASK, "background": True, "stream": True, "max_output_tokens": 40}
        head: list[Any] = []
        async with await owner.responses.create(**ask) as stream:
            async for event in stream:
                head.append(event)
                if event.type == "response.output_text.delta":
                    break
        response_id = head[0].response.id
        cut = head[-1].sequence_number
        here = [e async for e in await owner.responses.retrieve(
            response_id, stream=True, starting_after=cut)]  # fmt: skip
        there = [e async for e in await other.responses.retrieve(
            response_id, stream=True, starting_after=cut)]  # fmt: skip
        whole = [e async for e in await other.responses.retrieve(response_id, stream=True)]
    numbers = [e.sequence_number for e in whole]
    assert numbers == list(range(len(whole))) and whole[-1].type == "response.incomplete"
    assert [e.sequence_number for e in head + here] == numbers
    assert [e.model_dump() for e in there] == [e.model_dump() for e in here]
    text = "".join(e.delta for e in whole if e.type == "response.output_text.delta")
    assert text == whole[-1].response.output_text and whole[-1].response.usage.output_tokens == 40


async def test_a_killed_owner_leaves_its_response_failed_not_in_progress(
    make_frontend: Any, tmp_path: Path
) -> None:
    """The frontend process running a background response is SIGKILLed: within
    frontend.background_owner_ttl_s a GET through another process says failed, naming
    the process's end; a process stopped in order writes its runs failed itself."""
    fe = await make_frontend(background_owner_ttl_s=2)
    await fe.add_worker(**LONG)
    port = free_port()
    config = fe.config.model_dump(mode="json")
    config["frontend"]["port"] = port
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    child = subprocess.Popen(
        [sys.executable, "-m", "frontend", "--config", str(path), "--log-level", "warning"],
        cwd=REPO, start_new_session=True,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, timeout=5) as http:
            async with asyncio.timeout(60):
                while True:
                    with contextlib.suppress(httpx.TransportError):
                        if (await http.get("/health")).status_code == 200:
                            break
                    await asyncio.sleep(0.1)
            made = await http.post("/v1/responses", json={**ASK, "background": True})
            assert made.status_code == 200, made.text
            response_id = made.json()["id"]
        async with openai_client(fe) as client:
            await poll(client, response_id, {"in_progress"})
            os.kill(child.pid, signal.SIGKILL)
            child.wait(10)
            failed = await poll(client, response_id, {"failed", "completed"})
            assert failed.status == "failed" and "ended" in failed.error.message
            assert (await client.responses.cancel(response_id)).status == "failed"
            with pytest.raises(openai.BadRequestError) as caught:
                await client.responses.retrieve(response_id, stream=True)
            assert caught.value.body["param"] == "stream"

            async with second_process(fe) as other:  # stopped in order, running one
                stopping = await other.responses.create(background=True, **ASK)
                await poll(other, stopping.id, {"in_progress"})
            stopped = await client.responses.retrieve(stopping.id)
        assert stopped.status == "failed" and "stopped" in stopped.error.message
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(10)


async def test_a_stream_event_carries_the_background_flag(make_frontend: Any) -> None:
    """The raw SSE of a background stream: typed events numbered from 0, the response
    object saying background true, and the record stored as the stream's end says, also
    when the whole answer came in the worker's first chunk (the in_progress write, queued
    at the first event, lands before the end's)."""
    fe = await make_frontend()
    await fe.add_worker(tokens_per_chunk=100)
    runs = fe.app.state.frontend.background._runs
    async with fe.client() as http:  # the record itself: this process would show its run's end
        body = {**ASK, "background": True, "stream": True}
        events = sse_typed((await http.post("/v1/responses", json=body)).text)
        kind, last = events[-1]
        assert kind == "response.completed"
        assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
        assert events[0][1]["response"]["background"] is True
        response_id = last["response"]["id"]
        await wait_for(lambda: runs[response_id].done)  # its writes are all done
    stored = (await fe.app.state.frontend.response_store.get(response_id))["response"]
    assert stored["status"] == "completed" and stored["output"] == last["response"]["output"]


async def test_without_a_worker_it_waits_queued_then_fails(make_frontend: Any) -> None:
    """No worker: a background response waits (queued) up to frontend.no_worker_timeout_s;
    cancelled meanwhile, it is cancelled; left alone, it ends failed with the 503's
    code, and its stream (re-attached) ends with response.failed."""
    fe = await make_frontend(no_worker_timeout_s=1)
    async with openai_client(fe) as client:
        waiting = await client.responses.create(background=True, **ASK)
        cancelled = await client.responses.cancel(waiting.id)
        assert cancelled.status == "cancelled" and cancelled.output == []
        streamed = await client.responses.create(background=True, stream=True, **ASK)
        events = [event async for event in streamed]
        failed = await client.responses.retrieve(events[-1].response.id)
    assert [event.type for event in events] == ["response.failed"]
    assert failed.status == "failed" and failed.error.code == "no_worker_available"
