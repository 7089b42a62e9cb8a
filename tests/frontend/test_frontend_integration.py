"""The frontend against real etcd and nats-server, with FAKE workers (no engine)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pytest

from contract.bus import load_metrics_subject
from contract.messages import LoadMetrics
from frontend.openai_schemas import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionResponse,
)

pytestmark = pytest.mark.integration

CHAT = {"model": "smol", "messages": [{"role": "user", "content": "Say hello"}]}


def sse_events(body: str) -> list[Any]:
    events = []
    for block in body.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def assert_error(response: httpx.Response, status: int, param: str | None, code: str | None = None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


async def test_health_live_models_before_and_after_worker(make_frontend: Any) -> None:
    fe = await make_frontend()
    async with fe.client() as client:
        assert (await client.get("/live")).status_code == 200
        response = await client.get("/health")
        assert response.status_code == 503
        await fe.add_worker()
        response = await client.get("/health")
        assert response.status_code == 200 and response.json()["workers"] == 1
        models = (await client.get("/v1/models")).json()
        assert models["object"] == "list" and models["data"][0]["id"] == "smol"


async def test_health_lists_each_workers_in_flight_requests(make_frontend: Any) -> None:
    """Also with one frontend process: which worker serves requests now (the load it routes
    by; the migration tests kill a worker that still serves streams by it)."""
    fe = await make_frontend()
    busy = await fe.add_worker("a-busy", silent=True)
    async with fe.client() as client:
        assert (await client.get("/health")).json()["in_flight"] == {"a-busy": 0}
        pending = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
        async with asyncio.timeout(5):
            await busy.received.wait()
        await fe.add_worker("b-idle")
        assert (await client.get("/health")).json()["in_flight"] == {"a-busy": 1, "b-idle": 0}
        await busy.deregister()  # the request moves on to b-idle and is answered there
        assert (await pending).status_code == 200
        assert (await client.get("/health")).json()["in_flight"] == {"b-idle": 0}


async def test_the_client_visible_id_reaches_the_worker(make_frontend: Any) -> None:
    fe = await make_frontend()
    worker = await fe.add_worker()
    async with fe.client() as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
        streamed = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    body = response.json()
    assert response.headers["x-request-id"] == body["id"]
    assert streamed.headers["x-request-id"].startswith("chatcmpl-")
    assert [r.client_id for r in worker.requests] == [
        body["id"], streamed.headers["x-request-id"],
    ]  # fmt: skip
    assert all(r.request_id != r.client_id for r in worker.requests)  # the attempt's own id


async def test_openapi_documents_every_endpoint(make_frontend: Any) -> None:
    fe = await make_frontend()
    async with fe.client() as client:
        schema = (await client.get("/openapi.json")).json()
        docs = await client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert sorted(schema["paths"]) == [
        "/health", "/live", "/metrics", "/v1/chat/completions", "/v1/completions",
        "/v1/embeddings", "/v1/models", "/v1/models/{model}", "/v1/responses",
        "/v1/responses/{response_id}", "/v1/responses/{response_id}/cancel",
        "/v1/responses/{response_id}/input_items",
    ]  # fmt: skip
    served = {getattr(route, "path_format", None) for route in fe.app.routes}
    assert set(schema["paths"]) <= served  # documented routes are served, at those paths
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    body = chat["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert body.endswith("/ChatCompletionRequest")
    ok = chat["responses"]["200"]["content"]
    assert ok["application/json"]["schema"]["$ref"].endswith("/ChatCompletionResponse")
    assert "text/event-stream" in ok
    assert chat["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ErrorResponse"
    )
    assert "422" not in chat["responses"]  # bad input is a 400 in OpenAI's shape
    fields = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"messages", "max_tokens", "temperature", "stream", "logprobs", "n"} <= set(fields)
    assert "seed + i" in fields["n"]["description"]
    completion = schema["paths"]["/v1/completions"]["post"]["responses"]["200"]
    assert completion["content"]["application/json"]["schema"]["$ref"].endswith(
        "/CompletionResponse"
    )


async def test_openai_client_stream_and_non_stream_agree(make_frontend: Any) -> None:
    fe = await make_frontend()
    await fe.add_worker(tokens_per_chunk=2)
    expected = "Hello there! 😀 世界 is 'world'. STOP here, then more text follows."
    client = openai.AsyncOpenAI(base_url=fe.base_url + "/v1", api_key="unused", max_retries=0)
    async with client:
        full = await client.chat.completions.create(
            model="smol", messages=[{"role": "user", "content": "hi"}]
        )
        assert full.id.startswith("chatcmpl-")
        assert full.choices[0].message.content == expected
        assert full.choices[0].finish_reason == "stop"
        assert full.usage is not None and full.usage.completion_tokens == len(fe.script) + 1
        assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

        stream = await client.chat.completions.create(
            model="smol",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces, finish, usage, roles = [], None, None, []
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.role:
                    roles.append(choice.delta.role)
                if choice.delta.content:
                    pieces.append(choice.delta.content)
                    assert "\ufffd" not in choice.delta.content
                finish = choice.finish_reason or finish
        assert "".join(pieces) == expected
        assert roles == ["assistant"] and finish == "stop"
        assert usage is not None and usage.completion_tokens == full.usage.completion_tokens

        completion = await client.completions.create(model="smol", prompt="Once", max_tokens=5)
        assert completion.choices[0].finish_reason == "length"
        assert completion.usage is not None and completion.usage.completion_tokens == 5
        streamed = await client.completions.create(
            model="smol", prompt="Once", max_tokens=5, stream=True
        )
        text = "".join([chunk.choices[0].text async for chunk in streamed if chunk.choices])
        assert text == completion.choices[0].text


async def test_raw_shapes_logprobs_and_simulated(make_frontend: Any) -> None:
    fe = await make_frontend()
    await fe.add_worker(simulated=True)
    async with fe.client() as client:
        body = {**CHAT, "logprobs": True, "top_logprobs": 2, "max_tokens": 4}
        response = await client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        data = response.json()
        ChatCompletionResponse.model_validate(data)
        assert data["simulated"] is True
        content = data["choices"][0]["logprobs"]["content"]
        assert len(content) == 4 and len(content[0]["top_logprobs"]) == 2
        assert (
            bytes(b for entry in content for b in entry["bytes"]).decode(errors="replace")
            == (data["choices"][0]["message"]["content"])
        )

        response = await client.post("/v1/chat/completions", json={**body, "stream": True})
        events = sse_events(response.text)
        assert events[-1] == "[DONE]"
        for event in events[:-1]:
            ChatCompletionChunk.model_validate(event)
            assert event["simulated"] is True
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"
        assert events[-2]["choices"][0]["finish_reason"] == "length"

        response = await client.post(
            "/v1/completions",
            json={"model": "smol", "prompt": [1, 2, 3], "logprobs": 1, "max_tokens": 3},
        )
        data = response.json()
        CompletionResponse.model_validate(data)
        logprobs = data["choices"][0]["logprobs"]
        assert len(logprobs["tokens"]) == 3 and logprobs["text_offset"][0] == 0
        assert data["usage"]["prompt_tokens"] == 3


async def test_a_parameter_the_engine_lacks_is_refused_naming_it(make_frontend: Any) -> None:
    """An engine declares what it cannot do in its card (the mocker: logprobs); the frontend
    answers 400 naming the parameter instead of silently dropping it."""
    fe = await make_frontend()
    worker = await fe.add_worker(unsupported_params=["logprobs"])
    async with fe.client() as client:
        for body in (
            {**CHAT, "logprobs": True, "max_tokens": 2},
            {"model": "smol", "prompt": "hi", "logprobs": 1, "max_tokens": 2},
        ):
            path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            response = await client.post(path, json=body)
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["param"] == "logprobs" and "fake engine" in error["message"]
        assert not worker.requests
        response = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2})
        assert response.status_code == 200, response.text
        # a second worker that has logprobs takes such requests; the first one is skipped
        await fe.add_worker()
        body = {**CHAT, "logprobs": True, "max_tokens": 2}
        for _ in range(3):
            response = await client.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
        assert len(worker.requests) == 1


async def test_stop_string_truncates_and_aborts(make_frontend: Any) -> None:
    fe = await make_frontend()
    worker = await fe.add_worker(delay_s=0.002)
    async with fe.client() as client:
        for stream in (False, True):
            worker.abort_received.clear()
            body = {**CHAT, "stop": [" STOP", "never"], "stream": stream}
            response = await client.post("/v1/chat/completions", json=body)
            assert response.status_code == 200
            if stream:
                events = sse_events(response.text)[:-1]
                text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
                finish = events[-1]["choices"][0]["finish_reason"]
            else:
                choice = response.json()["choices"][0]
                text, finish = choice["message"]["content"], choice["finish_reason"]
            assert text == "Hello there! 😀 世界 is 'world'."
            assert finish == "stop"
            async with asyncio.timeout(5):
                await worker.abort_received.wait()


async def test_input_errors(make_frontend: Any) -> None:
    fe = await make_frontend()
    async with fe.client() as client:
        # no worker yet: 503 at once (no_worker_timeout_s defaults to 0), not a hang
        response = await client.post("/v1/chat/completions", json=CHAT)
        assert_error(response, 503, None, "no_worker_available")
        await fe.add_worker(max_model_len=64, error_on_seed=666)
        post = client.post
        raw = await post("/v1/chat/completions", content=b"{not json", headers={})
        assert_error(raw, 400, None)
        cases: list[tuple[str, dict[str, Any], int, str | None, str | None]] = [
            (
                "chat",
                {**CHAT, "messages": [{"role": "wizard", "content": "x"}]},
                400,
                "messages.0.role",
                None,
            ),
            ("chat", {**CHAT, "messages": []}, 400, "messages", None),
            ("chat", {"model": "smol"}, 400, "messages", None),
            ("chat", {**CHAT, "temperature": 3}, 400, "temperature", None),
            ("chat", {**CHAT, "top_p": 0}, 400, "top_p", None),
            ("chat", {**CHAT, "presence_penalty": -3}, 400, "presence_penalty", None),
            ("chat", {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
            ("chat", {**CHAT, "n": 0}, 400, "n", None),
            ("chat", {**CHAT, "n": 17}, 400, "n", None),  # frontend.max_n defaults to 16
            ("completions", {"model": "smol", "prompt": "x", "n": 17}, 400, "n", None),
            ("chat", {**CHAT, "max_tokens": 0}, 400, "max_tokens", None),
            ("chat", {**CHAT, "top_logprobs": 30, "logprobs": True}, 400, "top_logprobs", None),
            ("chat", {**CHAT, "model": "gpt-9"}, 404, "model", "model_not_found"),
            (
                "chat",
                {**CHAT, "messages": [{"role": "user", "content": "hi " * 100}]},
                400,
                "messages",
                "context_length_exceeded",
            ),
            ("chat", {**CHAT, "max_tokens": 60}, 400, "max_tokens", "context_length_exceeded"),
            ("chat", {**CHAT, "seed": 666}, 400, "seed", None),
            ("chat", {**CHAT, "seed": 666, "stream": True}, 400, "seed", None),
            ("completions", {"model": "smol", "prompt": [[1, 2], []]}, 400, "prompt.1", None),
            ("completions", {"model": "smol", "prompt": [[1], [10**9]]}, 400, "prompt.1", None),
            ("completions", {"model": "smol", "prompt": [1, 10**9]}, 400, "prompt", None),
            ("completions", {"model": "smol", "prompt": 12}, 400, "prompt", None),
            (
                "completions",
                {"model": "smol", "prompt": "x", "logprobs": 50},
                400,
                "logprobs",
                None,
            ),
        ]
        for endpoint, body, status, param, code in cases:
            path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
            response = await post(path, json=body)
            assert_error(response, status, param, code)
        # unknown fields are ignored
        response = await post("/v1/chat/completions", json={**CHAT, "whatever": 1, "user": "u"})
        assert response.status_code == 200


async def test_oversized_bodies_and_hopeless_prompts_are_refused_cheaply(make_frontend: Any):
    """A body past frontend.max_request_bytes is a 413 (declared or chunked, never read
    whole); a text prompt that cannot fit even at the longest token per step is refused
    before it is tokenized; neither reaches a worker or the router."""
    fe = await make_frontend(max_request_bytes=8192)
    worker = await fe.add_worker(max_model_len=64)
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 10_000}]}
    async with fe.client() as client:
        error = assert_error(await client.post("/v1/chat/completions", json=big), 413, None,
                             "request_too_large")  # fmt: skip
        assert "8192" in error["message"]

        async def chunks():  # no Content-Length: counted while read
            for _ in range(20):
                yield b" " * 1000

        chunked = await client.post("/v1/completions", content=chunks(),
                                    headers={"Content-Type": "application/json"})  # fmt: skip
        assert_error(chunked, 413, None, "request_too_large")
        hopeless = {**CHAT, "messages": [{"role": "user", "content": "y" * 6000}]}
        error = assert_error(await client.post("/v1/chat/completions", json=hopeless), 400,
                             "messages", "context_length_exceeded")  # fmt: skip
        assert "at least" in error["message"] and "6000 characters" in error["message"]
        prompt = {"model": "smol", "prompt": "z" * 6000, "max_tokens": 4}
        error = assert_error(await client.post("/v1/completions", json=prompt), 400, "prompt",
                             "context_length_exceeded")  # fmt: skip
        assert worker.requests == []  # (6,000 characters fit the body: refused by length)
        assert not fe.app.state.frontend.tracker.in_flight  # no router entry left behind
        ok = await client.post("/v1/chat/completions", json=CHAT)
        assert ok.status_code == 200, ok.text


async def test_no_worker_timeout_waits_for_a_worker(make_frontend: Any) -> None:
    fe = await make_frontend(no_worker_timeout_s=5.0)
    async with fe.client() as client:
        pending = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
        await asyncio.sleep(0.3)
        assert not pending.done()
        await fe.add_worker()
        response = await pending
        assert response.status_code == 200


async def test_worker_leaving_fails_over_then_503(make_frontend: Any) -> None:
    fe = await make_frontend()
    silent = await fe.add_worker("a-silent", silent=True)
    async with fe.client() as client:
        pending = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
        async with asyncio.timeout(5):
            await silent.received.wait()
        healthy = await fe.add_worker("b-healthy")
        await silent.deregister()  # its lease is gone: in-flight requests move on
        response = await pending
        assert response.status_code == 200, response.text
        assert len(healthy.requests) == 1

        # a stream already under way when its worker leaves ends with an error event
        slow = healthy
        slow.behaviour.delay_s = 0.05
        async with client.stream(
            "POST", "/v1/chat/completions", json={**CHAT, "stream": True}
        ) as stream:
            assert stream.status_code == 200
            lines = stream.aiter_lines()
            await anext(lines)  # role chunk
            await slow.deregister()
            body = "\n\n".join([line async for line in lines])
        assert '"error"' in body and body.rstrip().endswith("[DONE]")

        await fe.wait_for_workers(lambda ids: not ids)
        response = await client.post("/v1/chat/completions", json=CHAT)
        assert_error(response, 503, None, "no_worker_available")
        assert (await client.get("/health")).status_code == 503


async def test_client_disconnect_aborts_on_worker(make_frontend: Any) -> None:
    fe = await make_frontend()
    worker = await fe.add_worker(delay_s=0.05, script=list(range(100, 400)))
    async with fe.client() as client:
        async with client.stream(
            "POST",
            "/v1/completions",
            json={"model": "smol", "prompt": "x", "stream": True, "max_tokens": 200},
        ) as stream:
            lines = stream.aiter_lines()
            await anext(lines)
        async with asyncio.timeout(5):
            await worker.abort_received.wait()
        assert worker.aborted == [worker.requests[0].request_id]

    # non-streaming: the client gives up (timeout) while the worker is still generating
    worker.abort_received.clear()
    async with fe.client(timeout=0.3) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post(
                "/v1/completions", json={"model": "smol", "prompt": "x", "max_tokens": 200}
            )
    async with asyncio.timeout(5):
        await worker.abort_received.wait()
    assert worker.aborted[-1] == worker.requests[-1].request_id
    state = fe.app.state.frontend
    async with asyncio.timeout(5):
        while state.client.in_flight:
            await asyncio.sleep(0.01)


async def test_sixteen_concurrent_requests_over_two_workers(make_frontend: Any) -> None:
    fe = await make_frontend(router="least_loaded")
    first = await fe.add_worker(delay_s=0.001, tokens_per_chunk=3)
    second = await fe.add_worker(delay_s=0.001, tokens_per_chunk=3)
    async with fe.client() as client:

        async def one(index: int) -> str:
            body = {**CHAT, "stream": index % 2 == 0, "max_tokens": 12}
            response = await client.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            if body["stream"]:
                events = sse_events(response.text)
                return "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1])
            return response.json()["choices"][0]["message"]["content"]

        texts = await asyncio.gather(*(one(i) for i in range(16)))
    assert len(set(texts)) == 1 and texts[0]
    assert len(first.requests) + len(second.requests) == 16
    assert first.requests and second.requests
    metrics = (await httpx.AsyncClient(base_url=fe.base_url).get("/metrics")).text
    assert 'hpcserve_frontend_requests_total{endpoint="chat",status="200"} 16.0' in metrics
    assert "hpcserve_frontend_time_to_first_token_seconds_count 16.0" in metrics
    assert "hpcserve_frontend_requests_in_flight 0.0" in metrics


async def test_load_metrics_reach_the_router(make_frontend: Any) -> None:
    fe = await make_frontend(router="least_loaded")
    busy = await fe.add_worker("a-busy")
    idle = await fe.add_worker("b-idle")
    tracker = fe.app.state.frontend.tracker
    nc = busy._nc
    await nc.publish(
        load_metrics_subject(fe.config.name),
        LoadMetrics(worker_id="a-busy", active_sequences=8, waiting_sequences=4)
        .model_dump_json()
        .encode(),
    )
    async with asyncio.timeout(5):
        while "a-busy" not in tracker.metrics:
            await asyncio.sleep(0.01)
    async with fe.client() as client:
        for _ in range(3):
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
    assert len(idle.requests) == 3 and not busy.requests


async def test_request_timeout_is_504_and_aborts(make_frontend: Any) -> None:
    fe = await make_frontend(request_timeout_s=0.3)
    worker = await fe.add_worker(silent=True)
    async with fe.client() as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
        assert_error(response, 504, None, "timeout")
    async with asyncio.timeout(5):
        await worker.abort_received.wait()
    assert worker.aborted == [worker.requests[0].request_id]


async def test_python_m_frontend_serves_and_stops_cleanly(
    etcd_endpoint: str, nats_url: str, model_dir: Any, tmp_path: Any
) -> None:
    import signal
    import sys

    from contract.readiness import free_port

    port = free_port("127.0.0.1")
    config = tmp_path / "deploy.yaml"
    config.write_text(f"name: cli-test\nmodel:\n  path: {model_dir}\n")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "frontend",
        "--config",
        str(config),
        "--set",
        f"services.etcd.endpoint={etcd_endpoint}",
        "--set",
        f"services.nats.endpoint={nats_url}",
        "--set",
        f"frontend.port={port}",
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            async with asyncio.timeout(30):
                while True:
                    try:
                        if (await client.get("/live")).status_code == 200:
                            break
                    except httpx.TransportError:
                        await asyncio.sleep(0.05)
            assert (await client.get("/health")).status_code == 503
            models = (await client.get("/v1/models")).json()
            assert models["data"][0]["id"] == model_dir.name
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await _communicate_or_kill(process, 15)
    assert process.returncode == 0
    assert b"[frontend]" in stderr

    bad = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "frontend",
        "--set",
        "frontend.port=-5",
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await _communicate_or_kill(bad, 60)
    assert bad.returncode == 2 and b"frontend.port" in stderr


async def _communicate_or_kill(
    process: asyncio.subprocess.Process, timeout_s: float
) -> tuple[bytes, bytes]:
    """Its output once it exits; killed (and the test failed) if it outlives `timeout_s`."""
    try:
        async with asyncio.timeout(timeout_s):
            return await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_dead_worker_with_live_lease_fails_over_at_once(make_frontend: Any) -> None:
    fe = await make_frontend()
    await fe.add_worker("a-dead", listen=False)
    async with fe.client() as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
        assert_error(response, 503, None, "no_worker_available")
        healthy = await fe.add_worker("b-healthy")
        for _ in range(2):  # round robin tries a-dead first at least once
            response = await client.post("/v1/chat/completions", json=CHAT)
            assert response.status_code == 200, response.text
        assert len(healthy.requests) == 2


async def test_malformed_worker_reply_is_502(make_frontend: Any) -> None:
    fe = await make_frontend()
    await fe.add_worker(garbage=True)
    async with fe.client() as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
        assert_error(response, 502, None, "worker_failed")
