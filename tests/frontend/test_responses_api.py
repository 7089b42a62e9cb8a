"""The Responses API's request side without a server: input forms and tool items become
the chat request the chat path serves, and every refusal names the Responses field."""

from __future__ import annotations

from typing import Any

import pytest

from frontend.errors import OpenAIError
from frontend.responses_api import (
    Translation,
    bracketed,
    conversation_length,
    parse_items,
    parse_request,
    translate,
)


def chat_of(body: dict[str, Any]) -> Translation:
    return translate(parse_request(body))


def refusal(body: dict[str, Any]) -> OpenAIError:
    with pytest.raises(OpenAIError) as caught:
        chat_of(body)
    assert caught.value.status == 400
    return caught.value


def test_a_text_input_is_one_user_turn_after_the_instructions() -> None:
    translation = chat_of({"input": "Hi", "instructions": "Be brief", "max_output_tokens": 5})
    chat = translation.chat
    assert [(m.role, m.content) for m in chat.messages] == [("system", "Be brief"),
                                                             ("user", "Hi")]  # fmt: skip
    assert chat.max_tokens == 5
    assert translation.sources == ["instructions", "input"]


def test_items_become_turns_calls_and_tool_answers() -> None:
    translation = chat_of({"input": [
        {"role": "developer", "content": "rules"},
        {"type": "message", "role": "user",
         "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Let me look.", "annotations": []}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"x": 1}'},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "one"},
        {"type": "function_call_output", "call_id": "c2",
         "output": [{"type": "input_text", "text": "two"}]},
    ]})  # fmt: skip
    messages = translation.chat.messages
    assert [m.role for m in messages] == ["developer", "user", "assistant", "tool", "tool"]
    assert messages[1].content == "ab"
    # the text and both calls that followed it are one assistant turn
    assert messages[2].content == "Let me look."
    assert [(c.id, c.function.name, c.function.arguments) for c in messages[2].tool_calls] == [
        ("c1", "f", '{"x": 1}'), ("c2", "g", "{}")]  # fmt: skip
    assert [(m.tool_call_id, m.content) for m in messages[3:]] == [("c1", "one"), ("c2", "two")]
    assert translation.sources == ["input[0]", "input[1]", "input[2]", "input[5]", "input[6]"]
    assert translation.call_sources == {2: ["input[3]", "input[4]"]}
    assert translation.responses_param("messages.2.tool_calls.1") == "input[4]"
    assert translation.responses_param("messages.3.role") == "input[5].role"


def test_images_keep_their_part_index_and_map_back() -> None:
    translation = chat_of({"input": [{"role": "user", "content": [
        {"type": "input_text", "text": "What is this?"},
        {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"},
    ]}]})  # fmt: skip
    (message,) = translation.chat.messages
    assert translation.chat.image_parts() == [
        ("messages.0.content.1.image_url.url", "data:image/png;base64,AAAA")]  # fmt: skip
    assert message.content[1].image_url.detail == "low"
    assert (translation.responses_param("messages.0.content.1.image_url.url")
            == "input[0].content[1].image_url")  # fmt: skip


def test_tools_tool_choice_and_text_format_become_chat_fields() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    chat = chat_of({
        "input": "x", "parallel_tool_calls": False,
        "tools": [{"type": "function", "name": "f", "description": "d", "parameters": schema,
                   "strict": True}],
        "tool_choice": {"type": "function", "name": "f"},
    }).chat  # fmt: skip
    assert chat.function_definitions() == [
        {"name": "f", "description": "d", "parameters": schema, "strict": True}]  # fmt: skip
    assert chat.tool_choice_mode().name == "f" and chat.parallel_tool_calls is False
    formatted = chat_of({"input": "x", "text": {"format": {
        "type": "json_schema", "name": "n", "schema": schema, "strict": True}}}).chat  # fmt: skip
    guided = formatted.guided_decoding()
    assert guided is not None and guided.kind == "json_schema"
    def guided_of(text_format: dict[str, Any]) -> Any:
        return chat_of({"input": "x", "text": {"format": text_format}}).chat.guided_decoding()

    assert guided_of({"type": "json_object"}).kind == "json_object"
    assert guided_of({"type": "text"}) is None


def test_logprobs_are_asked_for_through_include() -> None:
    chat = chat_of({"input": "x", "include": ["message.output_text.logprobs"],
                    "top_logprobs": 2}).chat  # fmt: skip
    assert chat.requested_logprobs() == 2
    assert chat_of({"input": "x", "top_logprobs": 2}).chat.requested_logprobs() is None


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"input": [{"role": "user", "content": "a"}, {"type": "reasoning", "content": [
            {"type": "thought", "text": "t"}]}]}, "input[1].content[0].type", "reasoning_text"),
        ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
         "input[0].content[0].type", "'input_file' is not supported"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
         "input[0].content[0].file_id", "no files API"),
        ({"input": [{"role": "robot", "content": "a"}]}, "input[0].role", "user"),
        ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
         "input[0].call_id", "field required"),
        ({"input": "x", "tools": [{"type": "function", "name": "f"}, {"type": "web_search"}]},
         "tools[1].type", "'web_search'"),
        ({"input": "x", "tool_choice": {"type": "function", "name": "g"}}, "tool_choice",
         "not in tools"),
        ({"input": "x", "tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"input": "x", "background": True, "store": False}, "store", "background"),
        ({"input": "x", "truncation": "middle"}, "truncation", "'auto'"),
        ({"input": "x", "reasoning": {"effort": "turbo"}}, "reasoning.effort", "'high'"),
        ({"input": "x", "text": {"format": {"type": "json_schema", "name": "n",
                                            "schema": {"type": "nope"}}}},
         "text.format.schema", "invalid JSON Schema"),
        ({"input": "x", "text": {"format": {"type": "json_schema", "schema": {}}}},
         "text.format.name", "required"),
        ({"input": "x", "text": {"verbosity": "high"}}, "text.verbosity", "medium"),
        ({"input": "x", "include": ["file_search_call.results"]}, "include[0]", "file_search"),
        ({"input": "x", "conversation": "conv_1"}, "conversation", "previous_response_id"),
        ({"input": "x", "max_tool_calls": -1}, "max_tool_calls", "greater than"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens", "greater than"),
        ({"input": []}, "input", "empty"),
        ({"input": "x", "metadata": {str(i): "v" for i in range(17)}}, "metadata", "16"),
    ],
)  # fmt: skip
def test_refusals_name_the_responses_field(body: dict[str, Any], param: str, words: str) -> None:
    error = refusal(body)
    assert error.param == param, error.message
    assert error.message.startswith(param + ":"), error.message
    assert words in error.message


def test_chat_params_map_back_to_responses_fields() -> None:
    translation = chat_of({"input": [{"role": "user", "content": "a"}], "instructions": "s"})
    assert translation.responses_param("messages") == "input"
    assert translation.responses_param("messages.0") == "instructions"
    assert translation.responses_param("messages.1.content") == "input[0].content"
    assert translation.responses_param("max_tokens") == "max_output_tokens"
    assert translation.responses_param("response_format.json_schema.schema") == (
        "text.format.schema")  # fmt: skip
    error = translation.error(OpenAIError(400, "messages: too long", param="messages"))
    assert (error.param, error.message) == ("input", "input: too long")
    assert bracketed("input.2.content.10.image_url") == "input[2].content[10].image_url"


def test_dropped_items_leave_the_instructions_and_no_orphan_call_output() -> None:
    """truncation "auto" leaves out the conversation's first items (stored ones first); a
    function call output whose call went with them goes too, and the sources still name the
    items as sent."""
    earlier = parse_items([{"type": "message", "role": "user", "content": "old"}])
    body = parse_request({"instructions": "s", "truncation": "auto", "input": [
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "one"},
        {"role": "user", "content": "new"},
    ]})  # fmt: skip
    assert conversation_length(body, earlier) == 4
    kept = translate(body, earlier, dropped=1)
    assert [m.role for m in kept.chat.messages] == ["system", "assistant", "tool", "user"]
    assert kept.sources == ["instructions", "input[0]", "input[1]", "input[2]"]
    orphan_dropped = translate(body, earlier, dropped=2)
    assert [(m.role, m.content) for m in orphan_dropped.chat.messages] == [
        ("system", "s"), ("user", "new")]  # fmt: skip
    assert orphan_dropped.responses_param("messages.1.content") == "input[2].content"
    assert conversation_length(parse_request({"input": "x"})) == 1


