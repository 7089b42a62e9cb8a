"""OpenAI fields hpcserve does not implement are refused by name, never silently ignored;
logit_bias and min_tokens are checked at the frontend and reach the worker. The frontend
runs against real etcd and nats-server with FAKE workers (they record what arrives), and a
real MockerEngine worker for the refusal its card declares."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest
from real_workers import mocker_worker
from test_frontend_integration import CHAT, assert_error, sse_events

from contract.messages import MAX_LOGIT_BIAS

pytestmark = pytest.mark.integration

MESSAGES: list[Any] = [{"role": "user", "content": "Say hello"}]
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
FUNCTION = TOOL["function"]
TOOL_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}


def client_of(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)


NOT_YET = ("hpcserve does not support", "yet")
TOOLS_OFF = ("tool calling is off", "set frontend.tool_call_parser")


async def refused(call: Any, param: str, words: tuple[str, ...] = NOT_YET) -> str:
    """The message of the 400 `call` must get, which names `param` and says `words`."""
    with pytest.raises(openai.BadRequestError) as caught:
        await call
    error = caught.value
    assert error.status_code == 400
    assert error.param == param, error.body
    assert all(word in error.message for word in words), error.message
    return error.message


async def test_tool_calling_is_refused_naming_the_field(
    make_frontend: Any,
) -> None:
    """Through the official client (chat: OpenAI's completions have no tools): the worker
    never sees such a request."""
    fe = await make_frontend()
    worker = await fe.add_worker()
    async with client_of(fe.base_url) as client:
        await refuse_each(client)
    assert not worker.requests


async def refuse_each(client: openai.AsyncOpenAI) -> None:
    chat = client.chat.completions.create
    cases: list[tuple[dict[str, Any], str, tuple[str, ...]]] = [
        # no frontend.tool_call_parser on this deployment: tools are refused, naming it
        ({"tools": [TOOL]}, "tools", TOOLS_OFF),
        ({"tools": [TOOL], "tool_choice": "auto"}, "tools", TOOLS_OFF),
        ({"functions": [FUNCTION]}, "functions", TOOLS_OFF),
        ({"functions": [FUNCTION], "function_call": "auto"}, "functions", TOOLS_OFF),
        # wrong whatever the deployment
        ({"tool_choice": "required"}, "tool_choice", ('"required" needs tools',)),
        ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "x"}}},
         "tool_choice", ("'x', which is not in tools",)),
    ]  # fmt: skip
    for fields, param, words in cases:
        for stream in (False, True):
            await refused(
                chat(model="smol", messages=MESSAGES, max_tokens=2, stream=stream, **fields),
                param,
                words,
            )


async def test_tool_call_history_is_refused_naming_the_message_field(make_frontend: Any) -> None:
    """Without tool calling on the deployment, a history holding tool calls or results is
    refused (the template would drop the calls), naming the setting that enables it."""
    fe = await make_frontend()
    worker = await fe.add_worker()
    asked = {"role": "user", "content": "Weather in Paris?"}
    called = {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]}
    answered = {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}
    legacy = {"role": "assistant", "content": None,
              "function_call": {"name": "get_weather", "arguments": "{}"}}  # fmt: skip
    async with client_of(fe.base_url) as client:
        for messages, param in (
            ([asked, called], "messages.1.tool_calls"),
            ([asked, answered], "messages.1.role"),
            ([asked, legacy], "messages.1.function_call"),
        ):
            create = client.chat.completions.create
            await refused(create(model="smol", messages=messages, max_tokens=2), param, TOOLS_OFF)
    assert not worker.requests


async def test_harmless_and_neutral_fields_stay_accepted(make_frontend: Any) -> None:
    """What changes nothing in the output: no tools, tool_choice "none" (tools then unused),
    "auto" with no tools, response_format "text", and fields hpcserve has no use for."""
    fe = await make_frontend()
    worker = await fe.add_worker()
    async with client_of(fe.base_url) as client:
        await accept_each(client)
    assert len(worker.requests) == 7


async def accept_each(client: openai.AsyncOpenAI) -> None:
    for fields in (
        {"tools": []},
        {"tools": [TOOL], "tool_choice": "none"},
        {"functions": [FUNCTION], "function_call": "none"},
        {"tool_choice": "auto"},
        {"response_format": {"type": "text"}},
        {"user": "u", "store": False, "metadata": {"k": "v"}, "service_tier": "auto",
         "parallel_tool_calls": False},
    ):  # fmt: skip
        answer = await client.chat.completions.create(
            model="smol", messages=MESSAGES, max_tokens=2, **fields
        )
        assert answer.choices[0].message.tool_calls is None
    answer = await client.completions.create(
        model="smol", prompt="hi", max_tokens=2, extra_body={"response_format": {"type": "text"}}
    )
    assert answer.choices[0].text


async def test_logit_bias_and_min_tokens_are_checked_and_reach_the_worker(
    make_frontend: Any,
) -> None:
    fe = await make_frontend()
    worker = await fe.add_worker(max_model_len=64)
    vocab = fe.app.state.frontend.tokenizer.vocab_size
    async with fe.client() as client:
        too_many = {str(t): 1.0 for t in range(MAX_LOGIT_BIAS + 1)}
        for endpoint in ("chat", "completions"):
            base = CHAT if endpoint == "chat" else {"model": "smol", "prompt": "Say hello"}
            path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
            for body, param, code in (
                ({"logit_bias": {str(vocab): 5}}, "logit_bias", None),
                ({"logit_bias": {"-1": 5}}, "logit_bias", None),
                ({"logit_bias": {"42": 100.5}}, "logit_bias", None),
                ({"logit_bias": {"42": -101}}, "logit_bias", None),
                ({"logit_bias": too_many}, "logit_bias", None),
                ({"min_tokens": -1}, "min_tokens", None),
                ({"min_tokens": 5, "max_tokens": 4}, "min_tokens", None),
                # no max_tokens: the context leaves too few tokens for min_tokens
                ({"min_tokens": 63}, "min_tokens", "context_length_exceeded"),
            ):
                response = await client.post(path, json={**base, **body})
                error = assert_error(response, 400, param, code)
                assert param in error["message"]
            response = await client.post(path, json={**base, "logit_bias": {"x": 1}})
            assert response.status_code == 400 and "logit_bias" in response.json()["error"]["param"]
        assert not worker.requests
        bias = {"42": 100.0, str(vocab - 1): -100.0, "7": 2.5}
        for path, body in (
            ("/v1/chat/completions", {**CHAT, "max_tokens": 6}),
            ("/v1/completions", {"model": "smol", "prompt": "Say hello", "max_tokens": 6}),
        ):
            body = {**body, "logit_bias": bias, "min_tokens": 3}
            response = await client.post(path, json=body)
            assert response.status_code == 200, response.text
    assert len(worker.requests) == 2
    for request in worker.requests:  # over the wire as JSON: the ids are ints again
        assert request.sampling.logit_bias == {42: 100.0, vocab - 1: -100.0, 7: 2.5}
        assert request.sampling.min_tokens == 3 and request.sampling.max_tokens == 6


async def test_the_mocker_refuses_logit_bias_naming_it(
    make_frontend: Any, model_dir: Path
) -> None:
    """A real simulated worker: it has no distribution to bias and says so in its card, so
    the frontend answers 400 naming logit_bias; min_tokens it honours (its pseudo tokens
    never end an output before max_tokens)."""
    fe = await make_frontend()
    async with mocker_worker(fe, model_dir), client_of(fe.base_url) as client:
        await mocker_refuses_logit_bias(client)


async def mocker_refuses_logit_bias(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(
            model="smol", messages=MESSAGES, max_tokens=4, logit_bias={"42": 10}
        )
    assert caught.value.param == "logit_bias"
    assert "mocker engine" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        await client.completions.create(
            model="smol", prompt="hi", max_tokens=4, logit_bias={"42": 10}
        )
    assert caught.value.param == "logit_bias"
    answer = await client.chat.completions.create(
        model="smol", messages=MESSAGES, max_tokens=5, extra_body={"min_tokens": 5}
    )
    assert answer.usage is not None and answer.usage.completion_tokens == 5


async def test_stop_strings_wait_for_min_tokens(make_frontend: Any) -> None:
    """vLLM's rule: the text of the first min_tokens tokens is not matched against stop
    strings. The fake worker writes its script (" STOP" in its middle), then EOS."""
    fe = await make_frontend()
    await fe.add_worker(tokens_per_chunk=3)
    tokenizer = fe.app.state.frontend.tokenizer
    script_text = tokenizer.decode(fe.script)
    before_stop = "Hello there! 😀 世界 is 'world'."
    assert script_text.startswith(before_stop + " STOP here")
    past_stop = len(tokenizer.encode(before_stop + " STOP here", add_special_tokens=False))
    async with fe.client() as client:
        for stream in (False, True):
            for min_tokens, expected in (
                (0, before_stop),
                (2, before_stop),
                (past_stop, script_text),
            ):
                body = {**CHAT, "stop": [" STOP"], "min_tokens": min_tokens, "stream": stream}
                response = await client.post("/v1/chat/completions", json=body)
                assert response.status_code == 200, response.text
                if stream:
                    events = sse_events(response.text)[:-1]
                    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
                else:
                    text = response.json()["choices"][0]["message"]["content"]
                assert text == expected, (min_tokens, stream)
