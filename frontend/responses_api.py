"""OpenAI's Responses API (`POST /v1/responses`), the request's side: its schema, and its
translation into the chat request the chat path serves (`ChatCompletionRequest`: the same
tokenization, chat template, routing, migration, tool calling and constrained output).

Like `frontend.openai_schemas`, unknown fields are ignored (clients send many that change
nothing: `service_tier`, `prompt_cache_key`, ...) but a field that would change the answer
and that hpcserve does not serve is refused by name (`reasoning` effort on a model that
does not reason, built-in tools, `conversation`, ...).
Errors name the Responses field in OpenAI's form (`input[2].content[0].image_url`); an
error the chat path raises after the translation names the chat field, and
`Translation.responses_param` maps it back.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from contract.guided import spec_error
from contract.messages import SAMPLING_BOUNDS
from frontend import errors
from frontend.errors import OpenAIError
from frontend.openai_schemas import ChatCompletionRequest

MAX_METADATA_KEYS = 16  # OpenAI's limits on `metadata`
MAX_METADATA_VALUE = 512
# `include` values: the logprobs of the output text are served; a reasoning item's
# encrypted content is accepted (this model writes no reasoning items)
LOGPROBS_INCLUDE = "message.output_text.logprobs"
ACCEPTED_INCLUDES = frozenset({LOGPROBS_INCLUDE, "reasoning.encrypted_content"})


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _bounded(name: str, **kwargs: Any) -> Any:
    return Field(default=None, **SAMPLING_BOUNDS[name].constraints(), **kwargs)


# ---- input items ---------------------------------------------------------------------------


class InputText(_Request):
    type: Literal["input_text"]
    text: str


class InputImage(_Request):
    type: Literal["input_image"]
    image_url: str | None = Field(
        default=None, min_length=1, description="as chat's image_url.url: data:, http(s):, file"
    )
    file_id: str | None = None
    detail: Literal["auto", "low", "high"] | None = None  # accepted; the model's size is used

    @model_validator(mode="after")
    def _url_given(self) -> InputImage:
        if self.file_id is not None:
            raise ValueError("file_id: hpcserve has no files API; send the image as image_url")
        if self.image_url is None:
            raise ValueError("image_url: field required")
        return self


class OutputText(_Request):
    """An earlier answer's text (an assistant item sent back)."""

    type: Literal["output_text"]
    text: str


class Refusal(_Request):
    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[
    InputText | InputImage | OutputText | Refusal, Field(discriminator="type")
]


class MessageItem(_Request):
    """A turn: `{role, content}` (OpenAI's "easy" form) or `{type: "message", ...}`, as an
    earlier response's output item comes back too (its id and status are ignored)."""

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[ContentPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(_part_text(part) for part in self.content)

    def has_images(self) -> bool:
        return not isinstance(self.content, str) and any(
            isinstance(part, InputImage) for part in self.content
        )


def _part_text(part: InputText | InputImage | OutputText | Refusal) -> str:
    if isinstance(part, Refusal):
        return part.refusal
    return "" if isinstance(part, InputImage) else part.text


class FunctionCallItem(_Request):
    """A call an earlier answer made (chat: an assistant message's tool_calls entry)."""

    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str = Field(description="the arguments object as a JSON text")


class FunctionCallOutputItem(_Request):
    """A call's result (chat: a role "tool" message)."""

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[InputText]

    def text(self) -> str:
        if isinstance(self.output, str):
            return self.output
        return "".join(part.text for part in self.output)


class ReasoningText(_Request):
    type: Literal["reasoning_text", "summary_text"]
    text: str


class ReasoningItem(_Request):
    """A reasoning model's thinking of an earlier answer, sent back (or stored with it):
    it reaches the chat template as the next assistant turn's `reasoning_content`. An
    item with only `encrypted_content` (OpenAI's own models') carries no text here."""

    type: Literal["reasoning"]
    id: str | None = None
    summary: list[ReasoningText] = Field(default_factory=list)
    content: list[ReasoningText] | None = None
    encrypted_content: str | None = None
    status: str | None = None

    def text(self) -> str:
        """The thinking's text (its summary's when the item has no content)."""
        parts = self.content if self.content else self.summary
        return "".join(part.text for part in parts)


def _item_kind(value: Any) -> str | None:
    """An input item's kind: its `type`, "message" when it has none (the easy form)."""
    if isinstance(value, dict):
        kind = value.get("type", "message")
        return kind if isinstance(kind, str) else None
    return getattr(value, "type", None)


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_kind),
]