def test_max_tool_calls_is_accepted_with_no_built_in_tools_to_count() -> None:
    assert chat_of({"input": "x", "max_tool_calls": 3}).chat.messages[0].content == "x"


def test_a_stored_conversation_comes_first_and_is_named_as_such() -> None:
    earlier = parse_items([
        {"type": "message", "role": "user", "content": "first"},
        {"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": "answer", "annotations": [],
                      "logprobs": []}]},
    ])  # fmt: skip
    translation = translate(parse_request({"input": "second", "instructions": "s"}), earlier)
    assert [(m.role, m.content) for m in translation.chat.messages] == [
        ("system", "s"), ("user", "first"), ("assistant", "answer"), ("user", "second"),
    ]  # fmt: skip
    assert translation.responses_param("messages.2.content") == "previous_response_id"


async def test_a_record_etcd_does_not_take_is_reported_not_kept() -> None:
    """etcd unreachable (nothing listens on the port): put answers False (the answer then
    says store false), reads are a 503 naming the store."""
    from contract.readiness import free_port
    from frontend.response_store import ResponseStore

    store = ResponseStore(f"http://127.0.0.1:{free_port()}", "d", 60, 2**20)
    response = {"id": "resp_" + "0" * 32, "object": "response"}
    try:
        assert await store.put(response, []) is False
        with pytest.raises(OpenAIError) as caught:
            await store.get("resp_" + "0" * 32)
        assert caught.value.status == 503
        big = {"id": "resp_" + "1" * 32, "text": "x" * 2**20}
        assert await store.put(big, []) is False  # past the cap: not even tried
    finally:
        await store.close()


def test_reasoning_items_become_the_next_answers_thinking() -> None:
    """A reasoning item (as a stored output keeps it: id, status, no summary) gives its text
    to the assistant turn after it; one before a user turn is dropped; effort goes to the
    chat template as `reasoning_effort`."""
    thought = {"type": "reasoning", "id": "rs_1", "status": "completed", "summary": [],
               "content": [{"type": "reasoning_text", "text": "plan"}],
               "encrypted_content": None}  # fmt: skip
    call = {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}
    chat = chat_of({"input": [
        {"role": "user", "content": "q"}, thought, {"role": "assistant", "content": "a"},
        {"role": "user", "content": "q2"}, {**thought, "content": None, "summary": [
            {"type": "summary_text", "text": "sum"}]}, call,
        {"type": "function_call_output", "call_id": "c", "output": "r"},
        thought, {"role": "user", "content": "q3"},
    ], "reasoning": {"effort": "low", "summary": "auto"}}).chat  # fmt: skip
    thinking = [(m.role, m.reasoning_content) for m in chat.messages]
    assert thinking == [("user", None), ("assistant", "plan"), ("user", None),
                        ("assistant", "sum"), ("tool", None), ("user", None)]  # fmt: skip
    assert chat.template_kwargs() == {"reasoning_effort": "low"}
