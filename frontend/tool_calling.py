"""Tool calling on /v1/chat/completions, the request's side: whether this deployment takes
a request's `tools` and tool history (`frontend.tool_call_parser`, and a chat template that
renders them), the messages and functions as the template takes them (transformers'
convention, as vLLM passes them), and the answer's message with its `tool_calls`.

A request without tools or tool history never gets here past one check (`tool_use` returns
None): its prompt and answer take the plain path."""

from __future__ import annotations

import json
from typing import Any, Literal

from contract.guided import spec_error
from contract.messages import GuidedDecoding
from frontend import errors
from frontend.openai_schemas import ChatCompletionRequest, ChatMessage, NamedFunction
from frontend.reasoning import with_thinking
from frontend.tokenization import TextTokenizer
from frontend.tool_calls import (
    FORMATS,
    ToolCall,
    ToolCallFormat,
    ToolCallStream,
    parse_tool_calls,
)

_ENABLE = "set frontend.tool_call_parser (hermes, llama3_json, mistral or pythonic) to enable it"


class ToolUse:
    """What one request's tool calling needs: the functions shown to the model (None:
    none, tool_choice "none"), the format its calls are parsed in (None: not parsed), how
    many calls an answer keeps (1: parallel_tool_calls false), whether the request used
    the legacy `functions` (then the answer's call is a `function_call`, OpenAI's legacy
    shape, finish_reason "function_call"), and the output constraint of a call forced by
    tool_choice (None: the model may answer in words)."""

    __slots__ = ("finish_reason", "fmt", "guided", "legacy", "max_calls", "tools")

    def __init__(
        self,
        tools: list[dict[str, Any]] | None,
        fmt: ToolCallFormat | None,
        max_calls: int | None,
        legacy: bool = False,
        guided: GuidedDecoding | None = None,
        finish_reason: str = "tool_calls",
    ) -> None:
        self.tools = tools
        self.fmt = fmt
        self.max_calls = 1 if legacy else max_calls
        self.legacy = legacy
        self.guided = guided
        # the finish reason of an answer that called
        self.finish_reason = "function_call" if legacy else finish_reason

    def deltas(self, call: ToolCall) -> list[dict[str, Any]]:
        """The stream deltas of one call (`ToolCall.stream_deltas`, or the legacy form)."""
        if self.legacy:
            return [{"function_call": {"name": call.name, "arguments": ""}},
                    {"function_call": {"arguments": call.arguments}}]  # fmt: skip
        return [{"tool_calls": [entry]} for entry in call.stream_deltas(call.index)]

    def streams(self, count: int) -> list[ChoiceCalls] | None:
        """One call finder per choice of a streamed answer (None: nothing to parse)."""
        if self.fmt is None:
            return None
        return [ChoiceCalls(self, self.fmt) for _ in range(count)]

    def message(self, text: str) -> tuple[dict[str, Any], bool]:
        """A whole answer's message, and whether it made calls."""
        if self.fmt is None:
            return {"role": "assistant", "content": text}, False
        content, calls = parse_tool_calls(self.fmt, text, self.max_calls)
        if not calls:
            return {"role": "assistant", "content": content}, False
        if self.legacy:
            call = calls[0]
            function_call = {"name": call.name, "arguments": call.arguments}
            return {"role": "assistant", "content": content, "function_call": function_call}, True
        entries = [call.message_entry() for call in calls]
        return {"role": "assistant", "content": content, "tool_calls": entries}, True


class ChoiceCalls:
    """One streamed choice's calls: its text in, content pieces and the calls' stream
    deltas out (in order), and its finish reason once it has called."""

    __slots__ = ("_finder", "_use")

    def __init__(self, use: ToolUse, fmt: ToolCallFormat) -> None:
        self._use = use
        self._finder = ToolCallStream(fmt, use.max_calls)

    def pieces(self, text: str, final: bool) -> list[str | dict[str, Any]]:
        """Content (str) and deltas (dict) for the choice's next text; `final`: its last."""
        found = self._finder.feed(text) if text else []
        if final:
            found += self._finder.finish()
        out: list[str | dict[str, Any]] = []
        for piece in found:
            if isinstance(piece, str):
                out.append(piece)
            else:
                out += self._use.deltas(piece)
        return out

    def finish_reason(self, finish: str) -> str:
        """The choice's finish reason: the engine's, or the one of an answer with calls."""
        return self._use.finish_reason if self._finder.calls else finish


