"""/v1/responses end to end against real etcd and nats-server: FAKE workers (scripted
answers) for the shapes, the stream and the store; the official openai client parses it."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image
from real_workers import mocker_worker, openai_client
from test_frontend_integration import assert_error

from frontend.tokenization import TextTokenizer

pytestmark = pytest.mark.integration


def sse_typed(body: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of each SSE event; the name line must match the data's type."""
    events = []
    for block in body.split("\n\n"):
        if not block.strip():
            continue
        name_line, data_line = block.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: "), block
        data = json.loads(data_line[len("data: ") :])
        assert data["type"] == name_line[len("event: ") :]
        events.append((data["type"], data))
    return events


async def test_a_text_answer_streamed_or_not_is_the_same_response(make_frontend: Any) -> None:
    """The fake worker's script to its EOS: status completed; streamed, the client's own
    accumulation rebuilds the same output and usage."""
    fe = await make_frontend()
    await fe.add_worker()
    ask = {"model": "smol", "input": "Say hello", "store": False}
    async with openai_client(fe) as client:
        whole = await client.responses.create(**ask)
        async with client.responses.stream(**ask) as stream:
            streamed = await stream.get_final_response()
    assert whole.id.startswith("resp_") and whole.object == "response"
    assert whole.status == "completed" == streamed.status
    (item,) = whole.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    assert whole.output_text.startswith("Hello there!")
    assert whole.output_text == streamed.output_text
    assert whole.usage.output_tokens == streamed.usage.output_tokens > 0
    assert whole.usage.input_tokens == streamed.usage.input_tokens > 0
    assert whole.store is False and streamed.store is False


async def test_max_output_tokens_ends_incomplete_streamed_or_not(make_frontend: Any) -> None:
    fe = await make_frontend()
    await fe.add_worker()
    ask = {"model": "smol", "input": "Say hello", "max_output_tokens": 3, "store": False}
    async with openai_client(fe) as client:
        whole = await client.responses.create(**ask)
        events = [e async for e in await client.responses.create(stream=True, **ask)]
    assert whole.status == "incomplete"
    assert whole.incomplete_details.reason == "max_output_tokens"
    assert whole.usage.output_tokens == 3
    assert whole.output[0].status == "incomplete"
    last = events[-1]
    assert last.type == "response.incomplete"
    assert last.response.incomplete_details.reason == "max_output_tokens"
    assert last.response.output[0].content[0].text == whole.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))


CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS: list[Any] = [
    {"type": "function", "name": "get_weather", "description": "the weather", "parameters": CITY}
]
TOOL_FRONTEND = {"tool_call_parser": "hermes", "chat_template": "chatml_tools"}
CALLS_TEXT = (
    'Checking both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
    '\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n'
    "</tool_call>"
)


async def test_calls_come_back_as_function_call_items_streamed_or_not(
    make_frontend: Any, tokenizer: TextTokenizer
) -> None:
    """A FAKE worker answers text then two hermes calls, one token per chunk: a message
    item then two function_call items, in the same order and shape when streamed; the
    stream's events carry the arguments; parallel_tool_calls false keeps the first."""
    fe = await make_frontend(**TOOL_FRONTEND)
    await fe.add_worker(script=tokenizer.encode(CALLS_TEXT, add_special_tokens=False))
    ask = {"model": "smol", "input": "Weather?", "tools": TOOLS, "store": False}
    async with openai_client(fe) as client:
        whole = await client.responses.create(**ask)
        async with client.responses.stream(**ask) as stream:
            kinds = [event.type async for event in stream]
            streamed = await stream.get_final_response()
        single = await client.responses.create(parallel_tool_calls=False, **ask)
    for response in (whole, streamed):
        assert response.status == "completed"
        message, first, second = response.output
        assert message.type == "message" and message.content[0].text == "Checking both."
        assert (first.type, first.name, json.loads(first.arguments)) == (
            "function_call", "get_weather", {"city": "Paris"})  # fmt: skip
        assert json.loads(second.arguments) == {"city": "Rome"}
        assert first.call_id.startswith("call_") and first.id.startswith("fc_")
        assert first.status == "completed"
    assert response.tools[0].name == "get_weather" and response.tool_choice == "auto"
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds.count("response.function_call_arguments.done") == 2
    assert kinds.count("response.output_item.done") == 3 and kinds[-1] == "response.completed"
    assert [item.type for item in single.output] == ["message", "function_call"]


