"""OpenAI response building: the full JSON response, the SSE event stream, usage and
logprobs, from a request's `GenerateOutput` chunks (`Generation` turns them into text)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from starlette.responses import Response, StreamingResponse

from contract.discovery import WorkerCard
from contract.messages import GenerateOutput, TokenLogprob
from frontend import errors
from frontend.errors import OpenAIError, raise_for_worker_error
from frontend.migration import MigratingStream
from frontend.prepared import Prepared
from frontend.state import FrontendState
from frontend.tokenization import IncrementalDetokenizer, StopMatcher, TextTokenizer

_JSON = "application/json"
_SSE_DONE = b"data: [DONE]\n\n"


def json_response(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type=_JSON)


def _sse(data: Any) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


class SSEResponse(StreamingResponse):
    """A StreamingResponse that runs `on_close` callbacks however it ends.

    Starlette may cancel a stream before its generator ever started (client gone at once);
    the generator's `finally` would then never run, so the abort and the in-flight count
    are settled here instead.
    """

    def __init__(self, content: AsyncIterator[bytes], on_close: list[Callable[[], None]]) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for callback in self.on_close:
                callback()


class Generation:
    """Turns GenerateOutput chunks into text deltas, logprobs, usage and a finish reason."""

    def __init__(self, state: FrontendState, prepared: Prepared) -> None:
        self._tokenizer = state.tokenizer
        self._metrics = state.metrics
        self._prepared = prepared
        self._detok = IncrementalDetokenizer(state.tokenizer, prepared.prompt_ids)
        self._stops = StopMatcher(prepared.stops)
        self.prompt_tokens = len(prepared.prompt_ids)
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
        logprobs = output.logprobs or []
        if self.finish_reason is not None:
            return "", []
        count = len(output.token_ids)
        if count:
            now = time.perf_counter()
            if self._last_token_time is None:
                self._metrics.ttft.observe(now - self._prepared.arrival)
            else:
                self._metrics.itl.observe((now - self._last_token_time) / count)
            self._last_token_time = now
            self.completion_tokens += count
        text = self._detok.add(output.token_ids) if count else ""
        final = output.finish_reason is not None
        if final:
            text += self._detok.finish()
        emitted, stopped = self._stops.feed(text) if text else ("", self._stops.stopped)
        if stopped:
            self.finish_reason = "stop"
        elif final:
            emitted += self._stops.flush()
            self.finish_reason = "length" if output.finish_reason == "length" else "stop"
        return emitted, logprobs

    def usage(self) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }
        if self.cached_tokens:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        return usage

    def record(self) -> None:
        self._metrics.prompt_tokens.inc(self.prompt_tokens)
        self._metrics.completion_tokens.inc(self.completion_tokens)
        self._metrics.duration.observe(time.perf_counter() - self._prepared.arrival)

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


class CompletionLogprobs:
    """Accumulates /v1/completions logprobs (tokens, token_logprobs, top_logprobs, offsets)."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self._piece = tokenizer.token_piece
        self.offset = 0

    def build(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        tokens: list[str] = []
        token_logprobs: list[float] = []
        top_logprobs: list[dict[str, float]] = []
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
    state: FrontendState,
    prepared: Prepared,
    generation: Generation,
    text: str,
    logprobs: list[TokenLogprob],
    card: WorkerCard,
) -> dict[str, Any]:
    choice: dict[str, Any]
    if prepared.kind == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": (
                {"content": generation.chat_logprobs(logprobs)}
                if prepared.logprobs is not None
                else None
            ),
            "finish_reason": generation.finish_reason,
        }
        obj = "chat.completion"
    else:
        choice = {
            "index": 0,
            "text": text,
            "logprobs": (
                CompletionLogprobs(state.tokenizer).build(logprobs)
                if prepared.logprobs is not None
                else None
            ),
            "finish_reason": generation.finish_reason,
        }
        obj = "text_completion"
    response: dict[str, Any] = {
        "id": prepared.response_id,
        "object": obj,
        "created": prepared.created,
        "model": prepared.model,
        "choices": [choice],
        "usage": generation.usage(),
        "system_fingerprint": None,
    }
    if card.simulated:
        response["simulated"] = True
    return response


async def stream_events(
    state: FrontendState,
    prepared: Prepared,
    stream: MigratingStream,
    output: GenerateOutput,
    deadline: float,
) -> AsyncIterator[bytes]:
    """SSE events: (chat) a role chunk, content chunks, the finish chunk, usage, [DONE]."""
    generation = Generation(state, prepared)
    chat = prepared.kind == "chat"
    head: dict[str, Any] = {
        "id": prepared.response_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": prepared.created,
        "model": prepared.model,
    }
    if stream.card.simulated:
        head["simulated"] = True
    completion_logprobs = CompletionLogprobs(state.tokenizer) if not chat else None
    want_logprobs = prepared.logprobs is not None

    def event(text: str | None, entries: list[TokenLogprob], finish: str | None) -> bytes:
        choice: dict[str, Any]
        if chat:
            delta: dict[str, Any] = {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            if want_logprobs and entries:
                choice["logprobs"] = {"content": generation.chat_logprobs(entries)}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            if want_logprobs and entries and completion_logprobs is not None:
                choice["logprobs"] = completion_logprobs.build(entries)
        chunk = dict(head)
        chunk["choices"] = [choice]
        if prepared.include_usage:
            chunk["usage"] = None
        return _sse(chunk)

    try:
        if chat:
            role_chunk = dict(head)
            role_chunk["choices"] = [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ]
            if prepared.include_usage:
                role_chunk["usage"] = None
            yield _sse(role_chunk)
        pending_text = ""
        pending_entries: list[TokenLogprob] = []
        while True:
            text, entries = generation.consume(output)
            pending_text += text
            if want_logprobs:
                pending_entries.extend(entries)
            finish = generation.finish_reason
            if finish is not None:
                if pending_text or pending_entries:
                    yield event(pending_text, pending_entries, None)
                yield event(None if chat else "", [], finish)
                break
            # chunks that queued up while we were sending go out as one event
            if (pending_text or pending_entries) and not stream.has_pending:
                yield event(pending_text, pending_entries, None)
                pending_text, pending_entries = "", []
            output = await stream.next(deadline)
            raise_for_worker_error(output, stream.card)
        generation.record()
        if prepared.include_usage:
            usage_chunk = dict(head)
            usage_chunk["choices"] = []
            usage_chunk["usage"] = generation.usage()
            yield _sse(usage_chunk)
    except OpenAIError as exc:
        yield _sse(exc.body())
    except TimeoutError:
        yield _sse(errors.timed_out(state.config.frontend.request_timeout_s).body())
    finally:
        stream.close()
    yield _SSE_DONE
