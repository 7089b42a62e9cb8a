"""Bad input, at random: every body the generation endpoints receive gets an answer (a
response, or a 4xx in the OpenAI error shape), never a 500, a hang or a request the router
keeps counting. The bodies are valid requests with a few fields replaced by values of the
wrong type, range or shape (seeded, so a failure repeats); a FAKE worker answers."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import httpx
import pytest
from real_workers import mocker_worker

from tests.frontend.test_frontend_integration import sse_events

pytestmark = pytest.mark.integration

ROUNDS_PER_ENDPOINT = 300

# values of every JSON type and the edges the parsers meet: huge and negative numbers,
# empty and control-character strings, nested and mixed lists
ODD_VALUES: list[Any] = [
    None, True, False, 0, 1, -1, 2, 17, 2**31, 2**63, -(2**63), 1e308, -0.5, 0.5, 3.5,
    "", "x", "\u0000", "😀" * 3, "a" * 5000, [], [None], [1], [1, "a"], [[1], "a"], [[]],
    [{}], ["stop"] * 5, {}, {"a": 1}, {"type": "json_object"}, {"include_usage": "yes"},
    [{"role": "user"}], [{"role": "user", "content": [{"type": "text"}]}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ""}}]}],
    # tool calling and constrained output: shapes that are nearly right
    "required", "auto", "none", "(", "[a-z]+", ["a", "b"],
    {"type": "function", "function": {"name": "f"}}, {"name": "f"},
    [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}],
    [{"name": "f"}], [{"type": "function"}],
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer"}}},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
    {"type": "object", "properties": {"a": {"type": "string"}}},
    [{"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function",
      "function": {"name": "f", "arguments": "{"}}]}],
    [{"role": "tool", "content": "x"}], [{"role": "function", "name": "f", "content": "1"}],
    # reasoning: template variables (one that clobbers a template helper), earlier thinking
    {"enable_thinking": False}, {"raise_exception": 1}, {"messages": []}, {"tools": 1},
    [{"role": "assistant", "content": "x", "reasoning_content": 5}],
    [{"role": "assistant", "content": "x", "reasoning": "y"}, {"role": "user", "content": "z"}],
    # /v1/responses: items, flat tools, text formats, stored ids that are nearly right
    [{"role": "user", "content": [{"type": "input_text"}]}],
    [{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}],
    [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}],
    [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{"}],
    [{"type": "function_call_output", "call_id": "c", "output": 5}],
    [{"type": "reasoning"}], [{"type": "message", "role": "assistant",
                               "content": [{"type": "output_text", "text": "hi"}]}],
    [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
    [{"type": "web_search"}], {"type": "function", "name": "f"},
    {"format": {"type": "json_object"}}, {"format": {"type": "json_schema", "name": "x"}},
    {"format": {"type": "json_schema", "name": "x", "schema": {"type": "integer"}}},
    {"verbosity": "low"}, {"effort": "low"}, "disabled", ["message.output_text.logprobs"],
    "resp_" + "0" * 32, "resp_x", {"k": "v"},
]  # fmt: skip

SAMPLING_FIELDS = [
    "model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stream", "stop",
    "seed", "logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty",
    "stream_options", "ignore_eos", "user", "best_of", "logit_bias", "min_tokens",
    "response_format", "guided_json", "guided_regex", "guided_choice",
]  # fmt: skip
FIELDS = {
    "chat/completions": [
        *SAMPLING_FIELDS, "messages", "max_completion_tokens", "top_logprobs", "tools",
        "tool_choice", "functions", "function_call", "parallel_tool_calls",
        "chat_template_kwargs", "include_reasoning",
    ],
    "completions": [*SAMPLING_FIELDS, "prompt", "echo", "suffix"],
    "responses": [
        "model", "input", "instructions", "max_output_tokens", "temperature", "top_p",
        "tools", "tool_choice", "parallel_tool_calls", "text", "stream", "store",
        "previous_response_id", "metadata", "user", "top_logprobs", "include", "truncation",
        "background", "reasoning",
    ],
    "embeddings": [
        "model", "input", "encoding_format", "dimensions", "user", "truncate_prompt_tokens",
        "add_special_tokens",
    ],
}  # fmt: skip


def valid_body(endpoint: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "smol", "max_tokens": 3}
    if endpoint == "responses":
        return {"model": "smol", "input": "Say hello", "max_output_tokens": 3}
    if endpoint == "embeddings":
        return {"model": "smol", "input": ["Say hello", "and goodbye"]}
    if endpoint == "chat/completions":
        body["messages"] = [{"role": "user", "content": "Say hello"}]
    else:
        body["prompt"] = "Say hello"
    return body


def odd_body(endpoint: str, rng: random.Random) -> dict[str, Any]:
    """A valid body with one to three fields set to odd values (or removed)."""
    body = valid_body(endpoint)
    for _ in range(rng.randint(1, 3)):
        field = rng.choice(FIELDS[endpoint])
        if rng.random() < 0.1:
            body.pop(field, None)
        else:
            body[field] = rng.choice(ODD_VALUES)
    return body


def assert_answered(response: httpx.Response, body: dict[str, Any]) -> None:
    """A complete response, or a 4xx whose body is OpenAI's error object."""
    where = f"body {json.dumps(body)[:300]}: {response.status_code} {response.text[:300]}"
    assert response.status_code < 500, where
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, where
        assert isinstance(error["message"], str) and error["message"], where
        assert isinstance(error["type"], str) and error["type"], where
        return
    streamed = response.headers["content-type"].startswith("text/event-stream")
    if endpoint_of(response) == "responses":  # typed events; the last one ends the response
        if streamed:
            last = response.text.strip().rsplit("\n\n", 1)[-1]
            assert last.split("\n")[0] in ("event: response.completed",
                                            "event: response.incomplete"), where  # fmt: skip
        else:
            assert response.json()["object"] == "response", where
        return
    if endpoint_of(response) == "embeddings":
        data = response.json()["data"]
        assert data and all(item["object"] == "embedding" for item in data), where
        return
    if streamed:
        assert sse_events(response.text)[-1] == "[DONE]", where
    else:
        assert response.json()["choices"], where