def tool_use(
    body: ChatCompletionRequest, parser: str | None, tokenizer: TextTokenizer
) -> ToolUse | None:
    """The request's tool calling (None: a plain request), or a 400 naming the field this
    deployment cannot serve: tools or tool history without a tool_call_parser (a call forced
    by tool_choice needs none), a template that would not show them to the model."""
    offered = bool(body.tools or body.functions)
    history = body.has_tool_history()
    if not offered and not history:
        return None  # tool_choice "none"/"auto" without tools changes nothing
    choice = body.tool_choice_mode()
    tools_param = "tools" if body.tools else "functions"
    choice_param = "function_call" if body.function_call is not None else "tool_choice"
    forced = choice == "required" or isinstance(choice, NamedFunction)
    if parser is None and not forced:  # a forced call is read as JSON: no parser needed
        if offered and choice != "none":
            raise errors.bad_request(
                f"{tools_param}: tool calling is off on this deployment; {_ENABLE} "
                f'(or send tool_choice "none")',
                param=tools_param,
            )
        if history:
            param = _history_param(body.messages)
            raise errors.bad_request(
                f"{param}: tool calling is off on this deployment, so a history of tool "
                f"calls cannot be shown to the model; {_ENABLE}",
                param=param,
            )
    if history and not tokenizer.template_renders_tool_calls:
        param = _history_param(body.messages)
        raise errors.bad_request(
            f"{param}: the chat template does not render tool calls, so the model would not "
            "see them; set model.chat_template (chatml_tools for Hermes-style models)",
            param=param,
        )
    if forced:
        assert choice == "required" or isinstance(choice, NamedFunction)
        return _forced_call(body, tokenizer, choice, choice_param)
    if not offered or choice == "none":
        return ToolUse(None, None, None)
    if not tokenizer.template_renders_tools:
        raise errors.bad_request(
            f"{tools_param}: the chat template does not render `tools`, so the model would "
            "never learn of them; set model.chat_template (chatml_tools for Hermes-style "
            'models) or send tool_choice "none"',
            param=tools_param,
        )
    tools = [{"type": "function", "function": f} for f in body.function_definitions()]
    max_calls = 1 if body.parallel_tool_calls is False else None
    assert parser is not None
    return ToolUse(tools, FORMATS[parser], max_calls, legacy=not body.tools)


def _forced_call(
    body: ChatCompletionRequest,
    tokenizer: TextTokenizer,
    choice: Literal["required"] | NamedFunction,
    param: str,
) -> ToolUse:
    """tool_choice "required" or a named function (vLLM's way): the output is constrained to
    the JSON of the call(s) (`forced_call_schema`) and read back as such. The functions are
    shown to the model when its template renders them (else it still calls one of them,
    knowing only their names and argument schemas). A named call ends "stop" (as OpenAI's
    API does), "required" ends "tool_calls"."""
    if body.guided_decoding() is not None:
        raise errors.bad_request(
            f"{param}: a forced call constrains the output already; send no response_format "
            "or guided_* with it",
            param=param,
        )
    functions = body.function_definitions()
    single = body.parallel_tool_calls is False or body.functions is not None
    schema = forced_call_schema(functions, choice, single)
    spec = json.dumps(schema)
    tools_param = "tools" if body.tools else "functions"
    error = spec_error("json_schema", spec)
    if error is not None:  # a function's parameters that no grammar can follow
        raise errors.bad_request(
            f"{tools_param}: the functions' parameters are not a usable JSON Schema: {error}",
            param=tools_param,
        )
    shown = None
    if tokenizer.template_renders_tools:
        shown = [{"type": "function", "function": f} for f in functions]
    named = isinstance(choice, NamedFunction)
    return ToolUse(
        shown,
        forced_call_format(choice),
        1 if single else None,
        legacy=not body.tools,
        guided=GuidedDecoding(kind="json_schema", spec=spec),
        finish_reason="stop" if named else "tool_calls",
    )