async def test_stored_responses_continue_across_frontend_processes(
    make_frontend: Any, tokenizer: TextTokenizer
) -> None:
    """Two frontends of one deployment (as frontend.workers runs them) share the store in
    etcd: a response made on one is read, continued and deleted through the other."""
    from tests.frontend.conftest import server_port, start_frontend

    fe = await make_frontend()
    worker = await fe.add_worker()
    server, task, _ = await start_frontend(fe.config)
    other = httpx.AsyncClient(base_url=f"http://127.0.0.1:{server_port(server)}", timeout=30)
    try:
        async with openai_client(fe) as client:
            first = await client.responses.create(model="smol", input="Say hello",
                                                  instructions="Be brief")  # fmt: skip
            assert first.store is True
            got = await other.get(f"/v1/responses/{first.id}")
            assert got.status_code == 200 and got.json()["id"] == first.id
            assert got.json()["output"][0]["content"][0]["text"] == first.output_text
            # the follow-up on the other process: its prompt holds the stored turns
            again = {"model": "smol", "input": "And again", "previous_response_id": first.id}
            follow = await other.post("/v1/responses", json=again)
            assert follow.status_code == 200, follow.text
            body = follow.json()
            assert body["previous_response_id"] == first.id and body["instructions"] is None
            prompt = tokenizer.decode(worker.requests[-1].token_ids, False)
            assert prompt.index("Say hello") < prompt.index(first.output_text) < prompt.index(
                "And again")  # fmt: skip
            assert "Be brief" not in prompt  # instructions are not carried over (OpenAI's rule)
            items = await other.get(f"/v1/responses/{body['id']}/input_items",
                                    params={"order": "asc"})  # fmt: skip
            kinds = [(i["type"], i.get("role")) for i in items.json()["data"]]
            assert kinds == [("message", "user"), ("message", "assistant"), ("message", "user")]
            assert all(i["id"] for i in items.json()["data"])
            newest = (await other.get(f"/v1/responses/{body['id']}/input_items",
                                      params={"limit": 1})).json()  # fmt: skip
            assert newest["has_more"] and newest["data"][0]["content"][0]["text"] == "And again"
            rest = (await other.get(f"/v1/responses/{body['id']}/input_items",
                                    params={"after": newest["last_id"]})).json()  # fmt: skip
            assert [i["role"] for i in rest["data"]] == ["assistant", "user"]
            assert not rest["has_more"]
            deleted = await client.responses.delete(first.id)
            assert deleted is None or getattr(deleted, "deleted", True)
            gone = await other.get(f"/v1/responses/{first.id}")
            assert_error(gone, 404, None, "response_not_found")
            with pytest.raises(openai.BadRequestError) as caught:
                await client.responses.create(model="smol", input="x",
                                              previous_response_id=first.id)  # fmt: skip
            assert caught.value.body["param"] == "previous_response_id"
            assert caught.value.body["code"] == "previous_response_not_found"
    finally:
        await other.aclose()
        server.should_exit = True
        await task


async def test_store_false_and_a_record_past_the_cap_are_not_kept(make_frontend: Any) -> None:
    """`store: false` never reaches etcd; a record larger than
    frontend.responses_store_max_bytes is answered with store false and is not found."""
    fe = await make_frontend(responses_store_max_bytes=1024)
    await fe.add_worker()
    async with fe.client() as client:
        small = await client.post("/v1/responses", json={"model": "smol", "input": "hi",
                                                         "store": False})  # fmt: skip
        assert small.json()["store"] is False
        assert fe.app.state.frontend.response_store._client is None  # etcd never asked
        assert_error(await client.get(f"/v1/responses/{small.json()['id']}"), 404, None)
        big = await client.post("/v1/responses", json={"model": "smol", "input": "x" * 2000})
        assert big.status_code == 200 and big.json()["store"] is False
        assert_error(await client.get(f"/v1/responses/{big.json()['id']}"), 404, None)


