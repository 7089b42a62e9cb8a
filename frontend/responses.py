"""OpenAI response building: the full JSON response, the SSE event stream, usage and
logprobs, from a request's `GenerateOutput` chunks (`Generation` turns one choice's chunks
into text). A request of `n` choices has one `Generation` per choice; its usage counts the
prompt once and the completion tokens of every choice (as OpenAI and vLLM do). A batch of
prompts has n choices per prompt, in prompt order; its usage sums the prompts' usages. With
`echo`, each choice's text starts with its prompt's text (streamed: its first piece)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import orjson
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from contract.messages import GenerateOutput, TokenLogprob
from frontend import errors
from frontend.choices import ChoiceStreams
from frontend.errors import OpenAIError
from frontend.metrics import FrontendMetrics
from frontend.prepared import Prepared, Prompt
from frontend.state import FrontendState
from frontend.tokenization import IncrementalDetokenizer, StopMatcher, TextTokenizer

T = TypeVar("T")
_JSON = "application/json"
_SSE_DONE = b"data: [DONE]\n\n"
_JSON_HEADER = (b"content-type", _JSON.encode())


def json_response(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type=_JSON)


def _sse(data: Any) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


class ClientGone(Exception):
    """The HTTP client disconnected before the response was ready."""


WATCH_AFTER_S = 0.02  # how long a request runs before its client's leaving is watched


async def until_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects meanwhile (an `http.disconnect` from
    `receive`), cancel it and raise ClientGone. One watcher task, no task group, and only
    for work still running after `WATCH_AFTER_S`: most requests of a fast deployment are
    answered sooner, and a task per request (its start, its cancel: two loop turns, one of
    them before the request is even sent) is a measurable part of a c=1 request's latency.
    A client that left before is seen by the watcher's first `receive()` (the server keeps
    the disconnect), so it is caught 20 ms later at most."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    gone = False
    watcher: asyncio.Task[None] | None = None

    async def watch() -> None:
        nonlocal gone
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                gone = True
                task.cancel()
                return

    def start_watching() -> None:
        nonlocal watcher
        watcher = loop.create_task(watch())

    timer = loop.call_later(WATCH_AFTER_S, start_watching)
    try:
        return await work
    except asyncio.CancelledError:
        if gone:
            task.uncancel()
            raise ClientGone() from None
        raise
    finally:
        timer.cancel()
        if watcher is not None:
            watcher.cancel()


class AnsweredResponse(Response):
    """A whole (non-streamed) JSON answer whose request's bookkeeping (`after`: releasing
    its router entries, counting it in the metrics) runs once the answer is sent, however
    the sending ends: the client does not wait for work it does not need (at c=1 that
    work was ~40 µs of a request's path).

    Its head is written here, the headers Starlette's `Response` would make for it
    (content-length, content-type, then `X-Request-Id` when given) without that class's
    header building and `MutableHeaders`: a few µs of every answer's path. `headers` still
    works for adding one (several frontend processes name theirs)."""

    def __init__(
        self, data: Any, after: list[Callable[[], None]], request_id: str | None = None
    ) -> None:
        self.body = body = orjson.dumps(data)
        self.status_code = 200
        self.background = None
        self.raw_headers = [(b"content-length", b"%d" % len(body)), _JSON_HEADER]
        if request_id is not None:
            self.raw_headers.append((b"x-request-id", request_id.encode()))
        self.after = after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            await send({"type": "http.response.body", "body": self.body})
        finally:
            for callback in self.after:
                callback()


class SSEResponse(StreamingResponse):
    """A StreamingResponse that runs `on_close` callbacks however it ends.

    Starlette may cancel a stream before its generator ever started (client gone at once);
    the generator's `finally` would then never run, so the abort and the in-flight count
    are settled here instead. The client's leaving is watched by `until_disconnect`: what
    Starlette does with an anyio task group (two tasks and cancel scopes per stream), with
    one watcher task.
    """

    def __init__(self, content: AsyncIterator[bytes], on_close: list[Callable[[], None]]) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await until_disconnect(receive, self.stream_response(send))
        except ClientGone:
            pass
        finally:
            for callback in self.on_close:
                callback()


class FirstToken:
    """Observes a request's time to first token once, whichever of its choices is first."""

    __slots__ = ("_arrival", "_metrics", "seen")

    def __init__(self, metrics: FrontendMetrics, arrival: float) -> None:
        self._metrics = metrics
        self._arrival = arrival
        self.seen = False

    def observe(self, now: float) -> None:
        if not self.seen:
            self.seen = True
            self._metrics.ttft.observe(now - self._arrival)


class Generation:
    """Turns one choice's GenerateOutput chunks into text deltas, logprobs, usage and a
    finish reason; the choices of one request share their `FirstToken`. `prompt`: the
    prompt the choice continues (default: the request's first)."""

    def __init__(
        self,
        state: FrontendState,
        prepared: Prepared,
        first_token: FirstToken | None = None,
        prompt: Prompt | None = None,
    ) -> None:
        prompt_ids = (prompt or prepared.prompts[0]).ids
        self._tokenizer = state.tokenizer
        self._metrics = state.metrics
        self._prepared = prepared
        self._first_token = first_token or FirstToken(state.metrics, prepared.arrival)
        self._detok = IncrementalDetokenizer(state.tokenizer, prompt_ids)
        self._stops = StopMatcher(prepared.stops)
        # the text of the first min_tokens tokens is never matched against stop strings
        # (vLLM's rule: no stop ends the output before min_tokens)
        self._unmatched_tokens = prepared.sampling.min_tokens if prepared.stops else 0
        self.prompt_ids = prompt_ids
        self.prompt_tokens = len(prompt_ids)
        # echo + logprobs: the worker's prompt logprobs (first chunk); None until they come
        self.prompt_logprobs: list[TokenLogprob] | None = None
        self._prompt_only = prepared.prompt_only
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._last_token_time: float | None = None

    def consume(self, output: GenerateOutput) -> tuple[str, list[TokenLogprob]]:
        """The text to emit for `output` (after stop handling) and its tokens' logprobs."""
        if output.num_prompt_tokens:
            self.prompt_tokens = output.num_prompt_tokens
        if output.num_cached_tokens:
            self.cached_tokens = output.num_cached_tokens
        if output.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = output.prompt_logprobs  # (a migrated attempt's: ignored)
        if self._prompt_only:  # max_tokens 0: the one generated token is left out
            if output.finish_reason is not None and self.finish_reason is None:
                self.finish_reason = "length"
            return "", []
        logprobs = output.logprobs or []
        if self.finish_reason is not None:
            return "", []
        count = len(output.token_ids)
        if count:
            now = time.perf_counter()
            if self._last_token_time is None:
                self._first_token.observe(now)
            else:
                self._metrics.itl.observe((now - self._last_token_time) / count)
            self._last_token_time = now
            self.completion_tokens += count
        ids = output.token_ids
        final = output.finish_reason is not None
        unmatched = ""  # text of tokens within min_tokens: emitted without stop matching
        early = min(count, self._unmatched_tokens)
        if early:
            self._unmatched_tokens -= early
            unmatched = self._detok.add(ids[:early])
            ids = ids[early:]
        text = self._detok.add(ids) if ids else ""
        if final:  # the held-back tail belongs to the last tokens
            if not ids and (early or self._unmatched_tokens):
                unmatched += self._detok.finish()
            else:
                text += self._detok.finish()
        emitted, stopped = self._stops.feed(text) if text else ("", self._stops.stopped)
        emitted = unmatched + emitted
        if stopped:
            self.finish_reason = "stop"
        elif final:
            emitted += self._stops.flush()
            self.finish_reason = "length" if output.finish_reason == "length" else "stop"
        return emitted, logprobs

    def usage(self) -> dict[str, Any]:
        """This choice's usage, as if it were the request's only one."""
        return usage_of([self])

    # ---- logprobs in OpenAI shapes --------------------------------------------------------

    def chat_logprobs(self, entries: list[TokenLogprob]) -> list[dict[str, Any]]:
        piece = self._tokenizer.token_piece
        content = []
        for entry in entries:
            text, raw = piece(entry.token_id)
            top = []
            for alt in entry.top:
                alt_text, alt_raw = piece(alt.token_id)
                top.append({"token": alt_text, "logprob": alt.logprob, "bytes": alt_raw})
            content.append(
                {"token": text, "logprob": entry.logprob, "bytes": raw, "top_logprobs": top}
            )
        return content


def usage_of(generations: Sequence[Generation], n: int | None = None) -> dict[str, Any]:
    """A request's usage: each prompt once (the choices come `n` per prompt, in prompt
    order; None: all are one prompt's), the completion tokens of every choice; a prompt's
    cached tokens are those every choice of it found in the prefix cache (the least of
    them: the first choice's, normally, as the others share the blocks it computed), summed
    over the prompts."""
    if n is None or len(generations) <= n:  # one prompt, the common case
        prompt = generations[0].prompt_tokens
        cached = min(g.cached_tokens for g in generations)
    else:
        groups = [generations[i : i + n] for i in range(0, len(generations), n)]
        prompt = sum(group[0].prompt_tokens for group in groups)
        cached = sum(min(g.cached_tokens for g in group) for group in groups)
    completion = sum(g.completion_tokens for g in generations)
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if cached:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return usage


def record(metrics: FrontendMetrics, prepared: Prepared, generations: Sequence[Generation]) -> None:
    """Count a finished request in the metrics: each prompt once, every choice's tokens."""
    metrics.prompt_tokens.inc(sum(g.prompt_tokens for g in generations[:: prepared.n]))
    metrics.completion_tokens.inc(sum(g.completion_tokens for g in generations))
    metrics.cached_prompt_tokens.inc(sum(g.cached_tokens for g in generations))
    metrics.duration.observe(time.perf_counter() - prepared.arrival)


class ChoiceText:
    """One choice's whole text and logprobs, gathered for a response that is not streamed."""

    __slots__ = ("generation", "logprobs", "parts")

    def __init__(self, generation: Generation) -> None:
        self.generation = generation
        self.parts: list[str] = []
        self.logprobs: list[TokenLogprob] = []

    def add(self, output: GenerateOutput, want_logprobs: bool) -> bool:
        """Take a chunk; whether the choice finished with it (or with a stop string)."""
        text, entries = self.generation.consume(output)
        if text:
            self.parts.append(text)
        if entries and want_logprobs:
            self.logprobs.extend(entries)
        return self.generation.finish_reason is not None


class CompletionLogprobs:
    """Accumulates /v1/completions logprobs (tokens, token_logprobs, top_logprobs, offsets)."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self._piece = tokenizer.token_piece
        self.offset = 0

    def build_prompt(self, generation: Generation) -> dict[str, Any]:
        """The logprobs of `generation`'s prompt tokens (echo), offsets from the echoed
        text's start: the first token has none (null logprob and top_logprobs)."""
        text, _ = self._piece(generation.prompt_ids[0])
        self.offset = len(text)
        rest = self.build(generation.prompt_logprobs or [])
        return {
            "tokens": [text, *rest["tokens"]],
            "token_logprobs": [None, *rest["token_logprobs"]],
            "top_logprobs": [None, *rest["top_logprobs"]],
            "text_offset": [0, *rest["text_offset"]],
        }

    def build(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top_logprobs: list[dict[str, float] | None] = []
        offsets: list[int] = []
        for entry in entries:
            text, _ = self._piece(entry.token_id)
            tokens.append(text)
            token_logprobs.append(entry.logprob)
            top_logprobs.append({self._piece(alt.token_id)[0]: alt.logprob for alt in entry.top})
            offsets.append(self.offset)
            self.offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": offsets,
        }


def full_response(
    state: FrontendState, prepared: Prepared, choices: list[ChoiceText], simulated: bool
) -> dict[str, Any]:
    """The JSON body of a response that is not streamed: one choice per `ChoiceText`."""
    chat = prepared.kind == "chat"
    want_logprobs = prepared.logprobs is not None
    body: list[dict[str, Any]] = []
    for index, choice in enumerate(choices):
        generation = choice.generation
        text = "".join(choice.parts)
        echo = prepared.prompt_of(index).echo
        if echo is not None:
            text = echo + text
        if chat:
            finish = generation.finish_reason
            thinking = None
            if prepared.reasoning is not None:  # the thinking before the answer (and calls)
                thinking, text = prepared.reasoning.split(text)
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if prepared.tools is not None:  # the calls in the text (frontend.tool_calling)
                message, called = prepared.tools.message(text)
                finish = prepared.tools.finish_reason if called else finish
            if thinking is not None:
                message = prepared.reasoning.message(message, thinking)
            body.append({
                "index": index,
                "message": message,
                "logprobs": (
                    {"content": generation.chat_logprobs(choice.logprobs)}
                    if want_logprobs else None
                ),
                "finish_reason": finish,
            })  # fmt: skip
        else:
            logprobs = None
            if want_logprobs:
                built = CompletionLogprobs(state.tokenizer)
                prompt_part = built.build_prompt(generation) if echo is not None else None
                logprobs = built.build(choice.logprobs)
                if prompt_part is not None:  # echo + logprobs: the prompt's tokens first
                    logprobs = _joined(prompt_part, logprobs)
            body.append({
                "index": index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": generation.finish_reason,
            })  # fmt: skip
    response: dict[str, Any] = {
        "id": prepared.response_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": prepared.created,
        "model": prepared.model,
        "choices": body,
        "usage": usage_of([choice.generation for choice in choices], prepared.n),
        "system_fingerprint": None,
    }
    if simulated:
        response["simulated"] = True
    return response


def _joined(first: dict[str, list[Any]], then: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """Two logprobs objects of /v1/completions as one (each list `first`'s, then `then`'s)."""
    return {key: first[key] + then[key] for key in first}


async def stream_events(
    state: FrontendState, prepared: Prepared, choices: ChoiceStreams, deadline: float
) -> AsyncIterator[bytes]:
    """SSE events: (chat) a role chunk per choice, (echo) a prompt chunk per choice, then
    content chunks of the choices as their tokens arrive (each names its choice's `index`),
    each choice's finish chunk, usage of them all, [DONE] once all have finished (or one
    failed: an error event)."""
    count = choices.n  # every prompt's choices
    first_token = FirstToken(state.metrics, prepared.arrival)
    generations = [
        Generation(state, prepared, first_token, prepared.prompt_of(index))
        for index in range(count)
    ]
    chat = prepared.kind == "chat"
    head: dict[str, Any] = {
        "id": prepared.response_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": prepared.created,
        "model": prepared.model,
    }
    if choices.card(0).simulated:
        head["simulated"] = True
    want_logprobs = prepared.logprobs is not None
    completion_logprobs = [
        CompletionLogprobs(state.tokenizer)
        for _ in range(count if want_logprobs and not chat else 0)
    ]
    include_usage = prepared.include_usage
    # echo: a choice's prompt piece goes out with its first chunk (with logprobs, it carries
    # the prompt's, which come with that chunk)
    echo = not chat and prepared.prompts[0].echo is not None
    echo_pending = [echo] * count

    def event(
        index: int,
        text: str | None,
        entries: list[TokenLogprob],
        finish: str | None,
        thought: str = "",
    ) -> bytes:
        choice: dict[str, Any]
        if chat:
            delta: dict[str, Any] = {}
            if text is not None and (text or not thought):
                delta["content"] = text
            if thought:  # a reasoning model's thinking (frontend.reasoning)
                delta["reasoning_content"] = delta["reasoning"] = thought
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            if want_logprobs and entries:
                choice["logprobs"] = {"content": generations[index].chat_logprobs(entries)}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
            if want_logprobs and entries:
                choice["logprobs"] = completion_logprobs[index].build(entries)
        return choice_event(choice)

    def choice_event(choice: dict[str, Any]) -> bytes:
        """One choice's chunk (usage null while streaming, when usage is asked for)."""
        chunk = dict(head)
        chunk["choices"] = [choice]
        if include_usage:
            chunk["usage"] = None
        return _sse(chunk)

    # tool calling: each choice's text goes through its call finder (frontend.tool_calls)
    tool_streams = prepared.tools.streams(count) if prepared.tools is not None else None
    # reasoning: each choice's text is split into thinking and answer first (frontend.reasoning)
    reasoning = prepared.reasoning
    splits = [reasoning.stream() for _ in range(count)] if reasoning is not None else None
    keep_thoughts = reasoning is not None and reasoning.include

    def tool_call_event(index: int, delta: dict[str, Any]) -> bytes:
        return choice_event(
            {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
        )

    def echo_event(index: int, generation: Generation) -> bytes:
        logprobs = completion_logprobs[index].build_prompt(generation) if want_logprobs else None
        text = prepared.prompt_of(index).echo
        return choice_event(
            {"index": index, "text": text, "logprobs": logprobs, "finish_reason": None}
        )

    try:
        if chat:
            for index in range(count):
                role_chunk = dict(head)
                role_chunk["choices"] = [
                    {
                        "index": index,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
                if include_usage:
                    role_chunk["usage"] = None
                yield _sse(role_chunk)
        pending_text = [""] * count
        pending_thought = [""] * count  # a reasoning model's thinking, not yet sent
        pending_entries: list[list[TokenLogprob]] = [[] for _ in range(count)]
        waiting: list[int] = []  # choices with pending text, in the order it came

        def flush(i: int) -> bytes:
            sent = event(i, pending_text[i], pending_entries[i], None, pending_thought[i])
            pending_text[i], pending_thought[i], pending_entries[i] = "", "", []
            return sent

        left = count
        while left:
            index, output = await choices.next(deadline)
            generation = generations[index]
            text, entries = generation.consume(output)
            thought = ""
            if splits is not None:
                thought, text = splits[index].feed(text, generation.finish_reason is not None)
                if not keep_thoughts:
                    thought = ""
            if tool_streams is not None:
                pieces = tool_streams[index].pieces(text, generation.finish_reason is not None)
                text = ""
                for piece in pieces:
                    if isinstance(piece, str):
                        text += piece
                        continue
                    # a call's delta: the thinking, content and logprobs before it go first
                    pending_text[index] += text
                    pending_thought[index] += thought
                    pending_entries[index] += entries if want_logprobs else []
                    if pending_text[index] or pending_thought[index] or pending_entries[index]:
                        yield flush(index)
                    text, thought, entries = "", "", []
                    yield tool_call_event(index, piece)
            if echo_pending[index]:
                echo_pending[index] = False
                yield echo_event(index, generation)
            fresh = not (pending_text[index] or pending_thought[index] or pending_entries[index])
            pending_text[index] += text
            if thought:
                pending_thought[index] += thought
            if want_logprobs:
                pending_entries[index].extend(entries)
            if fresh and (pending_text[index] or pending_thought[index] or pending_entries[index]):
                waiting.append(index)
            finish = generation.finish_reason
            if finish is not None and tool_streams is not None:
                finish = tool_streams[index].finish_reason(finish)
            if finish is not None:
                left -= 1
                if output.finish_reason is None:  # a stop string: the worker may stop now
                    choices.finish(index)
                if pending_text[index] or pending_thought[index] or pending_entries[index]:
                    yield flush(index)
                yield event(index, None if chat else "", [], finish)
            # chunks that queued up while we were sending go out as one event per choice
            if left and not choices.has_pending:
                for i in waiting:
                    if pending_text[i] or pending_thought[i] or pending_entries[i]:
                        yield flush(i)
                waiting.clear()
        record(state.metrics, prepared, generations)
        if include_usage:
            usage_chunk = dict(head)
            usage_chunk["choices"] = []
            usage_chunk["usage"] = usage_of(generations, prepared.n)
            yield _sse(usage_chunk)
    except OpenAIError as exc:
        yield _sse(exc.body())
    except TimeoutError:
        yield _sse(errors.timed_out(state.config.frontend.request_timeout_s).body())
    finally:
        choices.close()
    yield _SSE_DONE
