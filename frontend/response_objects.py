"""OpenAI's Responses API, the answer's side: the response object (`"object": "response"`)
and its SSE stream of typed events, for a request served by the chat path
(`frontend.serving.serve` with `ResponsesAnswer` as its `AnswerShape`).

The non-streamed object is made from the chat completion the chat path built (its
message's text and tool calls become `message` and `function_call` output items); the
stream follows OpenAI's event order (response.created, .in_progress, then per output item
.output_item.added, .content_part.added, .output_text.delta..., .output_text.done,
.content_part.done, .output_item.done, or a call's .function_call_arguments.delta/.done,
and response.completed / .incomplete; a failure after the start is response.failed), each
event with its `event:` line and `sequence_number`. Both end in the same object.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson

from frontend import errors
from frontend.choices import ChoiceStreams
from frontend.errors import OpenAIError
from frontend.prepared import Prepared
from frontend.responses import FirstToken, Generation, record
from frontend.responses_api import ResponsesRequest
from frontend.state import FrontendState
from frontend.tool_calls import ToolCall, ToolCallStream

logger = logging.getLogger(__name__)

# keeps a finished response (True: kept; False: not, and the answer says store false)
Keep = Callable[[dict[str, Any]], Awaitable[bool]]


def _item_id(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


def sse_event(kind: str, fields: dict[str, Any], sequence: int) -> bytes:
    """One typed SSE event (`event:` line, `data:` with its type and sequence number)."""
    data = {"type": kind, **fields, "sequence_number": sequence}
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def usage_of(chat_usage: dict[str, Any]) -> dict[str, Any]:
    """Chat's usage in the Responses shape."""
    details = chat_usage.get("prompt_tokens_details") or {}
    thinking = (chat_usage.get("completion_tokens_details") or {}).get("reasoning_tokens", 0)
    return {
        "input_tokens": chat_usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": details.get("cached_tokens", 0)},
        "output_tokens": chat_usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": thinking},
        "total_tokens": chat_usage["total_tokens"],
    }


def message_item(text: str, logprobs: list[Any], status: str) -> dict[str, Any]:
    return {
        "id": _item_id("msg_"),
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [_text_part(text, logprobs)],
    }


def _text_part(text: str, logprobs: list[Any]) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}


def reasoning_item(text: str, status: str) -> dict[str, Any]:
    """A reasoning model's thinking (frontend.reasoning_parser), as open models' reasoning
    items carry it: the text in `content`, no summary, nothing encrypted."""
    return {
        "id": _item_id("rs_"),
        "type": "reasoning",
        "status": status,
        "summary": [],
        "content": [_reasoning_part(text)],
        "encrypted_content": None,
    }


def _reasoning_part(text: str) -> dict[str, Any]:
    return {"type": "reasoning_text", "text": text}


