"""Tool calls in generated text: the formats of `frontend.tool_call_parser` and the one
state machine that finds them, streamed or not.

A model asked to call a tool writes the call as text in its own format (vLLM's parsers of
the same names are the reference for each):

- hermes: `<tool_call>{"name": "f", "arguments": {...}}</tool_call>`, any number, anywhere
  (Qwen2.5, Hermes, SmolLM3); an unclosed last call is read up to the end of the output.
- llama3_json: the output is `{"name": "f", "parameters": {...}}` (or "arguments"), several
  joined by `;`, possibly after `<|python_tag|>` (Llama 3.1/3.2 JSON tool calling).
- mistral: `[TOOL_CALLS]` then a JSON list of `{"name", "arguments"}` up to the end, or
  (tokenizer v11+) `[TOOL_CALLS]f[ARGS]{...}` repeated.
- pythonic: the output is a Python list of calls with literal keyword arguments,
  `[f(a=1), g(b="x")]`, possibly inside `<|python_start|>...<|python_end|>` (Llama 3.2/4).

`ToolCallStream` takes the text as it is generated and hands out content pieces and
finished calls. Content streams on at once except what could still be a call's start (a
marker's first characters) or whitespace that may turn out to precede a call; a call
goes out once its end is seen (hermes) or at the end of the output (the others): a call that
does not parse then stays content, word for word, so nothing is ever taken back. The
whitespace around a call goes with it (one run of it stays between text before and text
after a call). A
non-streamed answer runs the same machine over the whole text (`parse_tool_calls`), so both
give the same calls and content for any split of the text.

Differences from vLLM, on purpose: a malformed call stays content on its own (vLLM turns the
whole output into content), and text between or after hermes calls stays content (vLLM's
non-streamed answer keeps only the text before the first call). Like vLLM, a call naming a
function that is not in the request's `tools` is returned as a call: the client decides.
"""

from __future__ import annotations

import ast
import json
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# (name, arguments) of each call a body holds; None: it is not a well-formed call
CallParser = Callable[[str, str], list[tuple[str, dict[str, Any]]] | None]


def new_call_id() -> str:
    """OpenAI's shape: "call_" and 24 random hex digits."""
    return "call_" + secrets.token_hex(12)


@dataclass(slots=True)
class ToolCall:
    """One parsed call; `arguments` is the JSON text of the arguments object."""

    name: str
    arguments: str
    index: int = 0  # its place among its answer's calls
    id: str = field(default_factory=new_call_id)

    def message_entry(self) -> dict[str, Any]:
        """The entry of a response message's `tool_calls`."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }

    def stream_deltas(self, index: int) -> list[dict[str, Any]]:
        """The `delta.tool_calls` entries that stream this call as vLLM does: id, type and
        name first (arguments empty), then the arguments; the openai client joins them."""
        return [
            {"index": index, "id": self.id, "type": "function",
             "function": {"name": self.name, "arguments": ""}},
            {"index": index, "function": {"arguments": self.arguments}},
        ]  # fmt: skip


@dataclass(frozen=True, slots=True)
class ToolCallFormat:
    """How one model family writes calls. `markers` open a call; `end` closes one (None:
    the call runs to the end of the output); with `at_start_only` a call is only read when
    the output (after whitespace) begins with a marker, otherwise the output is all content.
    `tokens`: every marker text the parser reads; where a model's tokenizer has one as a
    special token, the detokenizer must keep it in the text (`TextTokenizer.keep_in_text`)."""

    name: str
    markers: tuple[str, ...]
    end: str | None
    at_start_only: bool
    parse: CallParser
    tokens: tuple[str, ...] = ()


def _arguments_object(value: Any) -> dict[str, Any] | None:
    """A call's arguments as an object: an object, or a JSON text of one (some models write
    the arguments as a string); None: neither."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    return value if isinstance(value, dict) else None


