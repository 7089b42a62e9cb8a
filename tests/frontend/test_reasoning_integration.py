"""Reasoning output end to end: the real frontend (uvicorn, etcd, nats-server) with
frontend.reasoning_parser qwen3 and a test ChatML template with Qwen3's thinking layout
(tests/frontend/templates/chatml_thinking.jinja: the prompt opens a <think> block, or closes
it empty with `chat_template_kwargs: {"enable_thinking": false}`), the official openai
client, and a real worker serving the real SmolLM2-135M `TorchEngine`: a few-shot history of
earlier answers with their thinking makes it think, close the block and answer (greedy, on
CPU, every time). The split answer is checked against the engine's own greedy text for the
same prompt ids; streamed and whole answers agree."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest
from real_workers import engine_worker, openai_client

from contract.messages import GenerateRequest, SamplingParams
from frontend.openai_schemas import ChatMessage
from frontend.reasoning import with_thinking
from frontend.tokenization import TextTokenizer
from mpi_workers.engine.torch.engine import TorchEngine

pytestmark = [pytest.mark.integration, pytest.mark.model]

TEMPLATE = Path(__file__).parent / "templates" / "chatml_thinking.jinja"
FEW_SHOT: list[Any] = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "reasoning_content": "2 plus 3 makes 5.", "content": "The answer is 5."},
    {"role": "user", "content": "What is 4 + 4?"},
    {"role": "assistant", "reasoning": "4 plus 4 makes 8.", "content": "The answer is 8."},
    {"role": "user", "content": "What is 6 + 1?"},
]
ASK = {"model": "smol", "messages": FEW_SHOT, "temperature": 0.0, "max_tokens": 40}


async def engine_text(engine: TorchEngine, tokenizer: TextTokenizer, kwargs: Any) -> str:
    """What the engine itself generates for the conversation's prompt ids (the reference)."""
    messages = [{"role": m["role"], "content": m["content"]} for m in FEW_SHOT]
    with_thinking(messages, [ChatMessage.model_validate(m) for m in FEW_SHOT])
    ids = tokenizer.encode_chat(messages, None, kwargs)
    eos = tokenizer.eos_token_ids
    sampling = SamplingParams(max_tokens=40, temperature=0.0, stop_token_ids=eos)
    request = GenerateRequest(request_id="ref", token_ids=ids, sampling=sampling)
    return tokenizer.decode((await engine.generate_all(request)).token_ids)


async def test_thinking_comes_apart_from_the_answer(make_frontend: Any, model_dir: Path) -> None:
    fe = await make_frontend(chat_template=str(TEMPLATE), reasoning_parser="qwen3")
    tokenizer = TextTokenizer(model_dir, TEMPLATE)
    engine = TorchEngine(model_dir, num_blocks=256, model_name="smol")
    async with engine_worker(fe, engine), openai_client(fe) as client:
        raw = await engine_text(engine, tokenizer, None)
        thinking, closed, answer = raw.partition("</think>")
        assert closed and thinking.strip() and answer.strip()  # the model closed its block

        whole = (await client.chat.completions.create(**ASK)).choices[0]
        assert whole.message.reasoning_content == thinking  # type: ignore[attr-defined]
        assert whole.message.reasoning == thinking  # type: ignore[attr-defined]
        assert whole.message.content == answer.lstrip()
        assert whole.finish_reason == "stop"

        thought = content = ""
        stream = await client.chat.completions.create(**ASK, stream=True)
        async for chunk in stream:
            for choice in chunk.choices:
                delta = choice.delta.model_dump()
                assert delta.get("reasoning") == delta.get("reasoning_content")
                thought += delta.get("reasoning_content") or ""
                content += delta.get("content") or ""
        assert (thought, content) == (thinking, answer.lstrip())

        # the template closes the block: no thinking, the whole output is the answer
        kwargs = {"enable_thinking": False}
        off = {"chat_template_kwargs": kwargs}
        plain = (await client.chat.completions.create(**ASK, extra_body=off)).choices[0]
        assert plain.message.content == await engine_text(engine, tokenizer, kwargs)
        assert "reasoning_content" not in plain.message.model_dump(exclude_none=True)

        # include_reasoning false: the answer alone
        quiet = await client.chat.completions.create(**ASK, extra_body={"include_reasoning": False})
        message = quiet.choices[0].message.model_dump(exclude_none=True)
        assert message["content"] == answer.lstrip() and "reasoning_content" not in message


async def test_reserved_template_variables_are_refused(make_frontend: Any) -> None:
    fe = await make_frontend(chat_template=str(TEMPLATE), reasoning_parser="qwen3")
    async with openai_client(fe) as client:
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(
                **ASK, extra_body={"chat_template_kwargs": {"messages": []}}
            )
        error = refused.value.body
        assert error["param"] == "chat_template_kwargs"
        assert "messages" in error["message"]


