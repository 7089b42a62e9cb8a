"""The request path of the generation endpoints: parse and validate the body, tokenize,
check the context length (before routing, so a refused request leaves no trace in the
router), route, stream from the worker (migrating on a lost worker), and answer. A request
for `n` choices sends n engine requests to one worker (`frontend.choices`); a batch of
prompts (/v1/completions) is the same fan-out over prompts x n: each prompt is tokenized,
checked and routed on its own, its n choices follow its first to that worker.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from contract.discovery import WorkerCard
from contract.messages import GenerateRequest, MediaRef, SamplingParams, logit_bias_vocab_error
from frontend import errors
from frontend.choices import ChoiceStreams, choice_requests
from frontend.media import MediaItem, kind_of
from frontend.media_store import MediaHold
from frontend.migration import MigratingStream, Route
from frontend.openai_schemas import ChatCompletionRequest, CompletionRequest
from frontend.prepared import Kind, Prepared, Prompt
from frontend.reasoning import ReasoningMode, starts_inside, with_thinking
from frontend.responses import (
    AnsweredResponse,
    ChoiceText,
    FirstToken,
    Generation,
    SSEResponse,
    full_response,
    record,
    stream_events,
    until_disconnect,
)
from frontend.state import FrontendState, check_task, media_workers
from frontend.tokenization import ChatTemplateError
from frontend.tool_calling import ToolUse, template_messages, tool_use

T = TypeVar("T")
# takes a stream no HTTP client holds (a background response's) and answers the request
Detach = Callable[[Prepared, AsyncIterator[bytes], list[Callable[[], None]]], Awaitable[Response]]


def check_context(prepared: Prepared, prompt: Prompt, request: GenerateRequest, limit: int) -> None:
    """400 context_length_exceeded when `prompt` (+ max_tokens) does not fit `limit`
    tokens; sets `request`'s max_tokens: the user's, else all the context leaves."""
    prompt_len = len(prompt.ids)
    if prompt_len >= limit:
        raise errors.context_length_exceeded(
            f"This model's maximum context length is {limit} tokens. However, your "
            f"{prompt.param} has {prompt_len} tokens, which leaves no room for output.",
            param=prompt.param,
        )
    if prepared.user_max_tokens is not None:
        if prompt_len + prepared.user_max_tokens > limit:
            raise errors.context_length_exceeded(
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {prompt_len + prepared.user_max_tokens} tokens ({prompt_len} in "
                f"the {prompt.param}, {prepared.user_max_tokens} for the completion).",
                param="max_tokens",
            )
        request.sampling.max_tokens = prepared.user_max_tokens
    else:
        request.sampling.max_tokens = limit - prompt_len
        if request.sampling.min_tokens > request.sampling.max_tokens:
            raise errors.context_length_exceeded(
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested at least {prompt_len + request.sampling.min_tokens} tokens "
                f"({prompt_len} in the {prompt.param}, min_tokens "
                f"{request.sampling.min_tokens} for the completion).",
                param="min_tokens",
            )


def _route_for(
    state: FrontendState,
    prepared: Prepared,
    prompt: Prompt,
    checked: bool,
    follow: MigratingStream | None = None,
    others: Sequence[tuple[Prompt, GenerateRequest]] = (),
) -> Route:
    """The routing of the attempts of one choice of `prompt`: the router's pick, then (when
    no worker was up to check against before routing) the context check, of `others` too
    (the batch's other prompts, checked by its first: before any prompt is sent). A
    continuation (prompt + tokens so far) keeps the budget `continuation()` left it: the
    workers of a deployment share engine.max_model_len, so it fits wherever the first did.
    With `follow` (choice 0 of the prompt), a first attempt goes to that choice's worker
    while it is routable: there the prompt's KV blocks are shared; a continuation is routed
    afresh."""

    tools = prepared.tools  # a forced call's constraint was asked for as tool_choice
    asked_as = None
    if tools is not None and tools.guided is not None:
        asked_as = {"guided": "function_call" if tools.legacy else "tool_choice"}

    async def route(request: GenerateRequest, exclude: set[str]) -> WorkerCard:
        first = len(request.token_ids) == len(prompt.ids)
        card = _followed(state, follow, exclude) if first else None
        if card is None:
            card = await state.pick_worker(request, exclude, asked_as)
        if not checked and first:
            check_context(prepared, prompt, request, card.max_model_len)
            for other, other_request in others:
                check_context(prepared, other, other_request, card.max_model_len)
        return card

    return route


def _followed(
    state: FrontendState, follow: MigratingStream | None, exclude: set[str]
) -> WorkerCard | None:
    """The worker of `follow` if it was sent and that worker is still a candidate."""
    if follow is None or not follow.opened:
        return None
    card = follow.card
    if any(c.worker_id == card.worker_id for c in state.candidates(exclude)):
        return card
    return None


async def guard_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects meanwhile, cancel it and raise ClientGone."""
    return await until_disconnect(request.receive, work)


class AnswerShape(Protocol):
    """How a chat request's answer is written for an endpoint other than chat/completions
    (/v1/responses: `frontend.response_objects`): the same prepared request, routing and
    generation, another body and other stream events."""

    id_prefix: str  # the response id's, before 32 hex digits

    async def body(self, chat: dict[str, Any]) -> dict[str, Any]:
        """The non-streamed answer, from the chat completion `full_response` built."""
        ...

    def events(
        self, state: FrontendState, prepared: Prepared, choices: ChoiceStreams, deadline: float
    ) -> AsyncIterator[bytes]:
        """The streamed answer's SSE bytes (`stream_events`' counterpart)."""
        ...


async def read_json_body(state: FrontendState, request: Request) -> dict[str, Any]:
    """The request's JSON object body (413 past frontend.max_request_bytes, 400 if not JSON)."""
    raw = await _read_body(request, state.config.frontend.max_request_bytes)
    return errors.parse_json_body(raw)  # type: ignore[no-any-return]


async def handle(state: FrontendState, request: Request, kind: Kind) -> Response:
    arrival = time.perf_counter()
    data = await read_json_body(state, request)
    body: ChatCompletionRequest | CompletionRequest
    if kind == "chat":
        body = ChatCompletionRequest.model_validate(data)
    else:
        body = CompletionRequest.model_validate(data)
    return await serve(state, request, body, kind, arrival)


async def serve(
    state: FrontendState,
    request: Request,
    body: ChatCompletionRequest | CompletionRequest,
    kind: Kind,
    arrival: float,
    shape: AnswerShape | None = None,
    detach: Detach | None = None,
) -> Response:
    """Serve a validated request: tokenize, check, route, generate, answer (in `shape`'s
    form when given, else the endpoint's own). With `detach` (a streamed request), what
    fails before routing is the answer as ever; the stream (routed and started when first
    read) goes to `detach` with what to call once it ended, and `detach` answers."""
    if body.model is not None and body.model != state.served_name:
        raise errors.model_not_found(body.model)
    if state.config.model.task != "generate":
        check_task(state, "generate", request.url.path)
    _refuse_too_many_choices(state, body)
    _refuse_what_cannot_fit(state, body)
    images = body.image_parts() if isinstance(body, ChatCompletionRequest) else []
    tools = _tool_use(state, body, images)
    hold: MediaHold | None = None
    try:
        media: list[MediaRef] = []
        if images:
            assert isinstance(body, ChatCompletionRequest)
            prompt_ids, media, hold = await guard_disconnect(
                request, _prepare_images(state, body, images)
            )
            prompts = [Prompt(prompt_ids, "messages")]
        else:
            prompts = _prompts(state, body, tools)
        sampling = _sampling(state, body, tools)
        reasoning = None
        if state.reasoning_format is not None and isinstance(body, ChatCompletionRequest):
            reasoning = _reasoning_mode(state, body, prompts[0].ids, sampling)
        prepared = Prepared(
            kind, body, state.served_name, prompts, sampling, arrival, media, tools, reasoning
        )
        if shape is not None:
            prepared.response_id = shape.id_prefix + prepared.response_id.partition("-")[2]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + state.config.frontend.request_timeout_s
        if detach is not None and shape is not None:
            release = [] if hold is None else [hold.release]
            response = await detach(prepared, _detached(state, prepared, deadline, shape), release)
            hold = None  # released once the stream ended
            return response
        if prepared.stream:
            choices = await guard_disconnect(request, _start(state, prepared, deadline))
            on_close = [choices.close] if hold is None else [choices.close, hold.release]
            events = (stream_events if shape is None else shape.events)(
                state, prepared, choices, deadline
            )
            response = SSEResponse(events, on_close)
            hold = None  # the stream releases it when it ends
            response.headers["X-Request-Id"] = prepared.response_id
            return response
        return await guard_disconnect(request, _complete(state, prepared, deadline, shape))
    finally:
        if hold is not None:  # answered, refused, or the client left: workers are done
            hold.release()


async def _detached(
    state: FrontendState, prepared: Prepared, deadline: float, shape: AnswerShape
) -> AsyncIterator[bytes]:
    """`shape`'s stream of a request no HTTP client holds: routed, sent and started when
    first read (an error before the first event is raised from here)."""
    choices = await _start(state, prepared, deadline)
    try:
        async for event in shape.events(state, prepared, choices, deadline):
            yield event
    finally:
        choices.close()


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, or a 413 as soon as it is known to pass `limit` bytes (a declared
    Content-Length before reading anything, else while reading). Read from the ASGI
    messages themselves: Starlette's `request.stream()` is an async generator around the
    same loop, a few µs more per request for nothing here."""
    declared = _content_length(request.scope["headers"])
    if declared is not None and declared > limit:
        raise errors.request_too_large(limit)
    receive = request.receive
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        part = message.get("body", b"")
        if part:
            size += len(part)
            if size > limit:
                raise errors.request_too_large(limit)
            parts.append(part)
        if not message.get("more_body", False):
            return parts[0] if len(parts) == 1 else b"".join(parts)


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The Content-Length a request declares (None: none, or not a number), read from the
    ASGI scope's headers (lower-cased names) without building Starlette's `Headers`."""
    for name, value in headers:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def _refuse_too_many_choices(
    state: FrontendState, body: ChatCompletionRequest | CompletionRequest
) -> None:
    """400 for more choices than the config allows: `n` per prompt (frontend.max_n), and
    prompts x n in all (frontend.max_choices_per_request)."""
    config = state.config.frontend
    n = body.num_choices()
    if n > config.max_n:
        raise errors.bad_request(
            f"n: at most {config.max_n} choices per prompt (frontend.max_n), not {n}",
            param="n",
        )
    if isinstance(body, CompletionRequest) and body.is_batch():
        count = len(body.prompt)
        cap = config.max_choices_per_request
        if count * n > cap:
            raise errors.bad_request(
                f"prompt: {count} prompts x n={n} are {count * n} choices; at most {cap} per "
                "request (frontend.max_choices_per_request)",
                param="prompt",
            )


def _refuse_what_cannot_fit(
    state: FrontendState, body: ChatCompletionRequest | CompletionRequest
) -> None:
    """400 context_length_exceeded, before tokenizing, for a text prompt so long that even
    at the tokenizer's longest token per step it could not fit (a megabyte prompt would
    otherwise cost seconds of frontend CPU to be refused after all)."""
    limit = state.context_limit()
    if limit is None:
        return
    if isinstance(body, ChatCompletionRequest):
        texts = [("messages", sum(len(m.text()) for m in body.messages))]
    else:  # token ids are counted exactly, as they are
        texts = [
            (body.prompt_param(index), len(prompt))
            for index, prompt in enumerate(body.prompts())
            if isinstance(prompt, str)
        ]
    for param, chars in texts:
        at_least = _fewest_tokens_of(state, chars)
        if at_least >= limit:
            raise errors.context_length_exceeded(
                f"This model's maximum context length is {limit} tokens. However, your "
                f"{param} is at least {at_least} tokens long ({chars} characters), which "
                "leaves no room for output.",
                param=param,
            )


def fewest_tokens(state: FrontendState, body: ChatCompletionRequest) -> int:
    """A floor on the tokens of `body`'s messages, from their characters alone: telling a
    far too long prompt costs no tokenizing."""
    return _fewest_tokens_of(state, sum(len(m.text()) for m in body.messages))


def _fewest_tokens_of(state: FrontendState, chars: int) -> int:
    """The fewest tokens `chars` characters of text can be (the tokenizer's longest token
    per step)."""
    return -(-chars // state.tokenizer.max_token_chars)


def prompt_length(state: FrontendState, body: ChatCompletionRequest) -> int:
    """The tokens of `body`'s prompt as `serve` builds it, nothing routed: a caller that
    fits a conversation to the context (`truncation: "auto"`) asks before serving. An image
    counts as its one placeholder token (its rows are known once it is loaded)."""
    return len(_prompts(state, body, _tool_use(state, body, body.image_parts()))[0].ids)


def _tool_use(
    state: FrontendState,
    body: ChatCompletionRequest | CompletionRequest,
    images: list[tuple[str, str]],
) -> ToolUse | None:
    """A chat request's tool calling (None: none; `frontend.tool_calling`)."""
    if not isinstance(body, ChatCompletionRequest):
        return None
    tools = tool_use(body, state.config.frontend.tool_call_parser, state.tokenizer)
    if tools is not None and images:
        raise errors.bad_request(
            "messages: image parts together with tool calling are not supported yet",
            param="messages",
        )
    return tools


def _prompts(
    state: FrontendState,
    body: ChatCompletionRequest | CompletionRequest,
    tools: ToolUse | None = None,
) -> list[Prompt]:
    """The request's prompts (a batch's in order), tokenized and checked; the first bad
    one is a 400 naming it (`prompt.<i>` in a batch) before anything is routed."""
    tokenizer = state.tokenizer
    if isinstance(body, ChatCompletionRequest):
        if tools is not None:  # tool calls and answers in the history, functions shown
            messages = template_messages(body.messages)
        else:  # most HF templates know no "developer" role: OpenAI's new name for system
            messages = [
                {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in body.messages
            ]
            with_thinking(messages, body.messages)
        try:
            functions = tools.tools if tools is not None else None
            ids = tokenizer.encode_chat(messages, functions, body.template_kwargs())
        except ChatTemplateError as exc:
            raise errors.bad_request(str(exc), param=exc.param) from None
        return [Prompt(_checked_ids(state, ids, "messages"), "messages")]
    prompts = []
    for index, prompt in enumerate(body.prompts()):
        param = body.prompt_param(index)
        if isinstance(prompt, str):
            ids = tokenizer.encode(prompt, add_special_tokens=True)
        else:
            ids = in_vocabulary(state, prompt, param)
        echo = None
        if body.echo:  # the prompt as sent: its text, or its ids' (special tokens too)
            echo = prompt if isinstance(prompt, str) else tokenizer.decode(ids, False)
        prompts.append(Prompt(_checked_ids(state, ids, param), param, echo))
    return prompts


def in_vocabulary(state: FrontendState, ids: list[int], param: str) -> list[int]:
    """A copy of token ids a client sent, or a 400 naming `param` for one outside the
    model's vocabulary."""
    vocab = state.tokenizer.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise errors.bad_request(
            f"{param}: token id {bad} is outside the vocabulary (0..{vocab - 1})", param=param
        )
    return list(ids)


def _checked_ids(state: FrontendState, ids: list[int], param: str) -> list[int]:
    """`ids`, or a 400 naming `param` for an empty prompt or an image token without image."""
    if not ids:
        raise errors.bad_request(f"{param}: the prompt is empty", param=param)
    if state.vlm is not None and state.vlm.image_token_id in ids:
        raise errors.bad_request(
            f"{param}: the prompt holds the model's image placeholder token "
            f"(id {state.vlm.image_token_id}) but no image; send images as image_url parts",
            param=param,
        )
    return ids


async def _prepare_images(
    state: FrontendState, body: ChatCompletionRequest, images: list[tuple[str, str]]
) -> tuple[list[int], list[MediaRef], MediaHold]:
    """A chat request with image parts: the prompt's ids with each image's placeholder run
    (the chat template writes one image token per image; it is repeated once per feature
    row, as transformers' LLaVA processor does), the images loaded and checked
    (`frontend.media`), held in the media store for the workers; their MediaRefs."""
    vlm, intake = state.vlm, state.media_intake
    if vlm is None or intake is None:
        raise errors.bad_request(
            f"messages: model {state.served_name!r} is a text-only model and takes no images",
            param="messages",
        )
    limit = state.config.multimodal.max_images_per_request
    if len(images) > limit:
        raise errors.bad_request(
            f"{images[limit][0]}: at most {limit} images per request "
            f"(multimodal.max_images_per_request), not {len(images)}",
            param=images[limit][0],
        )
    kinds: set[str] = {kind_of(url) for _, url in images}
    candidates = state.candidates(set())
    if candidates:  # refused before anything is loaded (routing checks again)
        media_workers(candidates, kinds)
    ids = _encode_chat(state, _template_messages(body), body.template_kwargs())
    count = ids.count(vlm.image_token_id)
    if count != len(images):
        raise errors.bad_request(
            f"messages: the chat template wrote {count} image placeholders for "
            f"{len(images)} images (is the image token in the text?)",
            param="messages",
        )
    started = time.perf_counter()
    loaded = await asyncio.gather(
        *(intake.load(url, param) for param, url in images), return_exceptions=True
    )
    for outcome in loaded:
        if isinstance(outcome, BaseException):
            raise outcome
    items: list[MediaItem] = loaded  # type: ignore[assignment]
    metrics = state.metrics
    metrics.media_intake.observe(time.perf_counter() - started)
    for item in items:
        metrics.media_items.labels(item.kind).inc()
        metrics.media_bytes.labels(item.kind).inc(len(item.payload))
    hold = state.media_store.hold([(item.payload, item.content_hash) for item in items])
    try:
        expanded, media = _expand(ids, vlm.image_token_id, items, hold, state.media_subject)
    except BaseException:
        hold.release()
        raise
    return expanded, media, hold


def _template_messages(body: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The messages as a multimodal chat template takes them: a content with parts becomes
    text parts and `{"type": "image"}` items (transformers' convention)."""
    messages: list[dict[str, Any]] = []
    for message in body.messages:
        role = "system" if message.role == "developer" else message.role
        content = message.content
        if content is None or isinstance(content, str):
            messages.append({"role": role, "content": content or ""})
            continue
        parts = [
            {"type": "text", "text": part.text} if part.type == "text" else {"type": "image"}
            for part in content
        ]
        messages.append({"role": role, "content": parts})
    return with_thinking(messages, body.messages)


def _reasoning_mode(
    state: FrontendState, body: ChatCompletionRequest, ids: list[int], sampling: SamplingParams
) -> ReasoningMode | None:
    """How a chat answer's thinking is split off: whether the output starts inside the
    block is read from the prompt's end (the template may have opened or closed it). A
    constrained answer (response_format, a forced call) comes after the thinking, which
    its grammar leaves free (`sampling.guided.thinking` is set here); where the workers
    constrain the whole output (TensorRT-LLM), it is all answer, from the first token."""
    fmt = state.reasoning_format
    if fmt is None:
        return None
    tail = state.tokenizer.decode(ids[-_PROMPT_TAIL_TOKENS:], skip_special_tokens=False)
    start_token, end_token = state.reasoning_tokens
    mode = ReasoningMode(
        fmt, starts_inside(fmt, tail), body.include_reasoning, start_token, end_token
    )
    guided = sampling.guided
    if guided is not None:
        if not state.constrains_after_thinking():
            return None
        sampling.guided = guided.model_copy(update={"thinking": mode.fence(state.tokenizer)})
    return mode


_PROMPT_TAIL_TOKENS = 16  # enough for a start tag and the newlines after it


def _encode_chat(
    state: FrontendState, messages: list[dict[str, Any]], template_kwargs: dict[str, Any] | None
) -> list[int]:
    try:
        return state.tokenizer.encode_chat(messages, template_kwargs=template_kwargs)
    except ChatTemplateError as exc:
        raise errors.bad_request(str(exc), param=exc.param) from None


def _expand(
    ids: list[int], image_token: int, items: list[MediaItem], hold: MediaHold, subject: str
) -> tuple[list[int], list[MediaRef]]:
    """Each image token of `ids` repeated to its image's run length, and the MediaRefs."""
    expanded: list[int] = []
    media: list[MediaRef] = []
    start = 0
    for index, item in enumerate(items):
        position = ids.index(image_token, start)
        expanded.extend(ids[start:position])
        media.append(
            MediaRef(
                kind=item.kind,
                offset=len(expanded),
                length=item.length,
                content_hash=item.content_hash,
                subject=subject,
                media_id=hold.media_ids[index],
                nbytes=len(item.payload),
                dtype=item.dtype,
                shape=list(item.shape) if item.shape else None,
                width=item.width,
                height=item.height,
            )
        )
        expanded.extend([image_token] * item.length)
        start = position + 1
    expanded.extend(ids[start:])
    return expanded, media


def _sampling(
    state: FrontendState,
    body: ChatCompletionRequest | CompletionRequest,
    tools: ToolUse | None = None,
) -> SamplingParams:
    params = SamplingParams(
        ignore_eos=body.ignore_eos,
        stop_token_ids=[] if body.ignore_eos else list(state.tokenizer.eos_token_ids),
        seed=body.seed,
        logprobs=body.requested_logprobs(),
        min_tokens=body.min_tokens or 0,
        logit_bias=body.logit_bias or {},
        guided=tools.guided if tools is not None and tools.guided else body.guided_decoding(),
    )
    if params.logit_bias:  # the schema checked count and range; the vocabulary is ours
        bad = logit_bias_vocab_error(params.logit_bias, state.tokenizer.vocab_size)
        if bad is not None:
            raise errors.bad_request(f"{bad[0]}: {bad[1]}", param=bad[0])
    if isinstance(body, CompletionRequest) and body.wants_prompt_logprobs():
        params.prompt_logprobs = body.logprobs
    for name in (
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
    ):
        value = getattr(body, name)
        if value is not None:
            setattr(params, name, value)
    return params


async def _start(state: FrontendState, prepared: Prepared, deadline: float) -> ChoiceStreams:
    """Send every choice to a worker and wait for the first chunk of any (a worker error
    before it is an HTTP error, even for a stream; a later one, the stream's error event).
    Every prompt is checked against the context before any is routed (with no worker to
    check against yet: once the first is routed, before it is sent); each prompt's choice 0
    is routed on its own, its other choices follow it."""
    prompts = prepared.prompts
    sampling = prepared.sampling
    requests = [
        GenerateRequest(
            request_id=secrets.token_hex(16),
            client_id=prepared.response_id,
            token_ids=prompt.ids,
            # each prompt its own copy: the context check sets its max_tokens
            sampling=sampling if len(prompts) == 1 else sampling.model_copy(),
            media=prepared.media,
        )
        for prompt in prompts
    ]
    limit = state.context_limit()
    if limit is not None:  # refused before routing: nothing to undo in the router
        for prompt, request in zip(prompts, requests, strict=True):
            check_context(prepared, prompt, request, limit)
    checked = limit is not None
    others = [] if checked else list(zip(prompts[1:], requests[1:], strict=True))
    streams: list[MigratingStream] = []
    for prompt, request in zip(prompts, requests, strict=True):
        follow: MigratingStream | None = None
        for choice in choice_requests(request, prepared.n):
            route = _route_for(state, prepared, prompt, checked, follow, others)
            others = []  # the first route checks them
            stream = MigratingStream(
                state.client,
                route,
                choice,
                limit=state.config.frontend.migration_limit,
                metrics=state.metrics,
            )
            follow = follow or stream
            streams.append(stream)
    choices = ChoiceStreams(streams)
    try:
        await choices.start(deadline)
    except TimeoutError:
        raise errors.timed_out(state.config.frontend.request_timeout_s) from None
    return choices


async def _complete(
    state: FrontendState, prepared: Prepared, deadline: float, shape: AnswerShape | None = None
) -> Response:
    choices = await _start(state, prepared, deadline)
    first_token = FirstToken(state.metrics, prepared.arrival)
    texts = [
        ChoiceText(Generation(state, prepared, first_token, prepared.prompt_of(index)))
        for index in range(prepared.num_choices)
    ]
    want_logprobs = prepared.logprobs is not None
    left = prepared.num_choices
    try:
        while left:
            index, output = await choices.next(deadline)
            if texts[index].add(output, want_logprobs):
                left -= 1
                if output.finish_reason is None:  # a stop string: the worker may stop now
                    choices.finish(index)
        data = full_response(state, prepared, texts, choices.card(0).simulated)
        if shape is not None:
            data = await shape.body(data)
    except TimeoutError:
        choices.close()
        raise errors.timed_out(state.config.frontend.request_timeout_s) from None
    except BaseException:
        choices.close()
        raise
    generations = [text.generation for text in texts]
    # the router's release and the metrics wait until the answer is sent
    return AnsweredResponse(
        data,
        [choices.close, functools.partial(record, state.metrics, prepared, generations)],
        prepared.response_id,
    )
