"""Constrained output through the real frontend (uvicorn, etcd, nats-server) and the official
`openai` client: `response_format` json_object / json_schema (and vLLM's guided_* fields)
served by a real `Worker` running the real SmolLM2 `TorchEngine`, greedy and sampled at
temperature 1, streamed and not, n = 2; a bad schema is a 400 naming it; a fake worker
receives the constraint in the contract; the mocker refuses it by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest
from guided_schemas import PERSON, check_person
from real_workers import engine_worker, mocker_worker, openai_client

from mpi_workers.engine.torch.engine import TorchEngine

pytestmark = pytest.mark.integration

SCHEMA = PERSON
SCHEMA_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "person", "schema": SCHEMA, "strict": True},
}
MESSAGES: list[Any] = [
    {"role": "user", "content": "Describe a person as JSON: name, age, role, address, tags."}
]


def check_text(text: str) -> None:
    """The text parses and follows SCHEMA."""
    check_person(json.loads(text))


@pytest.mark.model
async def test_json_schema_and_json_object_from_the_real_engine(
    make_frontend: Any, model_dir: Path
) -> None:
    fe = await make_frontend()
    engine = TorchEngine(model_dir, num_blocks=256, model_name="smol")
    async with engine_worker(fe, engine), openai_client(fe) as client:
        chat = client.chat.completions.create
        for temperature in (0.0, 1.0):
            answer = await chat(model="smol", messages=MESSAGES, max_tokens=150, n=2,
                                temperature=temperature, response_format=SCHEMA_FORMAT)  # type: ignore[arg-type]  # fmt: skip
            assert len(answer.choices) == 2
            for choice in answer.choices:
                assert choice.finish_reason == "stop"
                check_text(choice.message.content or "")
        # streamed, sampled: the pieces join into a valid document
        stream = await chat(model="smol", messages=MESSAGES, max_tokens=150, temperature=1.0,
                            stream=True, n=2, response_format=SCHEMA_FORMAT)  # type: ignore[arg-type]  # fmt: skip
        texts: dict[int, str] = {0: "", 1: ""}
        finish: dict[int, str | None] = {}
        async for chunk in stream:
            for c in chunk.choices:
                texts[c.index] += c.delta.content or ""
                finish[c.index] = c.finish_reason or finish.get(c.index)
        assert finish == {0: "stop", 1: "stop"}
        for text in texts.values():
            check_text(text)
        # json_object on /v1/completions, sampled
        answer = await client.completions.create(
            model="smol", prompt="A JSON object describing a cat: ", max_tokens=150,
            temperature=1.0, n=2, seed=3, extra_body={"response_format": {"type": "json_object"}},
        )  # fmt: skip
        for choice in answer.choices:
            if choice.finish_reason == "stop":
                assert isinstance(json.loads(choice.text), dict)
            else:  # the budget ran out in a free-form object: still a prefix of one
                assert choice.finish_reason == "length" and choice.text.startswith("{")
        # the OpenAI client's typed parse, and vLLM's guided_choice
        parsed = await client.beta.chat.completions.parse(
            model="smol", messages=MESSAGES, max_tokens=150, temperature=0.0,
            response_format=SCHEMA_FORMAT,  # type: ignore[arg-type]
        )  # fmt: skip
        check_text(parsed.choices[0].message.content or "")
        picked = await chat(model="smol", messages=MESSAGES, max_tokens=10, temperature=1.0,
                            extra_body={"guided_choice": ["yes", "no way"]})  # fmt: skip
        assert picked.choices[0].message.content in ("yes", "no way")
        assert picked.choices[0].finish_reason == "stop"


async def test_bad_constraints_are_400_naming_the_field(make_frontend: Any) -> None:
    fe = await make_frontend()
    worker = await fe.add_worker()
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}
    async with openai_client(fe) as client:
        for fields, param, words in (
            ({"response_format": bad_schema}, "response_format.json_schema.schema", "frob"),
            ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
            ({"response_format": {"type": "grammar"}}, "response_format.type", "json_object"),
            ({"guided_regex": "a(b"}, "guided_regex", "unclosed group"),
            ({"guided_json": {"type": "object"}, "guided_choice": ["a"]}, "guided_choice", "one"),
        ):
            for stream in (False, True):
                with pytest.raises(openai.BadRequestError) as caught:
                    await client.chat.completions.create(
                        model="smol", messages=MESSAGES, max_tokens=2, stream=stream,
                        extra_body=fields,
                    )  # fmt: skip
                assert caught.value.param == param, caught.value.body
                assert words in caught.value.message
            with pytest.raises(openai.BadRequestError) as caught:
                await client.completions.create(
                    model="smol", prompt="hi", max_tokens=2, extra_body=fields
                )
            assert caught.value.param == param
    assert not worker.requests


async def test_the_constraint_reaches_the_worker_in_the_contract(make_frontend: Any) -> None:
    fe = await make_frontend()
    worker = await fe.add_worker()
    async with openai_client(fe) as client:
        await client.chat.completions.create(
            model="smol", messages=MESSAGES, max_tokens=2, response_format=SCHEMA_FORMAT  # type: ignore[arg-type]
        )
        await client.completions.create(
            model="smol", prompt="hi", max_tokens=2,
            extra_body={"response_format": {"type": "json_object"}},
        )  # fmt: skip
        await client.completions.create(
            model="smol", prompt="hi", max_tokens=2, extra_body={"guided_regex": "[0-9]+"}
        )
    first, second, third = (request.sampling.guided for request in worker.requests)
    assert first is not None and first.kind == "json_schema"
    assert json.loads(first.spec) == SCHEMA
    assert second is not None and second.kind == "json_object"
    assert third is not None and (third.kind, third.spec) == ("regex", "[0-9]+")


async def test_the_mocker_refuses_constrained_output_naming_it(
    make_frontend: Any, model_dir: Path
) -> None:
    fe = await make_frontend()
    async with mocker_worker(fe, model_dir), openai_client(fe) as client:
        for fields in ({"response_format": {"type": "json_object"}}, {"guided_regex": "[0-9]"}):
            with pytest.raises(openai.BadRequestError) as caught:
                await client.chat.completions.create(
                    model="smol", messages=MESSAGES, max_tokens=2, extra_body=fields
                )
            assert caught.value.param == "response_format"
            assert "mocker engine" in caught.value.message
        answer = await client.chat.completions.create(
            model="smol", messages=MESSAGES, max_tokens=2,
            extra_body={"response_format": {"type": "text"}},
        )  # fmt: skip
        assert answer.choices[0].message.content
