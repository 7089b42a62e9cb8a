"""OpenAI request and response shapes for `/v1/chat/completions`, `/v1/completions` and
`/v1/embeddings`.

Requests are validated here so that every bad input becomes a 400 naming the field
(`messages.0.role`, `temperature`, ...). Unknown extra fields are ignored, as OpenAI clients
send many we do not use (`user`, `store`, `metadata`, ...); but a known field whose meaning
hpcserve does not implement yet (a forced tool call) is refused by name rather than ignored: the
client would get something other than what it asked for. Output constraints
(`response_format`, vLLM's `guided_*`) are compiled here, so a bad schema is a 400 naming it.
The response models document the shapes and are used by tests to check what the hot
path (plain dicts, orjson) emits.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from contract.guided import choice_regex, spec_error
from contract.messages import SAMPLING_BOUNDS, GuidedDecoding, GuidedKind, logit_bias_error

Role = Literal["system", "user", "assistant", "developer", "tool", "function"]
MAX_STOP_STRINGS = 4


def _not_yet(what: str, param: str | None = None) -> ValueError:
    """The refusal of a field hpcserve knows but does not implement yet; `param` names it
    where pydantic's location does not (a model validator's)."""
    return ValueError(f"{param + ': ' if param else ''}hpcserve does not support {what} yet")


def _bounded(name: str, **kwargs: Any) -> Any:
    """A field whose range is the one of `contract.messages.SAMPLING_BOUNDS[name]`."""
    return Field(default=None, **SAMPLING_BOUNDS[name].constraints(), **kwargs)


# what the frontend itself gives every chat template (`chat_template_kwargs` cannot set them)
RESERVED_TEMPLATE_VARIABLES = frozenset(
    {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"}
)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ImageURL(_Request):
    url: str = Field(
        min_length=1,
        description="data:image/...;base64,..., http(s):// (multimodal.allow_remote), or a "
        "file under multimodal.allowed_local_media_path; a name ending in .pt, .pth, .bin or "
        ".safetensors is a precomputed image embedding [tokens, hidden]",
    )
    detail: Literal["auto", "low", "high"] | None = None  # accepted; the model's size is used


class ImagePart(_Request):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCall(_Request):
    """A call as an assistant message holds it: `arguments` is a JSON text."""

    name: str = Field(min_length=1)
    arguments: str = Field(description="the arguments object as a JSON text")


class MessageToolCall(_Request):
    """One entry of an assistant message's `tool_calls` (a call the model made earlier)."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = Field(
        default=None, description='role "function" (legacy): the function that answered'
    )
    tool_calls: list[MessageToolCall] | None = Field(
        default=None,
        description="an assistant message's calls, rendered by the chat template (tool "
        "calling must be on: frontend.tool_call_parser)",
    )
    tool_call_id: str | None = Field(
        default=None, description='role "tool": the id of the call this message answers'
    )
    function_call: FunctionCall | None = Field(
        default=None, description="an assistant message's call (legacy form of tool_calls)"
    )
    reasoning_content: str | None = Field(
        default=None,
        description="an assistant message's thinking, as an earlier answer carried it (given "
        "to the chat template as `reasoning_content`; templates that do not render it drop it)",
    )
    reasoning: str | None = Field(default=None, description="vLLM's name for reasoning_content")

    def thinking(self) -> str | None:
        """The message's thinking, under either name."""
        return self.reasoning_content if self.reasoning_content is not None else self.reasoning

    def has_tool_history(self) -> bool:
        """Whether this message is part of tool calling (a call, or a call's answer)."""
        if self.tool_calls or self.function_call is not None:
            return True
        return self.role in ("tool", "function")

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        # assistant messages may have no content (OpenAI allows it with refusals/tool calls)
        if self.content is None and self.role != "assistant":
            raise ValueError("content is required for this role")
        return self

    def text(self) -> str:
        """The content as one string (text parts joined), as chat templates expect."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, TextPart))

    def image_urls(self) -> list[tuple[int, str]]:
        """(part index, url) of each image part, in order."""
        if self.content is None or isinstance(self.content, str):
            return []
        return [
            (index, part.image_url.url)
            for index, part in enumerate(self.content)
            if isinstance(part, ImagePart)
        ]


class FunctionDefinition(_Request):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(
        default=None, description="the arguments' JSON schema"
    )
    strict: bool | None = None  # accepted; calls are parsed, not constrained


class ToolDefinition(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Request):
    include_usage: bool = False


def _checked_spec(kind: GuidedKind, spec: str) -> str:
    """`spec` when llguidance can build its grammar (compiled once per distinct text:
    `contract.guided`), else ValueError with llguidance's message."""
    error = spec_error(kind, spec)
    if error is not None:
        what = "JSON Schema" if kind == "json_schema" else "pattern"
        raise ValueError(f"invalid {what}: {error}")
    return spec