# ---- tools and text format -----------------------------------------------------------------


class FunctionTool(_Request):
    """Responses' flat function tool (chat nests it under `function`)."""

    type: str
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # accepted; calls are parsed (constrained when forced)

    @field_validator("type")
    @classmethod
    def _function_only(cls, value: str) -> str:
        if value != "function":
            raise ValueError(f"hpcserve serves function tools only, not the built-in {value!r}")
        return value

    def chat_function(self) -> dict[str, Any]:
        """The tool as chat's `tools[i].function`."""
        return self.model_dump(exclude={"type"}, exclude_none=True)


class NamedFunctionChoice(_Request):
    type: Literal["function"]
    name: str


class TextFormat(_Request):
    """`text.format`: free text, any JSON object, or JSON following `schema`."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(default=None, min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormat:
        if self.type == "json_schema":
            if self.name is None:
                raise ValueError('name: required when type is "json_schema"')
            if self.schema_ is None:
                raise ValueError('schema: required when type is "json_schema"')
            error = spec_error("json_schema", json.dumps(self.schema_))
            if error is not None:  # llguidance cannot build its grammar
                raise ValueError(f"schema: invalid JSON Schema: {error}")
        return self

    def echo(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)


class TextConfig(_Request):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None

    @field_validator("verbosity")
    @classmethod
    def _medium_only(cls, value: str | None) -> str | None:
        if value not in (None, "medium"):
            raise ValueError(f'hpcserve does not support verbosity {value!r} (only "medium")')
        return value


Summary = Literal["auto", "concise", "detailed"]


class Reasoning(_Request):
    """A reasoning model's settings: `effort` reaches the chat template as
    `reasoning_effort` (as vLLM passes it; templates that know no effort ignore it); a
    summary is accepted and none is written (summaries are best effort at OpenAI too). A
    deployment without frontend.reasoning_parser refuses them (`asked`), as OpenAI answers
    for its models that do not reason."""

    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Summary | None = None
    generate_summary: Summary | None = None

    def asked(self) -> str | None:
        """The first field the request sets."""
        names = ("effort", "summary", "generate_summary")
        return next((name for name in names if getattr(self, name) is not None), None)


# ---- the request ---------------------------------------------------------------------------


class ResponsesRequest(_Request):
    model: str | None = None
    input: str | list[InputItem] = Field(
        description="a user message's text, or a list of items: messages (role user, "
        "system, developer or assistant; content a text or input_text / input_image / "
        "output_text parts), function_call items (an earlier call) and "
        "function_call_output items (its result)",
    )
    instructions: str | None = Field(
        default=None,
        description="a system turn before the input (not carried over by previous_response_id)",
    )
    max_output_tokens: int | None = _bounded("max_tokens")
    temperature: float | None = _bounded("temperature")
    top_p: float | None = _bounded("top_p")
    top_logprobs: int | None = _bounded(
        "logprobs", description='with include ["message.output_text.logprobs"]'
    )
    include: list[str] | None = None
    tools: list[FunctionTool] | None = Field(
        default=None,
        description='functions the model may call, `{type: "function", name, description, '
        "parameters, strict}` (frontend.tool_call_parser must be set); built-in tools "
        "(web_search, file_search, ...) are not served",
    )
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    stream: bool = False
    store: bool = Field(
        default=True,
        description="keep the response (in etcd, frontend.responses_store_ttl_s) for GET "
        "and previous_response_id; false in the answer when it was not kept",
    )
    previous_response_id: str | None = Field(
        default=None,
        description="continue a stored response: its input and output come before `input`",
    )
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: Literal["disabled", "auto"] | None = Field(
        default=None,
        description='"auto": the conversation\'s first items are left out of the prompt (not '
        'the instructions) until it and max_output_tokens fit the context; "disabled" '
        "(the default): a conversation too long is a 400 context_length_exceeded",
    )
    background: bool | None = Field(
        default=None,
        description="run it in the background (`frontend.background`): the answer comes at "
        "once, status queued; poll GET /v1/responses/{id}, cancel with POST .../cancel; "
        "with `stream`, the events come live and a client may re-attach with GET "
        "?stream=true&starting_after=N. Needs `store` true",
    )
    reasoning: Reasoning | None = None
    # OpenAI's cap on calls of built-in tools; hpcserve serves none (they are refused), so
    # no answer can reach it: accepted and echoed
    max_tool_calls: int | None = Field(default=None, ge=0)
    # known fields that change the answer and are not served: refused by name
    conversation: Any = None
    prompt: Any = None

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value: str | list[Any]) -> str | list[Any]:
        if isinstance(value, list) and not value:
            raise ValueError("must not be empty")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None:
            if len(value) > MAX_METADATA_KEYS:
                raise ValueError(f"at most {MAX_METADATA_KEYS} keys, not {len(value)}")
            for key, item in value.items():
                if len(key) > 64 or len(item) > MAX_METADATA_VALUE:
                    raise ValueError(f"{key!r}: keys of at most 64, values of at most "
                                     f"{MAX_METADATA_VALUE} characters")  # fmt: skip
        return value

    @model_validator(mode="after")
    def _refuse_what_is_not_served(self) -> ResponsesRequest:
        if self.background and not self.store:
            raise ValueError("store: background responses must be stored (they are polled "
                             "with GET): send store true, or leave it out")  # fmt: skip
        if self.conversation is not None:
            raise ValueError("conversation: hpcserve does not serve the Conversations API; "
                             "use previous_response_id")  # fmt: skip
        if self.prompt is not None:
            raise ValueError("prompt: hpcserve does not serve stored prompt templates")
        for index, value in enumerate(self.include or []):
            if value not in ACCEPTED_INCLUDES:
                raise ValueError(f"include[{index}]: hpcserve does not support {value!r}")
        if isinstance(self.tool_choice, NamedFunctionChoice):
            names = [tool.name for tool in self.tools or []]
            if self.tool_choice.name not in names:
                raise ValueError(
                    f"tool_choice: names function {self.tool_choice.name!r}, which is not in tools"
                )
        return self

    def wants_logprobs(self) -> bool:
        return LOGPROBS_INCLUDE in (self.include or ())

    def text_format(self) -> TextFormat | None:
        return self.text.format if self.text is not None else None

    def items(self) -> list[MessageItem | FunctionCallItem | FunctionCallOutputItem]:
        """The input as items (a text is one user message)."""
        if isinstance(self.input, str):
            return [MessageItem(role="user", content=self.input)]
        return list(self.input)


# the tags pydantic puts after an item's index (which kind of item or part it tried)
_TAGS = frozenset(
    {"message", "function_call", "function_call_output", "reasoning", "input_text", "input_image",
     "output_text", "refusal"}
)  # fmt: skip


def _without_tags(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    return tuple(
        part
        for index, part in enumerate(loc)
        if not (part in _TAGS and index and isinstance(loc[index - 1], int))
    )


def parse_request(data: dict[str, Any]) -> ResponsesRequest:
    """The validated request, or a 400 naming the Responses field (`tools[1].type`)."""
    try:
        return ResponsesRequest.model_validate(data)
    except ValidationError as exc:
        found = [_readable(dict(e)) for e in exc.errors()]
        error = errors.from_validation_errors(found)  # type: ignore[arg-type]
        raise responses_error(_deepened(error)) from None


def _readable(error: dict[str, Any]) -> dict[str, Any]:
    """A pydantic error without the item kinds in its location, its discriminator named
    `type` (ours is a function: the easy message form has no type)."""
    error["loc"] = _without_tags(tuple(error["loc"]))
    ctx = error.get("ctx")
    if ctx and str(ctx.get("discriminator", "")).startswith("_item_kind"):
        error["ctx"] = {**ctx, "discriminator": "type"}
    return error


def _deepened(error: OpenAIError) -> OpenAIError:
    """A model validator's "field: reason" under `param` (`reasoning`) names the field
    (`reasoning.effort`)."""
    if error.param is None:
        return error
    rest = error.message.removeprefix(error.param + ": ")
    head, sep, reason = rest.partition(": ")
    if not sep or not head.isidentifier():
        return error
    param = f"{error.param}.{head}"
    return OpenAIError(error.status, f"{param}: {reason}", type=error.type, param=param,
                       code=error.code)  # fmt: skip


def parse_items(items: list[Any]) -> list[MessageItem | FunctionCallItem | FunctionCallOutputItem]:
    """Stored items (an earlier response's input and output) as input items."""
    return ResponsesRequest.model_validate({"input": items}).items()


_INDEX = re.compile(r"\.(\d+)(?=\.|$)")


def bracketed(param: str) -> str:
    """`input.2.content.0.image_url` → `input[2].content[0].image_url` (OpenAI's form)."""
    return _INDEX.sub(r"[\1]", param)


def responses_error(error: OpenAIError, param: str | None = None) -> OpenAIError:
    """`error` naming `param` (default: its own, in OpenAI's bracketed form), its message's
    leading `field:` too."""
    old = error.param
    new = param if param is not None else (bracketed(old) if old else None)
    if old is None or new is None or new == old:
        return error
    message = error.message
    if message.startswith(old + ":"):
        message = new + message[len(old) :]
    else:
        message = message.replace(f" {old} ", f" {new} ", 1)
    return OpenAIError(error.status, message, type=error.type, param=new, code=error.code)


# ---- the translation to a chat request -----------------------------------------------------

_CHAT_FIELDS = {  # chat's field → the Responses field it came from
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text.format",
    "logprobs": "include",
}


class Translation:
    """A Responses request as a chat request, and where each chat message came from:
    `sources[i]` names message i's item (`instructions`, `input`, `input[3]`,
    `previous_response_id`), `call_sources[i][j]` the item of its j-th tool call."""

    __slots__ = ("call_sources", "chat", "sources")
    chat: ChatCompletionRequest  # set once the chat request validated

    def __init__(self, sources: list[str], call_sources: dict[int, list[str]]) -> None:
        self.sources = sources
        self.call_sources = call_sources

    def responses_param(self, param: str) -> str:
        """The Responses field a chat path's error `param` stands for."""
        head, _, rest = param.partition(".")
        if head != "messages":
            field = _CHAT_FIELDS.get(head, head)
            if head == "response_format" and rest.startswith("json_schema"):
                rest = rest.removeprefix("json_schema").lstrip(".")
            return bracketed(f"{field}.{rest}" if rest else field)
        if not rest:
            return "input"
        index, _, tail = rest.partition(".")
        if not index.isdigit() or int(index) >= len(self.sources):
            return "input"
        source = self.sources[int(index)]
        if source in ("instructions", "input", "previous_response_id"):
            return source
        if tail.startswith("tool_calls"):
            call = tail.removeprefix("tool_calls").lstrip(".").partition(".")[0]
            calls = self.call_sources.get(int(index), [])
            return calls[int(call)] if call.isdigit() and int(call) < len(calls) else (
                calls[0] if calls else source
            )
        if tail.startswith("content.") and tail.endswith("image_url.url"):
            tail = tail.removesuffix(".url")
        if tail in ("role", "tool_call_id", "content") or tail.startswith("content."):
            return bracketed(f"{source}.{tail}")
        return source

    def error(self, error: OpenAIError) -> OpenAIError:
        """A chat path's error, naming the Responses field."""
        if error.param is None:
            return error
        return responses_error(error, self.responses_param(error.param))


def conversation_length(
    body: ResponsesRequest,
    earlier: list[MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem]
    | None = None,
) -> int:
    """How many items `translate` reads: the stored conversation's, then the input's."""
    return len(earlier or []) + (1 if isinstance(body.input, str) else len(body.input))


def translate(
    body: ResponsesRequest,
    earlier: list[MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem]
    | None = None,
    dropped: int = 0,
) -> Translation:
    """`body` (after `earlier`: a stored conversation) as a chat request; without the
    conversation's first `dropped` items (`truncation: "auto"`), and then without the
    function call outputs that would lead it, whose calls went with them."""
    messages: list[dict[str, Any]] = []
    sources: list[str] = []
    call_sources: dict[int, list[str]] = {}
    if body.instructions is not None:
        messages.append({"role": "system", "content": body.instructions})
        sources.append("instructions")
    items: list[tuple[str, Any]] = [("previous_response_id", item) for item in earlier or []]
    if isinstance(body.input, str):
        items.append(("input", MessageItem(role="user", content=body.input)))
    else:
        items += [(f"input[{index}]", item) for index, item in enumerate(body.input)]
    if dropped:
        items = items[dropped:]
        while items and isinstance(items[0][1], FunctionCallOutputItem):
            items = items[1:]
    thinking = ""  # reasoning items' text, for the assistant turn that follows them
    for source, item in items:
        if isinstance(item, ReasoningItem):
            thinking += item.text()
            continue
        if isinstance(item, MessageItem):
            messages.append(_chat_message(item))
            sources.append(source)
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}  # fmt: skip
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                # calls after an assistant's text (or after calls) are that one turn's
                last.setdefault("tool_calls", []).append(call)
                call_sources.setdefault(len(messages) - 1, []).append(source)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
                sources.append(source)
                call_sources[len(messages) - 1] = [source]
        else:
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
            sources.append(source)
            continue
        if thinking and messages[-1]["role"] == "assistant":
            messages[-1].setdefault("reasoning_content", thinking)
        thinking = ""
    chat: dict[str, Any] = {
        "model": body.model,
        "messages": messages,
        "stream": body.stream,
        "max_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "user": body.user,
    }
    if body.wants_logprobs():
        chat["logprobs"] = True
        chat["top_logprobs"] = body.top_logprobs
    if body.tools is not None:
        chat["tools"] = [
            {"type": "function", "function": tool.chat_function()} for tool in body.tools
        ]
    choice = body.tool_choice
    if isinstance(choice, NamedFunctionChoice):
        chat["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    elif choice is not None:
        chat["tool_choice"] = choice
    if body.parallel_tool_calls is not None:
        chat["parallel_tool_calls"] = body.parallel_tool_calls
    if body.reasoning is not None and body.reasoning.effort is not None:
        chat["reasoning_effort"] = body.reasoning.effort
    text_format = body.text_format()
    if text_format is not None and text_format.type != "text":
        chat["response_format"] = _response_format(text_format)
    translation = Translation(sources, call_sources)
    try:
        translation.chat = ChatCompletionRequest.model_validate(chat)
    except ValidationError as exc:
        error = errors.from_validation_errors(exc.errors())  # type: ignore[arg-type]
        raise translation.error(error) from None
    return translation


def _chat_message(item: MessageItem) -> dict[str, Any]:
    """A message item as a chat message: content parts only where there are images (their
    order kept: part p is chat's content part p), else the parts' text joined."""
    if not item.has_images():
        return {"role": item.role, "content": item.text()}
    assert not isinstance(item.content, str)
    parts: list[dict[str, Any]] = []
    for part in item.content:
        if isinstance(part, InputImage):
            url: dict[str, Any] = {"url": part.image_url}
            if part.detail is not None:
                url["detail"] = part.detail
            parts.append({"type": "image_url", "image_url": url})
        else:
            parts.append({"type": "text", "text": _part_text(part)})
    return {"role": item.role, "content": parts}


def _response_format(text_format: TextFormat) -> dict[str, Any]:
    if text_format.type == "json_object":
        return {"type": "json_object"}
    schema: dict[str, Any] = {"name": text_format.name, "schema": text_format.schema_}
    if text_format.strict is not None:
        schema["strict"] = text_format.strict
    return {"type": "json_schema", "json_schema": schema}


# ---- the answer's shapes (documentation and tests; `frontend.response_objects` builds
# equivalent dicts) --------------------------------------------------------------------------


class _Shape(BaseModel):
    model_config = ConfigDict(extra="allow")


class OutputTextPart(_Shape):
    type: Literal["output_text"]
    text: str
    annotations: list[Any]
    logprobs: list[Any] = Field(
        description='with include ["message.output_text.logprobs"]: chat\'s logprobs.content'
    )


class OutputMessage(_Shape):
    id: str = Field(description='"msg_" and 32 hex digits')
    type: Literal["message"]
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"]
    content: list[OutputTextPart]


class OutputFunctionCall(_Shape):
    id: str = Field(description='"fc_" and 32 hex digits')
    type: Literal["function_call"]
    status: Literal["in_progress", "completed", "incomplete"]
    call_id: str = Field(description="what a function_call_output item names to answer it")
    name: str
    arguments: str = Field(description="the arguments object as a JSON text")


class OutputReasoning(_Shape):
    id: str = Field(description='"rs_" and 32 hex digits')
    type: Literal["reasoning"]
    status: Literal["in_progress", "completed", "incomplete"]
    summary: list[Any] = Field(description="always empty: no summaries are written")
    content: list[dict[str, Any]] = Field(
        description='with frontend.reasoning_parser: the thinking, `[{"type": '
        '"reasoning_text", "text": ...}]`, before the message (streamed: '
        "response.reasoning_text.delta events)"
    )
    encrypted_content: None = None


class InputTokensDetails(_Shape):
    cached_tokens: int


class OutputTokensDetails(_Shape):
    reasoning_tokens: int


class ResponseUsage(_Shape):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(_Shape):
    reason: Literal["max_output_tokens"]


class ResponseError(_Shape):
    code: str
    message: str


class ResponseObject(_Shape):
    """OpenAI's response object; it echoes the request's settings."""

    id: str = Field(description='"resp_" and 32 hex digits')
    object: Literal["response"]
    created_at: int
    status: Literal["queued", "in_progress", "completed", "incomplete", "failed", "cancelled"]
    background: bool = Field(description="whether it runs in the background (polled, cancellable)")
    error: ResponseError | None
    incomplete_details: IncompleteDetails | None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[OutputReasoning | OutputMessage | OutputFunctionCall]
    parallel_tool_calls: bool
    previous_response_id: str | None
    store: bool = Field(description="whether it was kept (false: not asked, or not kept)")
    temperature: float
    text: dict[str, Any]
    tool_choice: Any
    tools: list[dict[str, Any]]
    top_p: float
    truncation: Literal["disabled", "auto"]
    usage: ResponseUsage | None
    user: str | None
    metadata: dict[str, str]


class ResponseDeleted(_Shape):
    id: str
    object: Literal["response.deleted"]
    deleted: Literal[True]


class InputItemList(_Shape):
    object: Literal["list"]
    data: list[dict[str, Any]] = Field(description="the conversation's input items, with ids")
    first_id: str | None
    last_id: str | None
    has_more: bool
