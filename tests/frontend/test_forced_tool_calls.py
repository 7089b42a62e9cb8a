"""Calls forced by tool_choice ("required", a named function) end to end: the real frontend
(uvicorn, etcd, nats-server) with no tool_call_parser and SmolLM2's own template (which
shows the model no tools), the official openai client, and a real worker serving the real
SmolLM2-135M `TorchEngine`, whose output is constrained to the call's JSON
(`frontend.tool_calling.forced_call_schema`, llguidance in the engine). Sampled at
temperature 1, every answer must still be a valid call. Then the refusals: a second
constraint, unusable parameters, and an engine that cannot constrain (the mocker)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest
from real_workers import engine_worker, mocker_worker, openai_client

from mpi_workers.engine.torch.engine import TorchEngine

pytestmark = [pytest.mark.integration, pytest.mark.model]


def function(name: str, properties: dict[str, Any]) -> dict[str, Any]:
    parameters = {"type": "object", "properties": properties, "required": list(properties),
                  "additionalProperties": False}  # fmt: skip
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


CITIES = ["Paris", "Rome", "Berlin"]
TOOLS = [
    function("get_weather", {"city": {"type": "string", "enum": CITIES}}),
    function("get_time", {"zone": {"type": "string", "enum": ["CET", "UTC"]},
                          "hours": {"type": "integer", "minimum": 0, "maximum": 23}}),
]  # fmt: skip
ASK: dict[str, Any] = {
    "model": "smol",
    "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
    "tools": TOOLS,
    "max_tokens": 120,
}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def check_call(name: str, arguments: str) -> None:
    """`arguments` are valid for the function `name` (by hand: the schemas are small)."""
    values = json.loads(arguments)
    if name == "get_weather":
        assert set(values) == {"city"} and values["city"] in CITIES, values
    else:
        assert name == "get_time", name
        assert set(values) == {"zone", "hours"} and values["zone"] in ("CET", "UTC"), values
        assert isinstance(values["hours"], int) and 0 <= values["hours"] <= 23, values


async def test_forced_calls_are_valid_calls_streamed_or_not(
    make_frontend: Any, model_dir: Path
) -> None:
    fe = await make_frontend()
    engine = TorchEngine(model_dir, num_blocks=256, model_name="smol")
    async with engine_worker(fe, engine), openai_client(fe) as client:
        create = client.chat.completions.create
        # named: the output is that function's arguments; finish "stop", as OpenAI's API
        named = await create(tool_choice=NAMED, n=3, temperature=1.0, seed=7, **ASK)
        for choice in named.choices:
            assert choice.finish_reason == "stop"
            assert not choice.message.content
            (call,) = choice.message.tool_calls
            assert call.id.startswith("call_") and call.type == "function"
            assert call.function.name == "get_weather"
            check_call(call.function.name, call.function.arguments)

        # required: one or more calls of the offered functions; finish "tool_calls"
        required = await create(tool_choice="required", n=3, temperature=1.0, seed=11, **ASK)
        for choice in required.choices:
            if choice.finish_reason == "length":  # a sampled list may run on: no calls then
                assert choice.message.tool_calls is None
                continue
            assert choice.finish_reason == "tool_calls"
            assert choice.message.tool_calls
            for call in choice.message.tool_calls:
                check_call(call.function.name, call.function.arguments)
        assert any(c.finish_reason == "tool_calls" for c in required.choices)

        # parallel_tool_calls false: exactly one call (the constraint allows one)
        single = await create(
            tool_choice="required", parallel_tool_calls=False, n=2, temperature=1.0, seed=3,
            **ASK,
        )  # fmt: skip
        for choice in single.choices:
            assert choice.finish_reason == "tool_calls"
            (call,) = choice.message.tool_calls
            check_call(call.function.name, call.function.arguments)

        # streamed: the client's own accumulation rebuilds the same call as the whole answer
        greedy = {**ASK, "temperature": 0.0}
        whole = await create(tool_choice=NAMED, **greedy)
        async with client.chat.completions.stream(tool_choice=NAMED, **greedy) as stream:
            streamed = await stream.get_final_completion()
        (w_call,) = whole.choices[0].message.tool_calls
        (s_call,) = streamed.choices[0].message.tool_calls
        assert (s_call.function.name, s_call.function.arguments) == (
            w_call.function.name, w_call.function.arguments)  # fmt: skip
        assert streamed.choices[0].finish_reason == "stop"

        # the legacy form: function_call naming a function
        legacy = await create(
            model="smol", messages=ASK["messages"], max_tokens=120, temperature=0.0,
            functions=[t["function"] for t in TOOLS], function_call={"name": "get_time"},
        )  # fmt: skip
        message = legacy.choices[0].message
        assert message.function_call is not None and message.function_call.name == "get_time"
        check_call("get_time", message.function_call.arguments)


async def test_forced_calls_refused_where_they_cannot_be_served(
    make_frontend: Any, model_dir: Path
) -> None:
    fe = await make_frontend()
    async with mocker_worker(fe, model_dir), openai_client(fe) as client:
        create = client.chat.completions.create
        cases: list[tuple[dict[str, Any], str, str]] = [
            # a second constraint beside the call's own
            ({"tool_choice": "required", "response_format": {"type": "json_object"}},
             "tool_choice", "constrains the output already"),
            # parameters no grammar can follow
            ({"tool_choice": NAMED, "tools": [function("get_weather", {"city": {"type": 5}})]},
             "tools", "not a usable JSON Schema"),
            # the simulated engine cannot constrain its output
            ({"tool_choice": "required"}, "tool_choice", "does not support constrained output"),
            ({"tool_choice": NAMED}, "tool_choice", "the mocker engine"),
        ]  # fmt: skip
        for fields, param, words in cases:
            for stream in (False, True):
                with pytest.raises(openai.BadRequestError) as caught:
                    await create(**{**ASK, **fields, "stream": stream})
                assert caught.value.param == param, caught.value.message
                assert words in caught.value.message, caught.value.message