async def test_chat_path_errors_name_the_responses_field(make_frontend: Any) -> None:
    fe = await make_frontend()
    await fe.add_worker(max_model_len=64)
    async with fe.client() as client:
        long = await client.post("/v1/responses", json={"model": "smol", "input": "x",
                                                        "max_output_tokens": 100})  # fmt: skip
        error = assert_error(long, 400, "max_output_tokens", "context_length_exceeded")
        too_long = await client.post("/v1/responses", json={"model": "smol",
                                                            "input": "hello " * 200})  # fmt: skip
        assert_error(too_long, 400, "input", "context_length_exceeded")
        call = {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}
        history = await client.post("/v1/responses", json={
            "model": "smol", "input": [{"role": "user", "content": "hi"}, call]})  # fmt: skip
        error = assert_error(history, 400, "input[1]")
        assert "tool calling is off" in error["message"]
        part = {"type": "input_image", "image_url": "data:,"}
        image = await client.post("/v1/responses", json={
            "model": "smol", "input": [{"role": "user", "content": [part]}]})  # fmt: skip
        assert_error(image, 400, "input")
        other = await client.post("/v1/responses", json={"model": "gpt-4o", "input": "x"})
        assert_error(other, 404, "model", "model_not_found")
        metrics = (await client.get("/metrics")).text
    assert 'endpoint="responses",status="400"' in metrics


async def test_truncation_auto_leaves_out_the_oldest_items_until_it_fits(
    make_frontend: Any, model_dir: Path
) -> None:
    """A conversation longer than the context: "disabled" is a 400 naming `input`; "auto"
    sends the worker the instructions and the newest items that fit with max_output_tokens,
    also where the older turns come from a stored response; the stored conversation keeps
    every item."""
    fe = await make_frontend()
    worker = await fe.add_worker(max_model_len=160)
    tokenizer = TextTokenizer(model_dir)
    turns = [
        {"role": role, "content": f"turn {i}: " + "lorem ipsum dolor sit amet " * 4}
        for i, role in enumerate(["user", "assistant"] * 3)
    ]
    ask = {"model": "smol", "instructions": "Be brief.", "max_output_tokens": 8,
           "input": [*turns, {"role": "user", "content": "the last question"}]}  # fmt: skip
    async with openai_client(fe) as client:
        with pytest.raises(openai.BadRequestError) as refused:
            await client.responses.create(**ask)
        assert refused.value.body["param"] == "input"  # type: ignore[index]
        answer = await client.responses.create(truncation="auto", **ask)
        sent = worker.requests[-1].token_ids
        prompt = tokenizer.decode(sent, False)
        assert answer.status == "incomplete" and answer.truncation == "auto"  # 8 tokens
        assert answer.usage.input_tokens == len(sent) and len(sent) + 8 <= 160
        assert "Be brief." in prompt and "the last question" in prompt
        assert "turn 0:" not in prompt and "turn 5:" in prompt  # oldest out, newest kept
        # as few left out as it takes: with the newest dropped turn back, it would not fit
        kept = next(i for i in range(6) if f"turn {i}:" in prompt)
        longer = {**ask, "input": ask["input"][kept - 1 :]}
        with pytest.raises(openai.BadRequestError):
            await client.responses.create(**longer)
        follow = await client.responses.create(
            model="smol", instructions="Be brief.", max_output_tokens=8, truncation="auto",
            previous_response_id=answer.id, input="and one more",
        )  # fmt: skip
        prompt = tokenizer.decode(worker.requests[-1].token_ids, False)
        assert follow.output_text and "and one more" in prompt
        assert "turn 0:" not in prompt
        items = await client.responses.input_items.list(follow.id, order="asc")
    texts = [item.content[0].text for item in items.data if item.type == "message"]
    assert texts[0].startswith("turn 0:") and texts[-1] == "and one more"  # all kept
    async with fe.client() as client:
        alone = await client.post("/v1/responses", json={
            "model": "smol", "truncation": "auto", "input": "hello " * 300})  # fmt: skip
    assert_error(alone, 400, "input", "context_length_exceeded")


