"""The tool-call formats of `frontend.tool_calls`: each format's calls and content, the
same result for every split of the text into streamed pieces, malformed calls kept as
content word for word, and parallel_tool_calls false keeping the first call."""

from __future__ import annotations

import json
from typing import Any

import pytest

from frontend.tool_calls import FORMATS, ToolCall, ToolCallStream, parse_tool_calls

WEATHER = {"city": "Paris", "unit": "celsius"}
TIME = {"zone": "CET"}

# format, generated text, expected content, expected [(name, arguments)]
CASES: list[tuple[str, str, str | None, list[tuple[str, dict[str, Any]]]]] = [
    (
        "hermes",
        "Let me check.\n<tool_call>\n"
        + json.dumps({"name": "get_weather", "arguments": WEATHER})
        + "\n</tool_call>",
        "Let me check.",
        [("get_weather", WEATHER)],
    ),
    (
        "hermes",
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": '
        '"celsius"}}</tool_call>\n<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}'
        "</tool_call>",
        None,
        [("get_weather", WEATHER), ("get_time", TIME)],
    ),
    (
        "hermes",
        '<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}',
        None,
        [("get_time", TIME)],
    ),  # unclosed at the end of the output: read up to there
    (
        "hermes",
        'A <tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call> then B',
        "A then B",
        [("get_time", TIME)],
    ),
    (
        "hermes",
        "No call here, just <tool text and a < sign.",
        "No call here, just <tool text and a < sign.",
        [],
    ),
    (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": '
        '"celsius"}}; {"name": "get_time", "parameters": {"zone": "CET"}}',
        None,
        [("get_weather", WEATHER), ("get_time", TIME)],
    ),
    (
        "llama3_json",
        '<|python_tag|>{"name": "get_time", "arguments": {"zone": "CET"}}',
        None,
        [("get_time", TIME)],
    ),
    ("llama3_json", "Paris is sunny {mostly}.", "Paris is sunny {mostly}.", []),
    (
        "mistral",
        'Sure. [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", '
        '"unit": "celsius"}}, {"name": "get_time", "arguments": {"zone": "CET"}}]',
        "Sure.",
        [("get_weather", WEATHER), ("get_time", TIME)],
    ),
    (
        "mistral",
        '[TOOL_CALLS]get_time[ARGS]{"zone": "CET"}[TOOL_CALLS]get_weather[ARGS]'
        '{"city": "Paris", "unit": "celsius"}',
        None,
        [("get_time", TIME), ("get_weather", WEATHER)],
    ),
    (
        "pythonic",
        '[get_weather(city="Paris", unit="celsius"), get_time(zone="CET")]',
        None,
        [("get_weather", WEATHER), ("get_time", TIME)],
    ),
    (
        "pythonic",
        '<|python_start|>[get_time(zone="CET")]<|python_end|>',
        None,
        [("get_time", TIME)],
    ),
    ("pythonic", "[1, 2] is a list", "[1, 2] is a list", []),
]
MALFORMED = [
    ("hermes", 'Hi <tool_call>{"name": "f", "arguments": {"a": 1}</tool_call> bye'),
    ("hermes", '<tool_call>{"arguments": {"a": 1}}</tool_call>'),  # no name
    ("hermes", '<tool_call>{"name": "f", "arguments": [1]}'),  # arguments not an object
    ("llama3_json", '{"name": "f", "parameters": {"a": 1}} and some words'),
    ("llama3_json", '{"title": "not a call"}'),
    ("mistral", "[TOOL_CALLS] not json at all"),
    ("pythonic", "[f(1, 2)]"),  # positional arguments
    ("pythonic", "[f(a=g())]"),  # not a literal
    ("pythonic", '[f(a="x"), g(b=1)'),  # unclosed
]


def calls_of(calls: list[ToolCall]) -> list[tuple[str, dict[str, Any]]]:
    return [(call.name, json.loads(call.arguments)) for call in calls]


def streamed(fmt: str, pieces: list[str]) -> tuple[str, list[ToolCall]]:
    stream = ToolCallStream(FORMATS[fmt])
    out = [p for piece in pieces for p in stream.feed(piece)] + stream.finish()
    content = "".join(p for p in out if isinstance(p, str))
    return content, [p for p in out if isinstance(p, ToolCall)]


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), CASES)
def test_each_format_gives_its_calls_and_the_content_outside_them(
    fmt: str, text: str, content: str | None, calls: list[tuple[str, dict[str, Any]]]
) -> None:
    got_content, got_calls = parse_tool_calls(FORMATS[fmt], text)
    assert got_content == content
    assert calls_of(got_calls) == calls
    assert all(c.id.startswith("call_") and len(c.id) == 29 for c in got_calls)
    assert len({c.id for c in got_calls}) == len(got_calls)


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), CASES)
def test_every_split_of_the_stream_gives_the_same_answer(
    fmt: str, text: str, content: str | None, calls: list[tuple[str, dict[str, Any]]]
) -> None:
    for cut in range(len(text) + 1):
        got, got_calls = streamed(fmt, [text[:cut], text[cut:]])
        assert (got or None if calls else got) == content, cut
        assert calls_of(got_calls) == calls, cut
    got, got_calls = streamed(fmt, list(text))  # one character at a time
    assert (got or None if calls else got) == content
    assert calls_of(got_calls) == calls


@pytest.mark.parametrize(("fmt", "text"), MALFORMED)
def test_a_malformed_call_stays_content_word_for_word(fmt: str, text: str) -> None:
    content, calls = parse_tool_calls(FORMATS[fmt], text)
    assert calls == [] and content == text
    for cut in range(len(text) + 1):
        assert streamed(fmt, [text[:cut], text[cut:]]) == (text, [])


def test_content_streams_before_a_call_ends_holding_only_a_possible_marker() -> None:
    stream = ToolCallStream(FORMATS["hermes"])
    assert stream.feed("The weather <tool") == ["The weather"]  # " <tool" may open a call
    assert stream.feed("s are") == [" <tools are"]  # it did not
    assert stream.feed(' here <tool_call>{"name": "f", "arguments": {}}') == [" here"]
    out = stream.feed("</tool_call> ok")
    assert isinstance(out[0], ToolCall) and out[0].name == "f" and out[0].arguments == "{}"
    assert out[1:] == [" ok"]  # one run of the whitespace around it stays between texts
    assert stream.finish() == []


def test_plain_text_passes_through_an_at_start_format_once_it_cannot_be_a_call() -> None:
    stream = ToolCallStream(FORMATS["llama3_json"])
    assert stream.feed("  ") == []
    assert stream.feed("<|py") == []
    assert stream.feed("x") == ["  <|pyx"]
    assert stream.feed(" {") == [" {"]


def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    text = CASES[1][1]
    content, calls = parse_tool_calls(FORMATS["hermes"], text, max_calls=1)
    assert content is None and calls_of(calls) == [("get_weather", WEATHER)]


def test_stream_deltas_rebuild_the_call() -> None:
    call = ToolCall("get_time", '{"zone": "CET"}')
    first, second = call.stream_deltas(2)
    assert first["index"] == second["index"] == 2
    assert first["id"] == call.id and first["function"]["name"] == "get_time"
    assert first["function"]["arguments"] + second["function"]["arguments"] == call.arguments