def endpoint_of(response: httpx.Response) -> str:
    return response.request.url.path.removeprefix("/v1/")


@pytest.mark.parametrize(
    ("endpoint", "tool_calling"),
    [("chat/completions", False), ("chat/completions", True), ("completions", False),
     ("responses", False), ("responses", True)],
)  # fmt: skip
async def test_odd_bodies_get_an_answer_or_an_openai_error(
    make_frontend: Any, endpoint: str, tool_calling: bool
) -> None:
    """`tool_calling`: the deployment parses calls (hermes, the shipped chatml_tools
    template) and thinking (qwen3), so tools and tool history reach the template instead of
    a refusal."""
    settings = {
        "tool_call_parser": "hermes", "chat_template": "chatml_tools", "reasoning_parser": "qwen3"
    }  # fmt: skip
    fe = await make_frontend(**(settings if tool_calling else {}))
    await fe.add_worker(max_model_len=256)
    rng = random.Random(f"odd-bodies-{endpoint}-{tool_calling}")
    statuses: dict[int, int] = {}
    async with fe.client(timeout=20) as client:
        for _ in range(ROUNDS_PER_ENDPOINT):
            body = odd_body(endpoint, rng)
            response = await client.post(f"/v1/{endpoint}", json=body)
            assert_answered(response, body)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        # both kinds were exercised: answers and refusals
        assert statuses.get(200, 0) > 0 and sum(statuses.values()) > statuses.get(200, 0)
        # nothing is left counted in flight: every refused or answered request was let go
        health = (await client.get("/health")).json()
        assert set(health["in_flight"].values()) == {0}, health


async def test_odd_embedding_bodies_get_an_answer_or_an_openai_error(
    make_frontend: Any, model_dir: Path
) -> None:
    """The same for /v1/embeddings on an embed deployment, the mocker answering (simulated
    vectors): inputs of every odd shape, encodings, dimensions, truncation."""
    fe = await make_frontend(model_settings={"task": "embed"})
    rng = random.Random("odd-bodies-embeddings")
    statuses: dict[int, int] = {}
    async with mocker_worker(fe, model_dir), fe.client(timeout=20) as client:
        for _ in range(ROUNDS_PER_ENDPOINT):
            body = odd_body("embeddings", rng)
            response = await client.post("/v1/embeddings", json=body)
            assert_answered(response, body)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert statuses.get(200, 0) > 0 and sum(statuses.values()) > statuses.get(200, 0)
        health = (await client.get("/health")).json()
        assert set(health["in_flight"].values()) == {0}, health