def _history_param(messages: list[ChatMessage]) -> str:
    """The field of the first tool-calling message, as errors name it."""
    for index, message in enumerate(messages):
        if message.tool_calls:
            return f"messages.{index}.tool_calls"
        if message.function_call is not None:
            return f"messages.{index}.function_call"
        if message.role in ("tool", "function"):
            return f"messages.{index}.role"
    return "messages"


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as a tools-aware chat template takes them: an assistant's calls under
    `tool_calls` with their arguments as objects (vLLM's and transformers' convention: the
    templates write them with `tojson`), the legacy function_call as one such call, a
    legacy "function" answer as a "tool" one."""
    rendered: list[dict[str, Any]] = []
    for message in messages:
        role = {"developer": "system", "function": "tool"}.get(message.role, message.role)
        entry: dict[str, Any] = {"role": role, "content": message.text()}
        calls = message.tool_calls or []
        if message.function_call is not None and not calls:
            entry["tool_calls"] = [_template_call(None, message.function_call.name,
                                                  message.function_call.arguments)]  # fmt: skip
        elif calls:
            entry["tool_calls"] = [
                _template_call(call.id, call.function.name, call.function.arguments)
                for call in calls
            ]
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        if message.name is not None:
            entry["name"] = message.name
        rendered.append(entry)
    return with_thinking(rendered, messages)


def _template_call(call_id: str | None, name: str, arguments: str) -> dict[str, Any]:
    try:
        loaded: Any = json.loads(arguments)
    except ValueError:
        loaded = arguments  # not JSON: the template gets the text as sent
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": loaded}}


def forced_call_schema(
    functions: list[dict[str, Any]],
    choice: Literal["required"] | NamedFunction,
    single: bool = False,
) -> dict[str, Any]:
    """The JSON schema the output must follow when tool_choice forces a call (vLLM's):
    for a named function, its arguments object; for "required", a list of one or more
    `{"name", "parameters"}` objects, each one of the offered functions (`single`: exactly
    one, parallel_tool_calls false)."""

    def arguments_schema(function: dict[str, Any]) -> dict[str, Any]:
        return function.get("parameters") or {"type": "object"}

    if isinstance(choice, NamedFunction):
        named = next(f for f in functions if f["name"] == choice.name)
        return arguments_schema(named)
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [function["name"]]},
                "parameters": arguments_schema(function),
            },
            "required": ["name", "parameters"],
            "additionalProperties": False,  # else a sampled call runs on in keys of its own
        }
        for function in functions
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if single:
        schema["maxItems"] = 1
    return schema


def forced_call_format(choice: Literal["required"] | NamedFunction) -> ToolCallFormat:
    """How to read an output that followed `forced_call_schema`: the whole output is the
    call(s) as JSON (not the model's own call format)."""
    if isinstance(choice, NamedFunction):
        name = choice.name

        def parse_named(marker: str, body: str) -> list[tuple[str, dict[str, Any]]] | None:
            try:
                arguments = json.loads(marker + body)
            except ValueError:
                return None
            return [(name, arguments)] if isinstance(arguments, dict) else None

        return ToolCallFormat("forced_named", ("{",), None, True, parse_named)

    def parse_required(marker: str, body: str) -> list[tuple[str, dict[str, Any]]] | None:
        try:
            calls = json.loads(marker + body)
        except ValueError:
            return None
        if not isinstance(calls, list) or not calls:
            return None
        parsed = [
            (call["name"], call["parameters"])
            for call in calls
            if isinstance(call, dict)
            and isinstance(call.get("name"), str)
            and isinstance(call.get("parameters"), dict)
        ]
        return parsed if len(parsed) == len(calls) else None

    return ToolCallFormat("forced_required", ("[",), None, True, parse_required)
