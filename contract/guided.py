"""Constrained output's grammars: a `GuidedDecoding` as an llguidance grammar, built once.

The frontend builds a request's grammar when it validates the request (a bad schema is a 400
naming the field, before any routing), the torch engine builds its matchers from the same
grammar text; both go through `grammar_for`, whose cache is keyed by the constraint's text,
so a schema that many requests repeat is compiled once per process. llguidance is imported
on the first constrained request only: a process serving none never loads it.
"""

from __future__ import annotations

import functools
import json
import re

from contract.messages import GuidedDecoding, GuidedKind

# JSON as the model writes it: one space after ',' and ':', no other whitespace (with
# llguidance's flexible whitespace a sampled output can run on in blank lines to max_tokens).
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_JSON_OBJECT = '{"type": "object"}'
GRAMMAR_CACHE_SIZE = 256
_LISTING = re.compile(r"\s*\d+ \|")


class GuidedSpecError(ValueError):
    """A constraint llguidance cannot build: its message is llguidance's."""


def grammar_for(guided: GuidedDecoding) -> str:
    """`guided`'s llguidance grammar (JSON text for `llguidance.LLMatcher`); GuidedSpecError
    when the schema or pattern is invalid."""
    grammar, error = _compiled(guided.kind, guided.spec)
    if error is not None:
        raise GuidedSpecError(error)
    thinking = guided.thinking
    if thinking is not None:
        fence = (thinking.close, thinking.open, thinking.close_token, thinking.open_token)
        return _after_thinking(grammar, fence)
    return grammar


def spec_error(kind: GuidedKind, spec: str) -> str | None:
    """llguidance's message when `spec` is not a valid constraint of `kind`, else None."""
    return _compiled(kind, spec)[1]


def choice_regex(choices: list[str]) -> str:
    """A pattern matching exactly one of `choices` (vLLM's `guided_choice`)."""
    return "|".join(f"(?:{_literal(choice)})" for choice in choices)


def _literal(text: str) -> str:
    """`text` as a pattern matching only itself (Rust regex: every non-alphanumeric ASCII
    character escaped would be accepted, but `re.escape`'s escaped space and newline are not)."""
    return "".join(
        f"\\x{{{ord(c):x}}}" if not (c.isalnum() or c == "_") else c for c in text
    )


@functools.lru_cache(maxsize=GRAMMAR_CACHE_SIZE)
def _compiled(kind: GuidedKind, spec: str) -> tuple[str, str | None]:
    """(grammar, None), or ("", the error): cached either way (a client retrying a bad
    schema costs nothing either)."""
    try:
        return _grammar(kind, spec), None
    except GuidedSpecError as exc:
        return "", str(exc)


def _grammar(kind: GuidedKind, spec: str) -> str:
    from llguidance import LLMatcher

    if kind == "regex":
        grammar = LLMatcher.grammar_from_regex(spec)
    else:
        schema = ANY_JSON_OBJECT if kind == "json_object" else spec
        try:
            parsed = json.loads(schema)
        except ValueError as exc:
            raise GuidedSpecError(f"not JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise GuidedSpecError("a JSON Schema is a JSON object")
        grammar = LLMatcher.grammar_from_json_schema(parsed, defaults=JSON_LAYOUT)  # type: ignore[arg-type]
    error = LLMatcher.validate_grammar(grammar)
    if error:
        raise GuidedSpecError(_first_lines(error))
    return grammar


# the thinking block's fence: close, open, close's token id, open's token id
Fence = tuple[str, str | None, int | None, int | None]
_WHITESPACE = r"/[ \t\r\n]*/"


@functools.lru_cache(maxsize=GRAMMAR_CACHE_SIZE)
def _after_thinking(grammar: str, fence: Fence) -> str:
    """`grammar` (the answer's) after a reasoning model's thinking block: a lark grammar
    whose start is the block (free text up to and including its end tag; optional when the
    output may open it itself), whitespace, then the answer's grammar as a sub-grammar."""
    close, open_, close_token, open_token = fence
    if close_token is not None:  # a special token: no text matches it, it ends the text
        think = f"think: /(?s:.*)/ <[{close_token}]>"
    else:  # the shortest text that ends with the tag (a lazy lexeme)
        think = f"think[lazy]: /(?s:.*){_literal(close)}/"
    if open_ is None:
        start = f"start: think {_WHITESPACE} @answer"
    else:
        opener = f"<[{open_token}]>" if open_token is not None else json.dumps(open_)
        start = f"start: ({_WHITESPACE} {opener} think)? {_WHITESPACE} @answer"
    answer = json.loads(grammar)["grammars"][0]
    answer["name"] = "answer"
    top = {"name": "thinking", "lark_grammar": f"{start}\n{think}\n"}
    return json.dumps({"grammars": [top, answer]})


def _first_lines(message: str) -> str:
    """llguidance's message on one line, without the grammar listing some of its errors end
    in (lines `  1 | start: ...`)."""
    kept: list[str] = []
    for line in message.strip().splitlines():
        if _LISTING.match(line):
            break
        if line.strip():
            kept.append(line.strip())
    return " ".join(kept)