WEATHER_TOOL: list[Any] = [{
    "type": "function",
    "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}},
}]  # fmt: skip


async def test_thinking_then_a_call_streamed_and_whole(
    make_frontend: Any, tokenizer: TextTokenizer
) -> None:
    """A FAKE worker replays a scripted answer one token per chunk, as Qwen3 answers a tool
    request: thinking, then a hermes call. The thinking is split off first; the call is
    found in the answer part; n=2 splits each choice on its own."""
    thinking = "The user wants the weather; get_weather takes a city."
    text = (
        f"<think>\n{thinking}\n</think>\n\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    )
    fe = await make_frontend(
        chat_template="chatml_tools", tool_call_parser="hermes", reasoning_parser="qwen3"
    )
    await fe.add_worker(script=tokenizer.encode(text, add_special_tokens=False))
    ask = {"model": "smol", "messages": [{"role": "user", "content": "Weather in Paris?"}],
           "tools": WEATHER_TOOL, "max_tokens": 200, "n": 2}  # fmt: skip
    async with openai_client(fe) as client:
        whole = await client.chat.completions.create(**ask)
        chunks = [c async for c in await client.chat.completions.create(stream=True, **ask)]
    for index in range(2):
        message = whole.choices[index].message
        assert message.reasoning_content == f"\n{thinking}\n"  # type: ignore[attr-defined]
        assert message.content is None
        assert [(t.function.name, t.function.arguments) for t in message.tool_calls] == [
            ("get_weather", '{"city": "Paris"}')]  # fmt: skip
        assert whole.choices[index].finish_reason == "tool_calls"
        deltas = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        thought = "".join(d.delta.model_dump().get("reasoning_content") or "" for d in deltas)
        assert thought == f"\n{thinking}\n"
        assert not "".join(d.delta.content or "" for d in deltas)
        calls = [t for d in deltas for t in d.delta.tool_calls or []]
        assert [t.function.name for t in calls if t.id] == ["get_weather"]
        last_thought = max(
            i for i, d in enumerate(deltas) if d.delta.model_dump().get("reasoning_content")
        )
        first_call = next(i for i, d in enumerate(deltas) if d.delta.tool_calls)
        assert last_thought < first_call  # the thinking goes out before the call
        assert deltas[-1].finish_reason == "tool_calls"


async def test_the_openapi_document_tells_of_reasoning(make_frontend: Any) -> None:
    fe = await make_frontend()
    async with fe.client() as client:
        models = (await client.get("/openapi.json")).json()["components"]["schemas"]
    request = models["ChatCompletionRequest"]["properties"]
    assert "enable_thinking" in request["chat_template_kwargs"]["description"]
    assert "include_reasoning" in request
    assert "reasoning_parser" in models["ChatResponseMessage"]["properties"][
        "reasoning_content"]["description"]  # fmt: skip
    assert "reasoning_content" in models["ChatMessage"]["properties"]
    # the streamed chunks' model is documented too (each event's JSON)
    assert "reasoning_content" in models["ChatDelta"]["properties"]
    assert "ChatCompletionChunk" in models


ANSWER_SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}},
                 "required": ["answer"], "additionalProperties": False}  # fmt: skip
AS_JSON = {"type": "json_schema", "json_schema": {"name": "sum", "schema": ANSWER_SCHEMA}}


async def test_a_constrained_answer_comes_after_free_thinking(
    make_frontend: Any, model_dir: Path
) -> None:
    """response_format with a reasoning model: the engine's grammar leaves the thinking free
    (greedy: the same thinking as unconstrained) and holds the answer after the block to the
    schema; streamed and whole agree."""
    fe = await make_frontend(chat_template=str(TEMPLATE), reasoning_parser="qwen3")
    tokenizer = TextTokenizer(model_dir, TEMPLATE)
    engine = TorchEngine(model_dir, num_blocks=256, model_name="smol")
    async with engine_worker(fe, engine), openai_client(fe) as client:
        thinking = (await engine_text(engine, tokenizer, None)).partition("</think>")[0]
        whole = (await client.chat.completions.create(**ASK, response_format=AS_JSON)).choices[0]
        assert whole.message.reasoning_content == thinking  # type: ignore[attr-defined]
        answer = json.loads(whole.message.content or "")
        assert set(answer) == {"answer"} and isinstance(answer["answer"], int)
        assert whole.finish_reason == "stop"

        thought = content = ""
        stream = await client.chat.completions.create(**ASK, response_format=AS_JSON, stream=True)
        async for chunk in stream:
            for choice in chunk.choices:
                thought += choice.delta.model_dump().get("reasoning_content") or ""
                content += choice.delta.content or ""
        assert (thought, content) == (thinking, whole.message.content)