async def test_a_json_schema_text_format_reaches_the_worker(make_frontend: Any) -> None:
    fe = await make_frontend()
    worker = await fe.add_worker()
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    async with fe.client() as client:
        text_format = {"type": "json_schema", "name": "obj", "schema": schema}
        ask = {"model": "smol", "input": "x", "store": False, "text": {"format": text_format}}
        answer = await client.post("/v1/responses", json=ask)
    assert answer.status_code == 200, answer.text
    assert answer.json()["text"]["format"]["schema"] == schema
    guided = worker.requests[-1].sampling.guided
    assert guided is not None and guided.kind == "json_schema" and json.loads(guided.spec) == schema


async def test_the_openapi_document_tells_of_the_responses_endpoints(make_frontend: Any) -> None:
    fe = await make_frontend()
    async with fe.client() as client:
        schema = (await client.get("/openapi.json")).json()
    paths = schema["paths"]
    create = paths["/v1/responses"]["post"]
    body = create["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert body.endswith("/ResponsesRequest")
    ok = create["responses"]["200"]["content"]
    assert ok["application/json"]["schema"]["$ref"].endswith("/ResponseObject")
    assert "response.output_text.delta" in ok["text/event-stream"]["schema"]["description"]
    assert set(paths["/v1/responses/{response_id}"]) == {"get", "delete"}
    cancel = paths["/v1/responses/{response_id}/cancel"]["post"]
    assert cancel["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ResponseObject")  # fmt: skip
    retrieve = paths["/v1/responses/{response_id}"]["get"]
    assert {"stream", "starting_after"} <= {p["name"] for p in retrieve["parameters"]}
    assert "429" in create["responses"]
    fields = schema["components"]["schemas"]["ResponsesRequest"]["properties"]
    assert {"input", "instructions", "tools", "text", "previous_response_id", "store",
            "background"} <= set(fields)  # fmt: skip


async def test_a_client_leaving_a_stream_cancels_the_work(make_frontend: Any) -> None:
    """The chat path's disconnect handling: the worker is told to abort, nothing stays
    in flight."""
    fe = await make_frontend()
    worker = await fe.add_worker(delay_s=0.05, script=list(range(100, 400)))
    async with fe.client() as client:
        body = {"model": "smol", "input": "x", "stream": True, "max_output_tokens": 200}
        async with client.stream("POST", "/v1/responses", json=body) as stream:
            assert (await anext(stream.aiter_lines())) == "event: response.created"
    async with asyncio.timeout(5):
        while not worker.aborted:
            await asyncio.sleep(0.01)
    assert worker.aborted == [r.request_id for r in worker.requests]
    state = fe.app.state.frontend
    async with asyncio.timeout(5):
        while state.client.in_flight or state.tracker.requests_on(worker.worker_id):
            await asyncio.sleep(0.01)


async def test_a_worker_lost_mid_stream_ends_it_with_response_failed(make_frontend: Any) -> None:
    """With migration off, the worker leaving after the first delta: the stream's last
    event is response.failed with the error; the output so far is in it."""
    fe = await make_frontend(migration_limit=0)
    worker = await fe.add_worker(delay_s=0.05, script=list(range(100, 400)))
    body = {"model": "smol", "input": "x", "stream": True, "max_output_tokens": 200}
    text = ""
    async with fe.client() as client, client.stream("POST", "/v1/responses", json=body) as stream:
        async for piece in stream.aiter_text():
            text += piece
            if "event: response.output_text.delta" in text:
                await worker.deregister()
    events = sse_typed(text)
    kind, last = events[-1]
    assert kind == "response.failed", [k for k, _ in events]
    assert last["response"]["status"] == "failed"
    assert "migration_limit is 0" in last["response"]["error"]["message"]
    assert last["response"]["output"][0]["content"][0]["text"]


async def test_an_input_image_is_served_as_chat_images_are(
    make_frontend: Any, tiny_vlm_dir: Path
) -> None:
    """On a VLM deployment an input_image part reaches the worker like chat's image_url;
    a bad one is refused naming the Responses part (`input[0].content[1].image_url`)."""
    fe = await make_frontend(model=tiny_vlm_dir)
    worker = await fe.add_worker(media=["image"])
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (9, 9, 9)).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    def ask(image_url: str) -> dict[str, Any]:
        content = [{"type": "input_text", "text": "Describe it"},
                   {"type": "input_image", "image_url": image_url}]  # fmt: skip
        return {"input": [{"role": "user", "content": content}], "max_output_tokens": 4,
                "store": False}  # fmt: skip

    async with fe.client(timeout=60) as client:
        answer = await client.post("/v1/responses", json=ask(url))
        assert answer.status_code == 200, answer.text
        (request,) = worker.requests
        (ref,) = request.media
        assert (ref.width, ref.height) == (64, 48)
        bad = await client.post("/v1/responses", json=ask("data:image/png;base64,AAAA"))
    error = assert_error(bad, 400, "input[0].content[1].image_url")
    assert error["message"].startswith("input[0].content[1].image_url:"), error


