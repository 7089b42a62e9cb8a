"""/v1/responses with the real SmolLM2-135M `TorchEngine` behind the real frontend (uvicorn,
etcd, nats-server) and the official openai client: greedy answers equal the chat
endpoint's for the same conversation (streamed and not), a function call and its result
round trip through `previous_response_id` (stored in etcd) with the hermes parser, and a
json_schema text format gives JSON that follows the schema. One model for the module's
one test (loading it is most of the time)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from guided_schemas import PERSON, check_person
from real_workers import engine_worker, openai_client

from mpi_workers.engine.torch.engine import TorchEngine

pytestmark = [pytest.mark.integration, pytest.mark.model]

TOOL_FRONTEND = {"tool_call_parser": "hermes", "chat_template": "chatml_tools"}
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"name": "get_weather", "description": "the weather in a city", "parameters": CITY}
CHAT_TOOLS: list[Any] = [{"type": "function", "function": WEATHER}]
TOOLS: list[Any] = [{"type": "function", **WEATHER}]


def asked(city: str) -> dict[str, Any]:
    return {"role": "user", "content": f"What is the weather in {city}?"}


def earlier_call(city: str, number: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """An earlier call for `city`, as chat's assistant turn and as a Responses item."""
    arguments = json.dumps({"city": city})
    chat = {"role": "assistant", "content": None, "tool_calls": [
        {"id": f"call_{number}", "type": "function",
         "function": {"name": "get_weather", "arguments": arguments}}]}  # fmt: skip
    item = {"type": "function_call", "call_id": f"call_{number}", "name": "get_weather",
            "arguments": arguments}  # fmt: skip
    return chat, item


BERLIN, ROME = earlier_call("Berlin", 1), earlier_call("Rome", 2)
# two earlier questions answered by calls: the 135M model then calls for Paris too
CHAT_FEW_SHOT = [asked("Berlin"), BERLIN[0], asked("Rome"), ROME[0], asked("Paris")]
FEW_SHOT = [asked("Berlin"), BERLIN[1], asked("Rome"), ROME[1], asked("Paris")]


async def test_responses_match_chat_call_tools_and_follow_schemas(
    make_frontend: Any, model_dir: Path
) -> None:
    fe = await make_frontend(**TOOL_FRONTEND)
    engine = TorchEngine(model_dir, num_blocks=256, model_name="smol")
    async with engine_worker(fe, engine), openai_client(fe) as client:
        # plain text, greedy: the same answer as chat's, whole and streamed
        messages = [{"role": "system", "content": "You are terse."},
                    {"role": "user", "content": "Name three colours."}]  # fmt: skip
        chat = await client.chat.completions.create(
            model="smol", messages=messages, temperature=0.0, max_tokens=30)  # type: ignore[arg-type]  # fmt: skip
        ask = {"model": "smol", "instructions": "You are terse.", "temperature": 0.0,
               "input": "Name three colours.", "max_output_tokens": 30}  # fmt: skip
        whole = await client.responses.create(**ask)
        events = [e async for e in await client.responses.create(stream=True, **ask)]
        text = chat.choices[0].message.content
        assert text and whole.output_text == text
        final = events[-1].response
        assert final.output[0].content[0].text == text
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == text
        assert whole.usage.input_tokens == chat.usage.prompt_tokens
        assert whole.usage.output_tokens == chat.usage.completion_tokens
        assert whole.status == ("incomplete" if chat.choices[0].finish_reason == "length"
                                else "completed")  # fmt: skip

        # a function call, then its result through previous_response_id (etcd)
        tool_ask = {"model": "smol", "tools": TOOLS, "temperature": 0.0, "max_output_tokens": 40}
        called = await client.responses.create(input=FEW_SHOT, **tool_ask)
        (call,) = called.output
        assert call.type == "function_call" and call.name == "get_weather"
        assert json.loads(call.arguments) == {"city": "Paris"}
        assert called.store is True
        async with client.responses.stream(input=FEW_SHOT, **tool_ask) as stream:
            streamed = await stream.get_final_response()
        (s_call,) = streamed.output
        assert (s_call.name, s_call.arguments) == (call.name, call.arguments)
        result = {"type": "function_call_output", "call_id": call.call_id,
                  "output": "cloudy, 18 C"}  # fmt: skip
        reply = await client.responses.create(
            input=[result], previous_response_id=called.id, **tool_ask)  # fmt: skip
        # the chat endpoint, given the same history, answers the same
        chat_call = {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.call_id, "type": "function",
             "function": {"name": call.name, "arguments": call.arguments}}]}  # fmt: skip
        answer = {"role": "tool", "tool_call_id": call.call_id, "content": "cloudy, 18 C"}
        history = [*CHAT_FEW_SHOT, chat_call, answer]
        chat_reply = await client.chat.completions.create(
            model="smol", messages=history, tools=CHAT_TOOLS, temperature=0.0, max_tokens=40)  # type: ignore[arg-type]  # fmt: skip
        assert reply.output_text == chat_reply.choices[0].message.content
        assert "cloudy" in reply.output_text  # it read the tool's answer
        assert reply.usage.input_tokens == chat_reply.usage.prompt_tokens

        # json_schema: the text parses and follows the schema
        shaped = await client.responses.create(
            model="smol", temperature=0.0, max_output_tokens=150, store=False,
            input="Describe a person as JSON: name, age, role, address, tags.",
            text={"format": {"type": "json_schema", "name": "person", "schema": PERSON,
                             "strict": True}},
        )  # fmt: skip
        assert shaped.status == "completed"
        check_person(json.loads(shaped.output_text))