async def test_engines_that_constrain_everything_get_no_thinking_block(
    make_frontend: Any, tokenizer: TextTokenizer
) -> None:
    """A worker declaring `guided_thinking` unsupported (TensorRT-LLM's guided decoding
    covers the whole output): the constraint goes as it was, and the answer is not split."""
    fe = await make_frontend(chat_template=str(TEMPLATE), reasoning_parser="qwen3")
    text = '{"answer": 7}'
    worker = await fe.add_worker(
        script=tokenizer.encode(text, add_special_tokens=False),
        unsupported_params=["guided_thinking"],
    )
    async with openai_client(fe) as client:
        reply = (await client.chat.completions.create(**ASK, response_format=AS_JSON)).choices[0]
    assert reply.message.content == text
    assert "reasoning_content" not in reply.message.model_dump(exclude_none=True)
    guided = worker.requests[-1].sampling.guided
    assert guided is not None and guided.thinking is None


async def test_a_forced_call_comes_after_the_thinking(
    make_frontend: Any, tokenizer: TextTokenizer
) -> None:
    """tool_choice naming a function with a reasoning model: the worker is sent the call's
    schema behind a thinking fence (the model opens its block itself: qwen3 with SmolLM2's
    template), and the answer's thinking and call come apart (a FAKE worker replays one)."""
    fe = await make_frontend(
        chat_template="chatml_tools", tool_call_parser="hermes", reasoning_parser="qwen3"
    )
    text = '<think>\nThe city is Paris.\n</think>\n\n{"city": "Paris"}'
    worker = await fe.add_worker(script=tokenizer.encode(text, add_special_tokens=False))
    named = {"type": "function", "function": {"name": "get_weather"}}
    ask = {"model": "smol", "messages": [{"role": "user", "content": "Weather in Paris?"}],
           "tools": WEATHER_TOOL, "tool_choice": named, "max_tokens": 200}  # fmt: skip
    async with openai_client(fe) as client:
        reply = (await client.chat.completions.create(**ask)).choices[0]
    guided = worker.requests[-1].sampling.guided
    assert guided is not None and guided.thinking is not None
    assert (guided.thinking.open, guided.thinking.close) == ("<think>", "</think>")
    assert reply.message.reasoning_content == "\nThe city is Paris.\n"  # type: ignore[attr-defined]
    assert [(c.function.name, json.loads(c.function.arguments))
            for c in reply.message.tool_calls] == [("get_weather", {"city": "Paris"})]  # fmt: skip


def responses_input() -> list[Any]:
    """FEW_SHOT as Responses items: each earlier answer's thinking as a reasoning item."""
    items: list[Any] = []
    for message in FEW_SHOT:
        thinking = message.get("reasoning_content") or message.get("reasoning")
        if thinking:
            items.append({"type": "reasoning", "summary": [],
                          "content": [{"type": "reasoning_text", "text": thinking}]})  # fmt: skip
        items.append({"role": message["role"], "content": message["content"]})
    return items


async def test_the_responses_api_answers_with_a_reasoning_item(
    make_frontend: Any, model_dir: Path
) -> None:
    """/v1/responses on the same deployment: the earlier reasoning items reach the template
    as chat's thinking does (the same greedy answer), the thinking comes back as a reasoning
    item before the message, streamed (reasoning_text events) and whole alike; effort is
    taken (the test template knows none)."""
    fe = await make_frontend(chat_template=str(TEMPLATE), reasoning_parser="qwen3")
    tokenizer = TextTokenizer(model_dir, TEMPLATE)
    engine = TorchEngine(model_dir, num_blocks=256, model_name="smol")
    ask = {"model": "smol", "input": responses_input(), "temperature": 0.0,
           "max_output_tokens": 40, "reasoning": {"effort": "low"}, "store": False}  # fmt: skip
    async with engine_worker(fe, engine), openai_client(fe) as client:
        thinking, _, answer = (await engine_text(engine, tokenizer, None)).partition("</think>")
        whole = await client.responses.create(**ask)
        assert [item.type for item in whole.output] == ["reasoning", "message"]
        reasoning = whole.output[0]
        assert reasoning.id.startswith("rs_") and reasoning.status == "completed"
        assert [part.text for part in reasoning.content or []] == [thinking]
        assert whole.output_text == answer.lstrip()

        kinds: list[str] = []
        async with client.responses.stream(**ask) as stream:
            async for event in stream:
                kinds.append(event.type)
            streamed = await stream.get_final_response()
        assert kinds.index("response.reasoning_text.done") < kinds.index(
            "response.output_text.delta")  # fmt: skip
        assert [item.type for item in streamed.output] == ["reasoning", "message"]
        assert streamed.output[0].content[0].text == thinking  # type: ignore[union-attr]
        assert streamed.output_text == whole.output_text


async def test_reasoning_settings_need_a_reasoning_deployment(make_frontend: Any) -> None:
    fe = await make_frontend()
    async with fe.client() as client:
        refused = await client.post(
            "/v1/responses", json={"input": "hi", "reasoning": {"effort": "high"}}
        )
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["param"] == "reasoning.effort" and "reasoning_parser" in error["message"]
