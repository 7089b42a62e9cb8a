"""Tool calling end to end: the real frontend (uvicorn, etcd, nats-server) with
frontend.tool_call_parser hermes and the shipped chatml_tools template, the official openai
client, and a real worker serving the real SmolLM2-135M `TorchEngine` (greedy: a few-shot
history of earlier calls makes it call `get_weather` for Paris, on CPU, every time); the
tool's answer sent back renders as the next turn. Then the exact streamed shapes of
content + several calls (a FAKE worker replays a scripted answer), the mocker engine
answering a tool request (no call in random tokens, no crash), and the refusals of a
deployment whose template does not render tools."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import openai
import pytest
from real_workers import engine_worker, mocker_worker, openai_client

from contract.messages import GenerateRequest, SamplingParams
from frontend.chat_templates import chat_template_file
from frontend.openai_schemas import ChatMessage
from frontend.tokenization import TextTokenizer
from frontend.tool_calling import template_messages
from mpi_workers.engine.torch.engine import TorchEngine

pytestmark = pytest.mark.integration

TOOLS: list[Any] = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    },
}]  # fmt: skip
TOOL_FRONTEND = {"tool_call_parser": "hermes", "chat_template": "chatml_tools"}


def earlier_call(city: str, number: int) -> dict[str, Any]:
    call = {
        "id": f"call_{number}",
        "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": city})},
    }
    return {"role": "assistant", "content": None, "tool_calls": [call]}  # fmt: skip


# two earlier questions answered by calls: the 135M model then calls for Paris too
FEW_SHOT: list[Any] = [
    {"role": "user", "content": "What is the weather in Berlin?"},
    earlier_call("Berlin", 1),
    {"role": "user", "content": "What is the weather in Rome?"},
    earlier_call("Rome", 2),
    {"role": "user", "content": "What is the weather in Paris?"},
]


def torch_worker(fe: Any, model_dir: Path) -> contextlib.AbstractAsyncContextManager[Any]:
    engine = TorchEngine(model_dir, num_blocks=256, model_name="smol")
    return engine_worker(fe, engine)


async def greedy_text(engine: TorchEngine, ids: list[int], eos: list[int]) -> str:
    """What the engine itself generates for `ids` (the reference for the HTTP answer)."""
    sampling = SamplingParams(max_tokens=40, temperature=0.0, stop_token_ids=eos)
    out = await engine.generate_all(GenerateRequest(request_id="ref", token_ids=ids,
                                                    sampling=sampling))  # fmt: skip
    return TextTokenizer(engine.model_dir).decode(out.token_ids)


@pytest.mark.model
async def test_the_model_calls_a_tool_and_reads_its_answer_streamed_or_not(
    make_frontend: Any, model_dir: Path
) -> None:
    fe = await make_frontend(**TOOL_FRONTEND)
    ask = {"model": "smol", "tools": TOOLS, "temperature": 0.0, "max_tokens": 40}
    async with torch_worker(fe, model_dir) as engine, openai_client(fe) as client:
        answer = await client.chat.completions.create(messages=FEW_SHOT, **ask)
        tokenizer = TextTokenizer(model_dir, chat_template_file("chatml_tools"))
        rendered = template_messages([ChatMessage.model_validate(m) for m in FEW_SHOT])
        assert answer.usage.prompt_tokens == len(tokenizer.encode_chat(rendered, TOOLS))
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris"}

        # streamed: the client's own accumulation rebuilds the same call
        async with client.chat.completions.stream(messages=FEW_SHOT, **ask) as stream:
            streamed = await stream.get_final_completion()
        s_choice = streamed.choices[0]
        assert s_choice.finish_reason == "tool_calls"
        assert not s_choice.message.content
        (s_call,) = s_choice.message.tool_calls
        assert (s_call.function.name, s_call.function.arguments) == (
            call.function.name, call.function.arguments)  # fmt: skip
        assert s_call.id.startswith("call_")

        # the next turn: the call and the tool's answer in the history
        answered = {"role": "tool", "tool_call_id": call.id, "content": "cloudy, 18 C"}
        history = [*FEW_SHOT, choice.message.model_dump(exclude_none=True), answered]
        reply = await client.chat.completions.create(messages=history, **ask)
        messages = template_messages([ChatMessage.model_validate(m) for m in history])
        prompt = tokenizer.encode_chat(messages, TOOLS)
        assert "<tool_response>\ncloudy, 18 C\n</tool_response>" in tokenizer.render_chat(
            messages, TOOLS
        )
        assert reply.usage.prompt_tokens == len(prompt)
        expected = await greedy_text(engine, prompt, tokenizer.eos_token_ids)
        assert reply.choices[0].message.content == expected
        assert "Paris" in expected and "cloudy" in expected  # it read the tool's answer
        assert reply.choices[0].message.tool_calls is None
        assert reply.choices[0].finish_reason == "stop"


async def test_streamed_content_and_calls_keep_their_order_and_shape(
    make_frontend: Any, tokenizer: TextTokenizer
) -> None:
    """A FAKE worker replays a scripted answer one token per chunk: text, two calls, a
    malformed one (stays content); n=2 parses each choice on its own; parallel_tool_calls
    false keeps the first call."""
    text = (
        'Checking both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
        '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n'
        "</tool_call>"
    )
    fe = await make_frontend(**TOOL_FRONTEND)
    await fe.add_worker(script=tokenizer.encode(text, add_special_tokens=False))
    ask = {"model": "smol", "messages": [{"role": "user", "content": "Weather and time?"}],
           "tools": TOOLS, "max_tokens": 200, "n": 2}  # fmt: skip
    async with openai_client(fe) as client:
        chunks = [c async for c in await client.chat.completions.create(stream=True, **ask)]
        whole = await client.chat.completions.create(**ask)
        single = await client.chat.completions.create(parallel_tool_calls=False, **ask)
    for index in range(2):
        deltas = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        content = "".join(d.delta.content or "" for d in deltas)
        calls = [t for d in deltas for t in d.delta.tool_calls or []]
        assert content == "Checking both."
        assert [(t.index, t.function.name) for t in calls if t.id] == [
            (0, "get_weather"), (1, "get_time")]  # fmt: skip
        assert [t.function.arguments for t in calls] == [
            "", '{"city": "Paris"}', "", '{"zone": "CET"}']  # fmt: skip
        first_call = next(i for i, d in enumerate(deltas) if d.delta.tool_calls)
        assert all(not d.delta.content for d in deltas[first_call:])
        assert deltas[-1].finish_reason == "tool_calls"
        message = whole.choices[index].message
        assert message.content == "Checking both."
        assert [t.function.name for t in message.tool_calls] == ["get_weather", "get_time"]
        assert whole.choices[index].finish_reason == "tool_calls"
        assert [t.function.name for t in single.choices[index].message.tool_calls] == [
            "get_weather"]  # fmt: skip
    ids = {t.id for c in chunks for t in (c.choices[0].delta.tool_calls if c.choices else None)
           or [] if t.id}  # fmt: skip
    assert len(ids) == 4  # every call its own id


async def test_a_call_that_does_not_parse_stays_content(
    make_frontend: Any, tokenizer: TextTokenizer
) -> None:
    text = 'Here: <tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>'
    fe = await make_frontend(**TOOL_FRONTEND)
    await fe.add_worker(script=tokenizer.encode(text, add_special_tokens=False))
    ask = {"model": "smol", "messages": [{"role": "user", "content": "?"}], "tools": TOOLS}
    async with openai_client(fe) as client:
        answer = await client.chat.completions.create(**ask)
        chunks = [c async for c in await client.chat.completions.create(stream=True, **ask)]
    assert answer.choices[0].message.content == text
    assert answer.choices[0].message.tool_calls is None
    assert answer.choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text


async def test_legacy_functions_get_a_function_call_back(
    make_frontend: Any, tokenizer: TextTokenizer
) -> None:
    """OpenAI's legacy shape: `functions` in, `message.function_call` out (one call),
    finish_reason "function_call"; streamed as `delta.function_call` pieces."""
    text = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    fe = await make_frontend(**TOOL_FRONTEND)
    await fe.add_worker(script=tokenizer.encode(text, add_special_tokens=False))
    ask = {"model": "smol", "messages": [{"role": "user", "content": "?"}],
           "functions": [TOOLS[0]["function"]]}  # fmt: skip
    async with openai_client(fe) as client:
        answer = await client.chat.completions.create(**ask)
        chunks = [c async for c in await client.chat.completions.create(stream=True, **ask)]
    message = answer.choices[0].message
    assert message.tool_calls is None and message.content is None
    assert message.function_call.name == "get_weather"
    assert json.loads(message.function_call.arguments) == {"city": "Paris"}
    assert answer.choices[0].finish_reason == "function_call"
    pieces = [c.choices[0].delta.function_call for c in chunks if c.choices]
    pieces = [p for p in pieces if p is not None]
    assert [p.name for p in pieces] == ["get_weather", None]
    assert "".join(p.arguments for p in pieces) == message.function_call.arguments
    assert chunks[-1].choices[0].finish_reason == "function_call"


@pytest.mark.model
async def test_the_mocker_answers_tool_requests_without_calls(
    make_frontend: Any, model_dir: Path
) -> None:
    fe = await make_frontend(**TOOL_FRONTEND)
    ask = {"model": "smol", "messages": FEW_SHOT, "tools": TOOLS, "max_tokens": 16}
    async with mocker_worker(fe, model_dir), openai_client(fe) as client:
        answer = await client.chat.completions.create(**ask)
        assert answer.choices[0].finish_reason in ("stop", "length")
        chunks = [c async for c in await client.chat.completions.create(stream=True, **ask)]
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")


async def test_tools_are_refused_where_the_template_cannot_show_them(
    make_frontend: Any,
) -> None:
    """SmolLM2's own template ignores `tools` and tool calls: refused naming the field
    (tool_choice "none" still works)."""
    fe = await make_frontend(tool_call_parser="hermes")
    worker = await fe.add_worker()
    ask = {"model": "smol", "messages": [{"role": "user", "content": "?"}], "max_tokens": 2}
    async with openai_client(fe) as client:
        create = client.chat.completions.create
        for fields, param in (
            ({"tools": TOOLS}, "tools"),
            ({"messages": FEW_SHOT}, "messages.1.tool_calls"),
        ):
            with pytest.raises(openai.BadRequestError) as caught:
                await create(**{**ask, **fields})
            assert caught.value.param == param, caught.value.message
        assert not worker.requests
        answer = await create(tools=TOOLS, tool_choice="none", **ask)
        assert answer.choices[0].message.tool_calls is None
    assert len(worker.requests) == 1


async def test_the_openapi_document_tells_of_tool_calling(make_frontend: Any) -> None:
    fe = await make_frontend()
    async with fe.client() as client:
        schema = (await client.get("/openapi.json")).json()
    models = schema["components"]["schemas"]
    request = models["ChatCompletionRequest"]["properties"]
    assert "frontend.tool_call_parser" in request["tools"]["description"]
    assert '"required"' in request["tool_choice"]["description"]
    assert "first call" in request["parallel_tool_calls"]["description"]
    assert "tool_call_id" in models["ChatMessage"]["properties"]
    message = models["ChatResponseMessage"]["properties"]
    assert "stays content" in message["tool_calls"]["description"]
    assert "tool_calls" in models["ChatChoice"]["properties"]["finish_reason"]["anyOf"][0]["enum"]