def call_item(call_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
    return {
        "id": _item_id("fc_"),
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


class ResponsesAnswer:
    """The `AnswerShape` of /v1/responses for one request: what the response object
    echoes of it, and `keep` (the store; None: not stored). `stream`: its streamed
    answer's events once they began (a background run reads the output so far there)."""

    id_prefix = "resp_"

    def __init__(self, body: ResponsesRequest, model: str, keep: Keep | None) -> None:
        self._body = body
        self._model = model
        self._keep = keep
        self.stream: ResponseEvents | None = None

    def skeleton(self, response_id: str, created: int) -> dict[str, Any]:
        """The response object before any output: what it echoes of the request."""
        body = self._body
        text_format = body.text_format()
        if body.tool_choice is None:
            tool_choice: Any = "auto"
        elif isinstance(body.tool_choice, str):
            tool_choice = body.tool_choice
        else:
            tool_choice = body.tool_choice.model_dump()
        return {
            "id": response_id,
            "object": "response",
            "created_at": created,
            "status": "in_progress",
            "background": body.background is True,
            "error": None,
            "incomplete_details": None,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "max_tool_calls": body.max_tool_calls,
            "model": self._model,
            "output": [],
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id,
            "reasoning": {"effort": None, "summary": None},
            "store": body.store,
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "text": {
                "format": text_format.echo() if text_format is not None else {"type": "text"},
                "verbosity": "medium",
            },
            "tool_choice": tool_choice,
            "tools": [tool.model_dump() for tool in body.tools or []],
            "top_logprobs": body.top_logprobs or 0,
            "top_p": 1.0 if body.top_p is None else body.top_p,
            "truncation": body.truncation or "disabled",
            "usage": None,
            "user": body.user,
            "metadata": body.metadata or {},
        }

    async def finished(
        self, response: dict[str, Any], output: list[dict[str, Any]], usage: dict[str, Any],
        incomplete: bool,
    ) -> dict[str, Any]:  # fmt: skip
        """`response` completed (or incomplete: max_output_tokens) with `output` and
        `usage`, kept when asked (its `store` false when it could not be)."""
        response["status"] = "incomplete" if incomplete else "completed"
        if incomplete:
            response["incomplete_details"] = {"reason": "max_output_tokens"}
        response["output"] = output
        response["usage"] = usage
        if self._body.store:
            response["store"] = self._keep is not None and await self._keep(response)
        return response

    # ---- AnswerShape ---------------------------------------------------------------------

    async def body(self, chat: dict[str, Any]) -> dict[str, Any]:
        choice = chat["choices"][0]
        message = choice["message"]
        incomplete = choice["finish_reason"] == "length"
        status = "incomplete" if incomplete else "completed"
        content = message.get("content")
        calls = message.get("tool_calls") or []
        output: list[dict[str, Any]] = []
        thinking = message.get("reasoning_content")
        if thinking is not None:  # cut by the length limit: only when no answer followed
            output.append(reasoning_item(thinking, status if content is None else "completed"))
        if content or not (calls or thinking is not None):
            logprobs = (choice.get("logprobs") or {}).get("content") or []
            output.append(message_item(content or "", logprobs, status))
        for call in calls:
            function = call["function"]
            output.append(call_item(call["id"], function["name"], function["arguments"]))
        response = self.skeleton(chat["id"], chat["created"])
        if chat.get("simulated"):
            response["simulated"] = True
        return await self.finished(response, output, usage_of(chat["usage"]), incomplete)

    def events(
        self, state: FrontendState, prepared: Prepared, choices: ChoiceStreams, deadline: float
    ) -> AsyncIterator[bytes]:
        self.stream = ResponseEvents(self, state, prepared, choices)
        return self.stream.run(deadline)


class ResponseEvents:
    """One streamed response's events: a choice's text and calls as output items."""

    def __init__(
        self,
        answer: ResponsesAnswer,
        state: FrontendState,
        prepared: Prepared,
        choices: ChoiceStreams,
    ) -> None:
        self._answer = answer
        self._state = state
        self._prepared = prepared
        self._choices = choices
        self._sequence = 0
        self.response = answer.skeleton(prepared.response_id, prepared.created)
        if choices.card(0).simulated:
            self.response["simulated"] = True
        self.output: list[dict[str, Any]] = []
        self._message: dict[str, Any] | None = None  # the open message item
        self._text: list[str] = []  # the open message's text and logprobs so far
        self._message_logprobs: list[Any] = []
        self._logprobs: list[Any] = []  # of tokens whose text is held back (a marker's start)
        # a reasoning model's thinking (frontend.reasoning): split off first, as an item
        self._split = prepared.reasoning.stream() if prepared.reasoning is not None else None
        self._thinking: dict[str, Any] | None = None  # the open reasoning item
        self._thought: list[str] = []
        tools = prepared.tools
        self._calls = (
            ToolCallStream(tools.fmt, tools.max_calls)
            if tools is not None and tools.fmt is not None
            else None
        )

    @property
    def sequence(self) -> int:
        """The next event's sequence number (how many were written)."""
        return self._sequence

    def _event(self, kind: str, fields: dict[str, Any]) -> bytes:
        self._sequence += 1
        return sse_event(kind, fields, self._sequence - 1)

    async def run(self, deadline: float) -> AsyncIterator[bytes]:
        state, prepared, choices = self._state, self._prepared, self._choices
        generation = Generation(state, prepared, FirstToken(state.metrics, prepared.arrival))
        chat_logprobs = prepared.logprobs is not None
        try:
            yield self._event("response.created", {"response": self.response})
            yield self._event("response.in_progress", {"response": self.response})
            while generation.finish_reason is None:
                _, output = await choices.next(deadline)
                text, entries = generation.consume(output)
                final = generation.finish_reason is not None
                if self._split is not None:
                    thought, text = self._split.feed(text, final)
                    if thought:
                        for event in self._reasoning_delta(thought):
                            yield event
                    if text or final:  # the answer begins: the thinking is over
                        cut = not text and generation.finish_reason == "length"
                        for event in self._close_reasoning("incomplete" if cut else "completed"):
                            yield event
                logprobs = generation.chat_logprobs(entries) if chat_logprobs and entries else []
                for piece in self._pieces(text, final):
                    if isinstance(piece, str):
                        for event in self._text_delta(piece, logprobs):
                            yield event
                        logprobs = []
                    else:
                        for event in self._call(piece):
                            yield event
                if logprobs:
                    self._logprobs += logprobs
                if final and output.finish_reason is None:  # a stop string
                    choices.finish(0)
            incomplete = generation.finish_reason == "length"
            if self._message is None and not self.output:  # no text, no call: an empty answer
                for event in self._text_delta("", []):
                    yield event
            for event in self._close_message("incomplete" if incomplete else "completed"):
                yield event
            record(state.metrics, prepared, [generation])
            usage = usage_of(generation.usage())
            response = await self._answer.finished(self.response, self.output, usage, incomplete)
            kind = "response.incomplete" if incomplete else "response.completed"
            yield self._event(kind, {"response": response})
        except OpenAIError as exc:
            yield self._failed(exc)
        except TimeoutError:
            yield self._failed(errors.timed_out(state.config.frontend.request_timeout_s))
        finally:
            choices.close()

    def _pieces(self, text: str, final: bool) -> list[str | ToolCall]:
        if self._calls is None:
            return [text] if text else []
        found = self._calls.feed(text) if text else []
        if final:
            found += self._calls.finish()
        return [piece for piece in found if not isinstance(piece, str) or piece]

    def _reasoning_delta(self, text: str) -> list[bytes]:
        events = []
        if self._thinking is None:
            self._thinking = reasoning_item("", "in_progress")
            events += self._open_part(self._thinking, _reasoning_part(""))
        self._thought.append(text)
        events.append(self._event("response.reasoning_text.delta", {
            "item_id": self._thinking["id"], "output_index": self.output.index(self._thinking),
            "content_index": 0, "delta": text,
        }))  # fmt: skip
        return events

    def _close_reasoning(self, status: str) -> list[bytes]:
        """The reasoning item's done events (incomplete: the length limit cut the thinking)."""
        item = self._thinking
        if item is None:
            return []
        self._thinking = None
        text = "".join(self._thought)
        self._thought = []
        done = {"text": text}
        return self._close_part(item, _reasoning_part(text), status, "reasoning_text", done)

    def _open_part(self, item: dict[str, Any], part: dict[str, Any]) -> list[bytes]:
        """An output item of one content part begins: it is added, then its empty part."""
        item["content"] = []
        index = len(self.output)
        self.output.append(item)
        return [
            self._event("response.output_item.added", {"output_index": index, "item": item}),
            self._event("response.content_part.added", {
                "item_id": item["id"], "output_index": index, "content_index": 0, "part": part,
            }),
        ]  # fmt: skip

    def _close_part(
        self, item: dict[str, Any], part: dict[str, Any], status: str, kind: str,
        done: dict[str, Any],
    ) -> list[bytes]:  # fmt: skip
        """An output item ends with its whole part: `response.<kind>.done` (with `done`'s
        fields), the part's done, the item's done."""
        index = self.output.index(item)
        item["content"] = [part]
        item["status"] = status
        base = {"item_id": item["id"], "output_index": index, "content_index": 0}
        return [
            self._event(f"response.{kind}.done", {**base, **done}),
            self._event("response.content_part.done", {**base, "part": part}),
            self._event("response.output_item.done", {"output_index": index, "item": item}),
        ]

    def _text_delta(self, text: str, logprobs: list[Any]) -> list[bytes]:
        events = []
        if self._message is None:
            self._message = message_item("", [], "in_progress")
            events += self._open_part(self._message, _text_part("", []))
        logprobs = self._logprobs + logprobs
        self._logprobs = []
        if text or logprobs:
            self._text.append(text)
            events.append(self._event("response.output_text.delta", {
                "item_id": self._message["id"], "output_index": len(self.output) - 1,
                "content_index": 0, "delta": text, "logprobs": logprobs,
            }))  # fmt: skip
            self._message_logprobs += logprobs
        return events

    def _close_message(self, status: str) -> list[bytes]:
        item = self._message
        if item is None:
            return []
        self._message = None
        text = "".join(self._text)
        self._text = []
        part = _text_part(text, self._message_logprobs)
        self._message_logprobs = []
        done = {"text": text, "logprobs": part["logprobs"]}
        return self._close_part(item, part, status, "output_text", done)

    def _call(self, call: ToolCall) -> list[bytes]:
        events = self._close_message("completed")
        item = call_item(call.id, call.name, "", "in_progress")
        index = len(self.output)
        self.output.append(item)
        base = {"item_id": item["id"], "output_index": index}
        added = {"output_index": index, "item": dict(item)}
        events.append(self._event("response.output_item.added", added))
        events.append(self._event("response.function_call_arguments.delta",
                                  {**base, "delta": call.arguments}))  # fmt: skip
        done = {**base, "name": call.name, "arguments": call.arguments}
        events.append(self._event("response.function_call_arguments.done", done))
        item["arguments"] = call.arguments
        item["status"] = "completed"
        done_item = {"output_index": index, "item": item}
        events.append(self._event("response.output_item.done", done_item))
        return events

    def _failed(self, exc: OpenAIError) -> bytes:
        """The stream's end after a failure: response.failed with the error (OpenAI's)."""
        logger.warning("response %s failed: %s", self.response["id"], exc.message)
        error = {"code": exc.code or "server_error", "message": exc.message}
        return self._event("response.failed", {"response": self.ended("failed", error)})

    def ended(self, status: str, error: dict[str, Any] | None = None) -> dict[str, Any]:
        """The response cut short (failed; cancelled: a background one), with the output
        so far, its open message incomplete."""
        self._close_reasoning("incomplete")
        self._close_message("incomplete")
        self.response["status"] = status
        self.response["error"] = error
        self.response["output"] = self.output
        return self.response
