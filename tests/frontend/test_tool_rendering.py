"""Tools and tool history through the chat template: the shipped chatml_tools template
(functions in the system turn, earlier calls as <tool_call> blocks, tool answers as
<tool_response> blocks in one user turn), the legacy function_call / "function" forms,
`model.chat_template` naming, and the fast path kept for plain requests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from contract.config import ConfigError, load_config
from frontend.chat_templates import chat_template_file
from frontend.openai_schemas import ChatCompletionRequest, ChatMessage
from frontend.tokenization import TextTokenizer
from frontend.tool_calling import template_messages

WEATHER = {
    "name": "get_weather",
    "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}
TOOLS = [{"type": "function", "function": WEATHER}]


@pytest.fixture(scope="module")
def tools_tokenizer(model_dir: Path) -> TextTokenizer:
    return TextTokenizer(model_dir, chat_template_file("chatml_tools"))


def messages(*raw: dict[str, Any]) -> list[dict[str, Any]]:
    return template_messages([ChatMessage.model_validate(m) for m in raw])


def test_tools_and_a_tool_history_render_in_the_hermes_way(
    tools_tokenizer: TextTokenizer,
) -> None:
    calls = [
        {"id": "call_a", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_b", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
    ]  # fmt: skip
    text = tools_tokenizer.render_chat(
        messages(
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": "Paris and Rome?"},
            {"role": "assistant", "content": None, "tool_calls": calls},
            {"role": "tool", "tool_call_id": "call_a", "content": "sunny"},
            {"role": "tool", "tool_call_id": "call_b", "content": "rainy"},
        ),
        TOOLS,
    )
    system, user, assistant, answers, opener = text.split("<|im_end|>\n")
    assert system.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert "<tools>\n" + json.dumps(TOOLS[0]) + "\n</tools>" in system
    assert user == "<|im_start|>user\nParis and Rome?"
    assert assistant == (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris"}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", '
        '"arguments": {"city": "Rome"}}\n</tool_call>'
    )
    assert answers == (
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\n"
        "rainy\n</tool_response>"
    )
    assert opener == "<|im_start|>assistant\n"


def test_the_legacy_function_forms_render_as_tool_calls(
    tools_tokenizer: TextTokenizer,
) -> None:
    legacy = messages(
        {"role": "user", "content": "Paris?"},
        {"role": "assistant", "content": None,
         "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"role": "function", "name": "get_weather", "content": "sunny"},
    )  # fmt: skip
    modern = messages(
        {"role": "user", "content": "Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c", "content": "sunny"},
    )  # fmt: skip
    assert tools_tokenizer.render_chat(legacy, TOOLS) == tools_tokenizer.render_chat(modern, TOOLS)
    request = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}], "functions": [WEATHER]}
    )
    assert request.function_definitions() == [WEATHER]
    assert request.tool_choice_mode() == "auto"


def test_which_templates_render_tools(model_dir: Path, tools_tokenizer: TextTokenizer) -> None:
    """SmolLM2's own template ignores tools (requests with tools are refused on it); the
    plain path of the same tokenizer is unchanged by tools support (no tools: fast path)."""
    own = TextTokenizer(model_dir)
    assert not own.template_renders_tools and not own.template_renders_tool_calls
    assert tools_tokenizer.template_renders_tools and tools_tokenizer.template_renders_tool_calls
    plain = [{"role": "user", "content": "hi"}]
    assert own.render_chat(plain) == own.render_chat(plain, tools=None)
    assert "# Tools" not in tools_tokenizer.render_chat(plain)
    assert "# Tools" in tools_tokenizer.render_chat(plain, TOOLS)


def test_the_settings_name_their_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"frontend\.tool_call_parser: Input should be"):
        load_config(None, ["frontend.tool_call_parser=hermes2"])
    config = load_config(None, ["frontend.tool_call_parser=hermes"])
    assert config.frontend.tool_call_parser == "hermes"
    with pytest.raises(ValueError, match=r"model\.chat_template: .* \(chatml_tools\)"):
        chat_template_file(str(tmp_path / "missing.jinja"))
    own = tmp_path / "mine.jinja"
    own.write_text("{{ messages[0]['content'] }}")
    assert chat_template_file(str(own)) == own
    assert chat_template_file("chatml_tools").name == "chatml_tools.jinja"


def test_a_parsers_special_token_markers_stay_in_the_generated_text(
    model_dir: Path, tmp_path: Path
) -> None:
    """Llama 3's `<|python_tag|>` is a special token: generated text skips special tokens,
    so the parser would never see it unless the tokenizer keeps it (both decode paths)."""
    from tokenizers import AddedToken, Tokenizer

    from frontend.tokenization import IncrementalDetokenizer
    from frontend.tool_calls import FORMATS, parse_tool_calls

    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    raw.add_special_tokens([AddedToken("<|python_tag|>", special=True)])
    raw.save(str(tmp_path / "tokenizer.json"))
    for name in ("tokenizer_config.json", "config.json"):
        (tmp_path / name).write_text((model_dir / name).read_text())
    text = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}'
    for keep in (False, True):
        tokenizer = TextTokenizer(tmp_path)
        if keep:
            tokenizer.keep_in_text(FORMATS["llama3_json"].tokens)
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids[0] in tokenizer.special_token_ids
        detokenizer = IncrementalDetokenizer(tokenizer)
        streamed = "".join(detokenizer.add([i]) for i in ids) + detokenizer.finish()
        assert streamed == tokenizer.decode(ids) == (text if keep else text[14:])
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    content, calls = parse_tool_calls(FORMATS["llama3_json"], streamed)
    assert content is None and [c.name for c in calls] == ["get_weather"]


def test_a_forced_calls_schema_and_its_reading_agree() -> None:
    """What tool_choice "required" / a named function will need once the engine constrains
    output (refused until then): the schema the output follows, and the calls read back."""
    from frontend.openai_schemas import NamedFunction
    from frontend.tool_calling import forced_call_format, forced_call_schema
    from frontend.tool_calls import parse_tool_calls

    other = {"name": "get_time", "parameters": {"type": "object"}}
    functions = [WEATHER, other]
    named = NamedFunction(name="get_weather")
    assert forced_call_schema(functions, named) == WEATHER["parameters"]
    content, calls = parse_tool_calls(forced_call_format(named), '{"city": "Paris"}')
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    schema = forced_call_schema(functions, "required")
    assert schema["minItems"] == 1
    assert all(item["additionalProperties"] is False for item in schema["items"]["anyOf"])
    names = [item["properties"]["name"]["enum"] for item in schema["items"]["anyOf"]]
    assert names == [["get_weather"], ["get_time"]]
    output = '[{"name": "get_time", "parameters": {}}, {"name": "get_weather", "parameters": {}}]'
    content, calls = parse_tool_calls(forced_call_format("required"), output)
    assert content is None and [c.name for c in calls] == ["get_time", "get_weather"]
    assert parse_tool_calls(forced_call_format("required"), "[]") == ("[]", [])