def _schema_text(schema: dict[str, Any] | str) -> str:
    """A schema given as an object (or, vLLM's guided_json, as JSON text) as JSON text."""
    return schema if isinstance(schema, str) else json.dumps(schema)


class JsonSchemaFormat(_Request):
    """`response_format.json_schema`: the output is JSON valid against `schema` (absent:
    any JSON object). `strict` is accepted: the output always follows the schema."""

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _compiles(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            _checked_spec("json_schema", _schema_text(value))
        return value


class ResponseFormat(_Request):
    """OpenAI's `response_format`: free "text", any JSON object, or JSON of a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('json_schema: required when type is "json_schema"')
        return self

    def guided(self) -> GuidedDecoding | None:
        if self.type == "json_object" or (
            self.type == "json_schema" and self.json_schema and self.json_schema.schema_ is None
        ):
            return GuidedDecoding(kind="json_object")
        if self.type == "json_schema" and self.json_schema is not None:
            return GuidedDecoding(
                kind="json_schema", spec=_schema_text(self.json_schema.schema_ or {})
            )
        return None


class _SamplingFields(_Request):
    """Fields shared by both endpoints; ranges are contract.messages.SAMPLING_BOUNDS."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = _bounded("max_tokens")
    temperature: float | None = _bounded("temperature")
    top_p: float | None = _bounded("top_p")
    top_k: int | None = _bounded("top_k")
    min_p: float | None = _bounded("min_p")
    presence_penalty: float | None = _bounded("presence_penalty")
    frequency_penalty: float | None = _bounded("frequency_penalty")
    repetition_penalty: float | None = _bounded("repetition_penalty")
    seed: int | None = _bounded("seed")
    stop: str | list[str] | None = None
    n: int | None = Field(
        default=None, ge=1,
        description="how many choices to generate for the prompt (each prompt of a batch; at "
        "most frontend.max_n); with a `seed`, choice i samples with seed + i",
    )  # fmt: skip
    ignore_eos: bool = False
    user: str | None = None
    min_tokens: int | None = Field(
        default=None, **SAMPLING_BOUNDS["min_tokens"].constraints(),
        description="EOS and stop tokens cannot end the output before this many tokens "
        "(vLLM's extension); at most max_tokens",
    )  # fmt: skip
    logit_bias: dict[int, float] | None = Field(
        default=None,
        description="token id -> bias in [-100, 100] added to its logit before sampling "
        "(at most 300 entries)",
    )
    response_format: ResponseFormat | None = None
    # vLLM's extensions for constrained output (at most one constraint in a request)
    guided_json: dict[str, Any] | str | None = Field(
        default=None, description="the output is JSON valid against this JSON Schema"
    )
    guided_regex: str | None = Field(
        default=None, description="the output matches this pattern (Rust regex syntax)"
    )
    guided_choice: list[str] | None = Field(
        default=None, min_length=1, description="the output is exactly one of these texts"
    )

    @field_validator("guided_json")
    @classmethod
    def _json_compiles(cls, value: dict[str, Any] | str | None) -> dict[str, Any] | str | None:
        if value is not None:
            _checked_spec("json_schema", _schema_text(value))
        return value

    @field_validator("guided_regex")
    @classmethod
    def _regex_compiles(cls, value: str | None) -> str | None:
        return value if value is None else _checked_spec("regex", value)

    @model_validator(mode="after")
    def _one_constraint(self) -> _SamplingFields:
        given = [
            name
            for name in ("guided_json", "guided_regex", "guided_choice")
            if getattr(self, name) is not None
        ]
        if self.response_format is not None and self.response_format.type != "text":
            given.append("response_format")
        if len(given) > 1:
            raise ValueError(f"{given[1]}: only one output constraint per request ({given[0]})")
        return self

    def guided_decoding(self) -> GuidedDecoding | None:
        """The request's output constraint for the contract (None: free text)."""
        if self.response_format is not None:
            found = self.response_format.guided()
            if found is not None:
                return found
        if self.guided_json is not None:
            return GuidedDecoding(kind="json_schema", spec=_schema_text(self.guided_json))
        if self.guided_regex is not None:
            return GuidedDecoding(kind="regex", spec=self.guided_regex)
        if self.guided_choice is not None:
            return GuidedDecoding(kind="regex", spec=choice_regex(self.guided_choice))
        return None

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value: dict[int, float] | None) -> dict[int, float] | None:
        bad = logit_bias_error(value) if value else None
        if bad is not None:
            raise ValueError(bad[1])
        return value

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list):
            if len(value) > MAX_STOP_STRINGS:
                raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed")
            if any(not item for item in value):
                raise ValueError("stop strings must not be empty")
        return value

    def num_choices(self) -> int:
        return self.n or 1

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        if isinstance(self.stop, str):
            return [self.stop] if self.stop else []
        return list(self.stop)

    def include_usage_in_stream(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = _bounded("max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = _bounded("logprobs")
    tools: list[ToolDefinition] | None = Field(
        default=None,
        description="functions the model may call (frontend.tool_call_parser must be set; "
        "the chat template must render `tools`); its calls come back as the message's "
        '`tool_calls`, finish_reason "tool_calls"',
    )
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        default=None,
        description='"auto" (the default with tools): the model may call; "none": tools '
        'are not shown to the model; "required" (one or more calls) or a named function: '
        "the output is constrained to the call's JSON (no tool_call_parser needed; the "
        'engine must do constrained output), finish_reason "tool_calls" ("stop" when named)',
    )
    parallel_tool_calls: bool | None = Field(
        default=None, description="false: only the first call of an answer is returned"
    )
    functions: list[FunctionDefinition] | None = Field(
        default=None, description="the legacy form of `tools`"
    )
    function_call: Literal["none", "auto"] | NamedFunction | None = Field(
        default=None, description="the legacy form of `tool_choice`"
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        default=None,
        description="extra variables for the chat template (e.g. Qwen3's "
        '`{"enable_thinking": false}`), as vLLM and SGLang take them',
    )
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = Field(
        default=None,
        description="a reasoning model's effort, given to the chat template as "
        "`reasoning_effort` (as vLLM does; templates that know none ignore it)",
    )
    include_reasoning: bool = Field(
        default=True,
        description="with frontend.reasoning_parser: false leaves the thinking out of the "
        "answer (vLLM's field)",
    )

    def template_kwargs(self) -> dict[str, Any] | None:
        """The chat template's extra variables (None: none, the fast path)."""
        if self.reasoning_effort is None:
            return self.chat_template_kwargs
        return {**(self.chat_template_kwargs or {}), "reasoning_effort": self.reasoning_effort}

    @field_validator("chat_template_kwargs")
    @classmethod
    def _no_reserved_template_variables(cls, value: dict[str, Any] | None) -> Any:
        for name in RESERVED_TEMPLATE_VARIABLES.intersection(value or ()):
            raise ValueError(f"{name}: is set from the request itself, not a template kwarg")
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> ChatCompletionRequest:
        """Fields valid alone but not together (one validator: it runs on every request)."""
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs to be true")
        if self.min_tokens:
            _check_min_tokens(self.min_tokens, self.requested_max_tokens())
        if self.tools or self.functions or self.tool_choice or self.function_call:
            self._check_tool_fields()
        return self

    def _check_tool_fields(self) -> None:
        if self.tools and self.functions:
            raise ValueError("functions: give tools or functions (their legacy form), not both")
        if self.tool_choice is not None and self.function_call is not None:
            raise ValueError("function_call: give tool_choice or function_call, not both")
        choice = self.tool_choice_mode()
        names = [f["name"] for f in self.function_definitions()]
        param = "tool_choice" if self.function_call is None else "function_call"
        if choice == "required" and not names:
            raise ValueError(f'{param}: "required" needs tools to call')
        if isinstance(choice, NamedFunction) and choice.name not in names:
            raise ValueError(f"{param}: names function {choice.name!r}, which is not in tools")

    def function_definitions(self) -> list[dict[str, Any]]:
        """The functions offered (`tools`, or the legacy `functions`), as dicts."""
        if self.tools:
            return [tool.function.model_dump(exclude_none=True) for tool in self.tools]
        return [f.model_dump(exclude_none=True) for f in self.functions or []]

    def tool_choice_mode(self) -> Literal["none", "auto", "required"] | NamedFunction:
        """What the request asks of the model: tool_choice or its legacy form, else "auto"
        when it offers functions, "none" when it does not (OpenAI's defaults)."""
        choice = self.tool_choice if self.tool_choice is not None else self.function_call
        if isinstance(choice, NamedToolChoice):
            return choice.function
        if choice is not None:
            return choice
        return "auto" if self.tools or self.functions else "none"

    def has_tool_history(self) -> bool:
        """Whether a message of the history is a tool call or a tool's answer."""
        return any(message.has_tool_history() for message in self.messages)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens else self.max_tokens

    def image_parts(self) -> list[tuple[str, str]]:
        """(param, url) of every image part of the request, in prompt order; the param
        names the part's URL (`messages.0.content.1.image_url.url`)."""
        if all(isinstance(m.content, str) or m.content is None for m in self.messages):
            return []  # the text hot path: nothing to walk
        return [
            (f"messages.{m}.content.{p}.image_url.url", url)
            for m, message in enumerate(self.messages)
            for p, url in message.image_urls()
        ]

    def requested_logprobs(self) -> int | None:
        """Contract convention: None = no logprobs; 0 = chosen token only; k = also top k."""
        return (self.top_logprobs or 0) if self.logprobs else None


def _prompt_item_kind(item: Any) -> str | None:
    """What a prompt list's item is as a prompt: "a token id", "a text", "a token-id list"
    (None: none of these)."""
    if isinstance(item, int) and not isinstance(item, bool):
        return "a token id"
    if isinstance(item, str):
        return "a text"
    if isinstance(item, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in item
    ):
        return "a token-id list"
    return None


def _json_kind(value: Any, in_prompt_list: bool = True) -> str:
    """A JSON value's kind as a client would name it (in a prompt list: as a prompt item),
    for error messages."""
    kind = _prompt_item_kind(value) if in_prompt_list else None
    if kind is not None:
        return kind
    names = {bool: "a boolean", int: "a number", float: "a number", dict: "an object"}
    names |= {list: "a list", str: "a text"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        description="a prompt (text, or token ids), or a batch of them (a list of texts or of "
        "token-id lists): one response whose choices run prompt by prompt, choice "
        "`index` = prompt_i * n + j, usage summed over the prompts; at most "
        "frontend.max_choices_per_request choices (prompts x n) in all",
    )
    max_tokens: int | None = Field(
        default=None, ge=0,
        description="tokens to generate at most (>= 1); 0 only with `echo` and `logprobs`: "
        "the prompt's tokens and logprobs alone (finish_reason length)",
    )  # fmt: skip
    logprobs: int | None = _bounded("logprobs")
    echo: bool = Field(
        default=False,
        description="each choice's text starts with its prompt (streamed: the choice's first "
        "piece); with `logprobs`, its logprobs start with the prompt's tokens' (the first "
        "token's logprob and top_logprobs null), as vLLM and OpenAI's legacy API return them",
    )
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt_forms(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """Only when pydantic refuses the prompt: say which of its items breaks which form
        (its own errors name one branch of the union, often not the one the client meant)."""
        if isinstance(value, list) and not value:
            raise ValueError("must not be empty")
        try:
            return handler(value)
        except ValidationError:
            if not isinstance(value, list):
                kind = _json_kind(value, in_prompt_list=False)
                raise ValueError(f"must be a text or a list, not {kind}") from None
            kinds = [_prompt_item_kind(item) for item in value]
            bad = next((i for i, kind in enumerate(kinds) if kind != kinds[0]), None)
            if bad is None:  # every item of one kind, that kind not a prompt's
                bad, kinds[0] = 0, None
            if kinds[0] is None:
                raise ValueError(
                    f"item {bad} is {_json_kind(value[bad])}; a prompt is a text, a list of "
                    "token ids, or a batch: a list of texts or of token-id lists"
                ) from None
            rule = (
                "a prompt of token ids holds only token ids"
                if kinds[0] == "a token id"
                else "a batch is all texts or all token-id lists"
            )
            raise ValueError(
                f"item {bad} is {_json_kind(value[bad])} but item 0 is {kinds[0]}: {rule}"
            ) from None

    @model_validator(mode="after")
    def _no_tokens_only_for_the_prompt(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.wants_prompt_logprobs():
            raise ValueError(
                "max_tokens: must be >= 1 (0 only with echo and logprobs: the prompt's "
                "logprobs alone)"
            )
        return self

    def wants_prompt_logprobs(self) -> bool:
        """`echo` with `logprobs`: the response's logprobs cover the prompt's tokens too."""
        return self.echo and self.logprobs is not None

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompts of the request: one, or the batch's, in order."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if isinstance(prompt[0], int):
            return [prompt]  # type: ignore[list-item]
        return prompt  # type: ignore[return-value]

    def is_batch(self) -> bool:
        """Whether `prompt` is a list of prompts (its items are named `prompt.<i>`)."""
        return isinstance(self.prompt, list) and not isinstance(self.prompt[0], int)

    def prompt_param(self, index: int) -> str:
        """What names prompt `index` in errors: `prompt`, or `prompt.<index>` in a batch."""
        return f"prompt.{index}" if self.is_batch() else "prompt"

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix is not supported")
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> CompletionRequest:
        """Fields valid alone but not together (one validator: it runs on every request)."""
        if self.best_of is not None and self.best_of != self.num_choices():
            raise ValueError(
                "best_of: only best_of equal to n is supported (every generated choice is "
                "returned); leave best_of out"
            )
        if self.min_tokens:
            _check_min_tokens(self.min_tokens, self.requested_max_tokens())
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def requested_logprobs(self) -> int | None:
        return self.logprobs


def _check_min_tokens(min_tokens: int | None, max_tokens: int | None) -> None:
    """min_tokens above the requested max_tokens is a 400 naming min_tokens (without a
    max_tokens the limit is what the context leaves: `frontend.serving.check_context`)."""
    if min_tokens and max_tokens is not None and min_tokens > max_tokens:
        raise ValueError(f"min_tokens: must be <= max_tokens ({max_tokens}), not {min_tokens}")


# ---- responses (shapes; the hot path builds equivalent dicts) ----------------------------


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None
    completion_tokens_details: dict[str, int] | None = Field(
        default=None,
        description="with frontend.reasoning_parser and tags that are tokens of the model: "
        "`reasoning_tokens`, the thinking's tokens (counted by the tags' ids)",
    )


class TopLogprobEntry(_Response):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatLogprobEntry(TopLogprobEntry):
    top_logprobs: list[TopLogprobEntry]


class ChatLogprobs(_Response):
    content: list[ChatLogprobEntry] | None


class ResponseToolCall(_Response):
    id: str = Field(description='"call_" and 24 random hex digits')
    type: Literal["function"]
    function: FunctionCall


class ChatResponseMessage(_Response):
    role: Literal["assistant"]
    content: str | None = Field(
        description="the text outside the tool calls (null when the answer is calls only)"
    )
    tool_calls: list[ResponseToolCall] | None = Field(
        default=None,
        description="the calls frontend.tool_call_parser found in the output (a call that "
        "does not parse stays content; a function not in `tools` is returned as vLLM does)",
    )
    function_call: FunctionCall | None = Field(
        default=None, description="the call, for a request with the legacy `functions`"
    )
    reasoning_content: str | None = Field(
        default=None,
        description="with frontend.reasoning_parser: the model's thinking (absent when it "
        "wrote none; `content` is then the answer after it)",
    )
    reasoning: str | None = Field(default=None, description="the same, under vLLM's name")


FinishReason = Literal["stop", "length", "tool_calls", "function_call"]


class ChatChoice(_Response):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaFunctionCall(_Response):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_Response):
    index: int = Field(description="the call's place in the message's tool_calls")
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class ChatDelta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = Field(
        default=None, description="with frontend.reasoning_parser: a piece of the thinking"
    )
    reasoning: str | None = Field(default=None, description="the same, under vLLM's name")
    tool_calls: list[DeltaToolCall] | None = Field(
        default=None,
        description='a call, once whole: id, type and function.name first (arguments ""), '
        "then function.arguments; join the pieces of one `index` (vLLM's shape)",
    )


class ChatChunkChoice(_Response):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(_Response):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "hpcserve"
    max_model_len: int | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class EmbeddingRequest(_Request):
    """`POST /v1/embeddings` (OpenAI's fields; vLLM's `truncate_prompt_tokens` and
    `add_special_tokens`). Served by a deployment with `model.task: embed`."""

    input: str | list[int] | list[str] | list[list[int]] = Field(
        description="a text or a list of token ids, or a batch of them (a list of texts or of "
        "token-id lists; at most frontend.max_embedding_inputs); each is embedded on its own"
    )
    model: str | None = None
    encoding_format: Literal["float", "base64"] = Field(
        default="float",
        description="float: each embedding a list of numbers; base64: its little-endian "
        "float32 bytes, base64 (a quarter of the JSON's size)",
    )
    dimensions: int | None = Field(
        default=None,
        ge=1,
        description="Matryoshka truncation to the first `dimensions` components (normalized "
        "after): only one of model.pooler.matryoshka_dimensions, else refused",
    )
    user: str | None = None  # accepted, unused
    truncate_prompt_tokens: int | None = Field(
        default=None,
        ge=-1,
        description="vLLM's: keep only the last k tokens of each input (-1: the model's "
        "context length); without it an input over the context length is refused",
    )
    add_special_tokens: bool = Field(
        default=True, description="vLLM's: add the tokenizer's special tokens (BOS/EOS) to texts"
    )

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _keeps_some(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("must be -1 (the context length) or at least 1")
        return value

    @field_validator("input")
    @classmethod
    def _nothing_empty(cls, value: Any) -> Any:
        if isinstance(value, str) or (value and isinstance(value[0], int)):
            if not value:
                raise ValueError("must not be empty")
            return value
        if not value:
            raise ValueError("must hold at least one input")
        empty = next((i for i, item in enumerate(value) if not item), None)
        if empty is not None:
            raise ValueError(f"item {empty} is empty")
        return value

    def is_batch(self) -> bool:
        """A list of texts or of token-id lists (not one text, not one id list)."""
        return isinstance(self.input, list) and not isinstance(self.input[0], int)

    def inputs(self) -> list[str | list[int]]:
        """The inputs in order (one for a text or an id list)."""
        if self.is_batch():
            return list(self.input)  # type: ignore[arg-type]
        return [self.input]  # type: ignore[list-item]

    def input_param(self, index: int) -> str:
        """How errors name input `index`: `input`, or `input.<index>` in a batch."""
        return f"input.{index}" if self.is_batch() else "input"


class EmbeddingData(_Response):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="a list of floats, or base64 float32")


class EmbeddingUsage(_Response):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(_Response):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[EmbeddingData]
    usage: EmbeddingUsage