def _named_call(obj: Any, *argument_keys: str) -> tuple[str, dict[str, Any]] | None:
    """(name, arguments) of a JSON call object; arguments under the first key present."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    key = next((k for k in argument_keys if k in obj), None)
    arguments = _arguments_object(obj[key]) if key is not None else None
    return None if arguments is None else (obj["name"], arguments)


def _all_or_none(
    calls: list[tuple[str, dict[str, Any]] | None],
) -> list[tuple[str, dict[str, Any]]] | None:
    if not calls or any(call is None for call in calls):
        return None
    return calls  # type: ignore[return-value]


def _parse_hermes(marker: str, body: str) -> list[tuple[str, dict[str, Any]]] | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    return _all_or_none([_named_call(obj, "arguments", "parameters")])


_DECODER = json.JSONDecoder()


def _json_values(text: str, separator: str) -> list[Any] | None:
    """The JSON values of `text`, one after another with `separator` (and whitespace)
    between them; None: anything else in it."""
    values: list[Any] = []
    position = 0
    text = text.strip()
    while True:
        try:
            value, position = _DECODER.raw_decode(text, position)
        except ValueError:
            return None
        values.append(value)
        rest = text[position:].lstrip()
        if not rest:
            return values
        if not separator or not rest.startswith(separator):
            return None
        position = len(text) - len(rest) + len(separator)
        while position < len(text) and text[position].isspace():
            position += 1


def _parse_llama3_json(marker: str, body: str) -> list[tuple[str, dict[str, Any]]] | None:
    text = body if marker == "<|python_tag|>" else marker + body
    values = _json_values(text, ";")
    if values is None:
        return None
    return _all_or_none([_named_call(value, "parameters", "arguments") for value in values])


_MISTRAL_V11 = re.compile(r"([A-Za-z_][\w.-]*)(?:\[ARGS\])?(\{.*\})", re.DOTALL)


def _parse_mistral(marker: str, body: str) -> list[tuple[str, dict[str, Any]]] | None:
    calls: list[tuple[str, dict[str, Any]] | None] = []
    for piece in body.split(marker):
        piece = piece.strip()
        if not piece:
            continue
        if piece[0] in "[{":  # a JSON list of calls, or one call
            values = _json_values(piece, "")
            if values is None or len(values) != 1:
                return None
            value = values[0]
            for obj in value if isinstance(value, list) else [value]:
                calls.append(_named_call(obj, "arguments"))
            continue
        match = _MISTRAL_V11.fullmatch(piece)
        if match is None:
            return None
        try:
            arguments = json.loads(match.group(2))
        except ValueError:
            return None
        calls.append((match.group(1), arguments) if isinstance(arguments, dict) else None)
    return _all_or_none(calls)


def _parse_pythonic(marker: str, body: str) -> list[tuple[str, dict[str, Any]]] | None:
    if marker == "<|python_start|>":
        text = body.strip().removesuffix("<|python_end|>")
    else:
        text = marker + body
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError):
        return None
    if not isinstance(tree, ast.List):
        return None
    calls: list[tuple[str, dict[str, Any]] | None] = []
    for item in tree.elts:
        if not (isinstance(item, ast.Call) and isinstance(item.func, ast.Name)) or item.args:
            return None
        arguments: dict[str, Any] = {}
        for keyword in item.keywords:
            if keyword.arg is None:  # **kwargs
                return None
            try:
                arguments[keyword.arg] = ast.literal_eval(keyword.value)
            except (ValueError, SyntaxError, TypeError):
                return None
        try:
            json.dumps(arguments)
        except (TypeError, ValueError):  # a set, bytes, a complex number: not JSON
            return None
        calls.append((item.func.id, arguments))
    return _all_or_none(calls)


FORMATS: dict[str, ToolCallFormat] = {
    "hermes": ToolCallFormat(
        "hermes", ("<tool_call>",), "</tool_call>", False, _parse_hermes,
        ("<tool_call>", "</tool_call>"),
    ),
    "llama3_json": ToolCallFormat(
        "llama3_json", ("<|python_tag|>", "{"), None, True, _parse_llama3_json,
        ("<|python_tag|>",),
    ),
    "mistral": ToolCallFormat(
        "mistral", ("[TOOL_CALLS]",), None, False, _parse_mistral, ("[TOOL_CALLS]", "[ARGS]")
    ),
    "pythonic": ToolCallFormat(
        "pythonic", ("<|python_start|>", "["), None, True, _parse_pythonic,
        ("<|python_start|>", "<|python_end|>"),
    ),
}  # fmt: skip

# a piece of a choice's answer: content text, or a finished call
Piece = str | ToolCall


class ToolCallStream:
    """One choice's generated text → content pieces and calls, as the text arrives.
    `max_calls` (1: parallel_tool_calls false) drops the calls after that many."""

    __slots__ = (
        "_body", "_firsts", "_fmt", "_held", "_lead", "_marker", "_max_calls", "_plain",
        "_said", "_separator", "_strip_next", "calls",
    )  # fmt: skip

    def __init__(self, fmt: ToolCallFormat, max_calls: int | None = None) -> None:
        self._fmt = fmt
        self._max_calls = max_calls
        self._held = ""  # outside text kept back: a possible marker start, whitespace
        self._body: str | None = None  # inside a call: its text after the marker
        self._marker = ""  # the marker that opened the call
        self._lead = ""  # the whitespace before that marker (content again if no call)
        self._strip_next = False  # after a call: drop the whitespace that follows it
        self._separator = ""  # the whitespace before the last call: put back if text follows
        self._said = False  # whether any content went out
        self._plain = False  # (at_start_only) the output is no call: all content from now
        self.calls = 0  # calls handed out
        # (calls anywhere) the markers' first characters: text without them, outside a
        # call, with nothing held, is content at once (the common chunk: ~0.5 µs, not ~1.4)
        self._firsts = "" if fmt.at_start_only else "".join({m[0] for m in fmt.markers})

    def feed(self, text: str) -> list[Piece]:
        """The content and calls that `text` (the next generated text) completes."""
        if self._plain:
            return [text] if text else []
        if (
            self._firsts
            and text
            and not (self._held or self._strip_next or text[-1].isspace())
            and self._body is None
            and not any(first in text for first in self._firsts)
        ):
            self._said = True
            return [text]
        out: list[Piece] = []
        if self._body is not None:
            self._body += text
        else:
            self._held += text
        self._advance(out)
        return out

    def finish(self) -> list[Piece]:
        """What is left at the end of the output: an open call (parsed, or content), and
        the text held back."""
        out: list[Piece] = []
        if self._body is not None:
            body, self._body = self._body, None
            self._close(body, None, out)
        held, self._held = self._held, ""
        if self._strip_next:
            held = held.lstrip()
        if held and not self._plain:
            out.append(held)
        return out

    def _advance(self, out: list[Piece]) -> None:
        fmt = self._fmt
        while True:
            if self._body is not None:
                if fmt.end is None:
                    return  # the call runs to the end of the output
                end = self._body.find(fmt.end)
                if end < 0:
                    return
                body, rest = self._body[:end], self._body[end + len(fmt.end) :]
                self._body = None
                self._close(body, fmt.end, out)
                self._held = rest
            held = self._held
            if self._strip_next:
                held = held.lstrip()
                if not held:
                    self._held = ""
                    return
                held = self._separator + held
                self._strip_next, self._separator = False, ""
            if fmt.at_start_only:
                self._held = ""
                self._start_of_output(held, out)
                return
            found = _earliest_marker(held, fmt.markers)
            if found is None:
                said = len(out)
                self._held = _emit_safe(held, fmt.markers, out)
                self._said = self._said or len(out) > said
                return
            at, marker = found
            content = held[:at].rstrip()
            if content:
                out.append(content)
                self._said = True
            self._open(marker, held[len(content) : at], held[at + len(marker) :])

    def _start_of_output(self, held: str, out: list[Piece]) -> None:
        """(at_start_only) Whether the output opens with a call: wait while it may."""
        start = held.lstrip()
        marker = next((m for m in self._fmt.markers if start.startswith(m)), None)
        if marker is not None:
            self._open(marker, held[: len(held) - len(start)], start[len(marker) :])
        elif not start or any(m.startswith(start) for m in self._fmt.markers):
            self._held = held
        else:
            self._plain = self._said = True
            out.append(held)

    def _open(self, marker: str, lead: str, body: str) -> None:
        self._marker, self._lead, self._body, self._held = marker, lead, body, ""

    def _close(self, body: str, end: str | None, out: list[Piece]) -> None:
        """A call's whole text: its calls out, or (not a call) its text as content."""
        parsed = self._fmt.parse(self._marker, body)
        if parsed is None:
            out.append(self._lead + self._marker + body + (end or ""))
            self._said = True
            return
        for name, arguments in parsed:
            if self._max_calls is None or self.calls < self._max_calls:
                arguments_json = json.dumps(arguments, ensure_ascii=False)
                out.append(ToolCall(name, arguments_json, self.calls))
                self.calls += 1
        self._strip_next = True
        self._separator = self._lead if self._said else ""