async def test_logprobs_come_with_the_text_when_included(make_frontend: Any) -> None:
    fe = await make_frontend()
    await fe.add_worker()
    ask = {"model": "smol", "input": "x", "store": False, "max_output_tokens": 3,
           "include": ["message.output_text.logprobs"], "top_logprobs": 2}  # fmt: skip
    async with fe.client() as client:
        whole = (await client.post("/v1/responses", json=ask)).json()
        plain = (await client.post("/v1/responses", json={**ask, "include": []})).json()
        streamed = sse_typed((await client.post("/v1/responses",
                                                json={**ask, "stream": True})).text)  # fmt: skip
    part = whole["output"][0]["content"][0]
    assert len(part["logprobs"]) == 3 == whole["usage"]["output_tokens"]
    assert all(len(entry["top_logprobs"]) == 2 for entry in part["logprobs"])
    assert "".join(entry["token"] for entry in part["logprobs"]) == part["text"]
    assert plain["output"][0]["content"][0]["logprobs"] == []
    deltas = [data for kind, data in streamed if kind == "response.output_text.delta"]
    assert sum(len(d["logprobs"]) for d in deltas) == 3
    done = next(data for kind, data in streamed if kind == "response.output_text.done")
    assert done["logprobs"] == part["logprobs"]


async def test_a_forced_named_call_is_a_function_call_item(
    make_frontend: Any, tokenizer: TextTokenizer
) -> None:
    """tool_choice naming a function: the output is constrained to its arguments (the FAKE
    worker's script is that JSON) and comes back as its function_call item."""
    fe = await make_frontend()
    worker = await fe.add_worker(script=tokenizer.encode('{"city": "Paris"}',
                                                         add_special_tokens=False))  # fmt: skip
    ask = {"model": "smol", "input": "Weather in Paris?", "tools": TOOLS, "store": False,
           "tool_choice": {"type": "function", "name": "get_weather"}}  # fmt: skip
    async with openai_client(fe) as client:
        whole = await client.responses.create(**ask)
        async with client.responses.stream(**ask) as stream:
            streamed = await stream.get_final_response()
    for response in (whole, streamed):
        (call,) = response.output
        assert call.type == "function_call" and call.name == "get_weather"
        assert json.loads(call.arguments) == {"city": "Paris"}
    assert whole.tool_choice.name == "get_weather"
    assert worker.requests[0].sampling.guided is not None


async def test_what_the_engine_cannot_do_is_refused_naming_the_responses_field(
    make_frontend: Any, model_dir: Path
) -> None:
    """The mocker cannot constrain its output: routing's refusal (chat's
    `response_format` / `tool_choice`) names `text.format` / `tool_choice`."""
    fe = await make_frontend()
    async with mocker_worker(fe, model_dir), fe.client() as client:
        shaped = await client.post("/v1/responses", json={
            "input": "x", "text": {"format": {"type": "json_object"}}})  # fmt: skip
        assert_error(shaped, 400, "text.format")
        forced = await client.post("/v1/responses", json={
            "input": "x", "tools": TOOLS, "tool_choice": "required"})  # fmt: skip
        assert_error(forced, 400, "tool_choice")
        plain = await client.post("/v1/responses", json={"input": "x", "max_output_tokens": 3})
        assert plain.status_code == 200 and plain.json()["simulated"] is True