def _earliest_marker(text: str, markers: tuple[str, ...]) -> tuple[int, str] | None:
    found: tuple[int, str] | None = None
    for marker in markers:
        at = text.find(marker)
        if at >= 0 and (found is None or at < found[0]):
            found = (at, marker)
    return found


def _emit_safe(held: str, markers: tuple[str, ...], out: list[Piece]) -> str:
    """Emit the part of `held` that can be neither a marker's start nor whitespace before
    a call; returns the rest, still held."""
    keep = 0
    for marker in markers:
        for length in range(min(len(marker) - 1, len(held)), keep, -1):
            if marker.startswith(held[-length:]):
                keep = length
                break
    cut = len(held) - keep
    while cut and held[cut - 1].isspace():
        cut -= 1
    if cut:
        out.append(held[:cut])
    return held[cut:]


def parse_tool_calls(
    fmt: ToolCallFormat, text: str, max_calls: int | None = None
) -> tuple[str | None, list[ToolCall]]:
    """A whole answer's (content, calls): content is the text outside the calls (None when
    there were calls and nothing else), exactly what streaming `text` would give."""
    stream = ToolCallStream(fmt, max_calls)
    pieces = stream.feed(text) + stream.finish()
    content = "".join(piece for piece in pieces if isinstance(piece, str))
    calls = [piece for piece in pieces if isinstance(piece, ToolCall)]
    return (content or None) if calls else content, calls
