"""A reasoning model's thinking, split from its answer (`frontend.reasoning_parser`).

Reasoning models (DeepSeek-R1, QwQ, Qwen3, Magistral) write their thinking between two tags
(`<think>` ... `</think>`, Magistral's `[THINK]` ... `[/THINK]`) before the answer. Clients
expect the thinking apart, as the message's `reasoning_content` (DeepSeek's API, SGLang,
Dynamo) and `reasoning` (vLLM's current name): both are sent, with the same text.

Where the thinking starts: many templates open the block in the prompt itself
(DeepSeek-R1's, Qwen3-Thinking's end with `<think>\\n`; Qwen3's with thinking switched off
ends with an empty, closed block), so the output has no start tag. The prompt's own tail
says which: ending in the start tag, the output starts inside; ending in the end tag, it
does not. Otherwise a start tag at the very beginning of the output (after whitespace) opens
the block; `deepseek_r1` starts inside regardless (R1 may think without writing the tag, as
vLLM's parser assumes). A tag later in the answer is answer text. A block never closed
(the length limit) is all reasoning, as vLLM's parsers have it.

The split is lossless apart from the tags and the whitespace between the end tag and the
answer: streamed pieces in any split give the whole answer's split (tested)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from contract.messages import ThinkingFirst
from frontend.openai_schemas import ChatMessage
from frontend.tokenization import TextTokenizer


@dataclass(frozen=True)
class ReasoningFormat:
    """How one family of models marks its thinking."""

    start: str
    end: str
    always_starts_inside: bool  # the model thinks first even without writing `start`


FORMATS: dict[str, ReasoningFormat] = {
    "deepseek_r1": ReasoningFormat("<think>", "</think>", always_starts_inside=True),
    "qwen3": ReasoningFormat("<think>", "</think>", always_starts_inside=False),
    "mistral": ReasoningFormat("[THINK]", "[/THINK]", always_starts_inside=False),
}


def starts_inside(fmt: ReasoningFormat, prompt_tail: str) -> bool:
    """Whether the output starts inside the thinking block, from the prompt's last text
    (special tokens included)."""
    tail = prompt_tail.rstrip()
    if tail.endswith(fmt.start):
        return True
    if tail.endswith(fmt.end):  # an empty block in the prompt: thinking switched off
        return False
    return fmt.always_starts_inside


def _partial_suffix(text: str, tag: str) -> int:
    """How many characters at the end of `text` could be the start of `tag` (one `find`
    for most pieces: those without the tag's first character near their end)."""
    at = text.find(tag[0], max(0, len(text) - len(tag) + 1))
    while at >= 0:
        if tag.startswith(text[at:]):
            return len(text) - at
        at = text.find(tag[0], at + 1)
    return 0


_LEAD, _THINKING, _ANSWER_START, _ANSWER = range(4)  # where a split is in the output


class ReasoningSplit:
    """One choice's text split into (reasoning, answer) pieces as it comes; text that could
    be the start of a tag is held back until the next piece (or the end) settles it."""

    __slots__ = ("_fmt", "_held", "_inside", "_mode", "seen")

    def __init__(self, fmt: ReasoningFormat, inside: bool) -> None:
        self._fmt = fmt
        self._inside = inside  # thinking from the start, tag or not
        # _LEAD: only whitespace so far (a start tag may still come first); _ANSWER_START:
        # just past the end tag (its whitespace is dropped)
        self._mode = _LEAD
        self._held = ""
        self.seen = False  # whether any thinking (or a block, even empty) was found

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """The reasoning and answer text that `text` settles (all of it when `final`)."""
        fmt = self._fmt
        if not self._held:  # most pieces: nothing held, no tag in sight
            if self._mode == _ANSWER:
                return "", text
            if self._mode == _THINKING and fmt.end[0] not in text:
                return text, ""
        rest = self._held + text
        self._held = ""
        reasoning = answer = ""
        while rest:
            mode = self._mode
            if mode == _LEAD:
                stripped = rest.lstrip()
                if stripped.startswith(fmt.start):
                    rest = stripped[len(fmt.start) :]
                    self._mode, self.seen = _THINKING, True
                elif not final and fmt.start.startswith(stripped):
                    self._held = rest  # whitespace, or the start tag's beginning
                    break
                elif self._inside:  # no tag written: the whitespace before the thinking goes
                    rest = stripped
                    self._mode, self.seen = _THINKING, bool(stripped)
                else:
                    self._mode = _ANSWER
            elif mode == _THINKING:
                end = rest.find(fmt.end)
                if end >= 0:
                    reasoning += rest[:end]
                    rest = rest[end + len(fmt.end) :]
                    self._mode = _ANSWER_START
                    continue
                keep = 0 if final else _partial_suffix(rest, fmt.end)
                reasoning += rest[: len(rest) - keep]
                self._held = rest[len(rest) - keep :]
                break
            elif mode == _ANSWER_START:
                rest = rest.lstrip()
                if rest:
                    self._mode = _ANSWER
            else:
                answer += rest
                break
        return reasoning, answer


def split_reasoning(fmt: ReasoningFormat, inside: bool, text: str) -> tuple[str | None, str]:
    """A whole answer's (reasoning, answer); reasoning None when the output had no block."""
    split = ReasoningSplit(fmt, inside)
    reasoning, answer = split.feed(text, final=True)
    return (reasoning if split.seen else None), answer


@dataclass(frozen=True)
class ReasoningMode:
    """A chat request's reasoning split: the format, whether its output starts inside the
    block (from its prompt), and whether the answer carries the thinking (`include_reasoning`)."""

    fmt: ReasoningFormat
    inside: bool
    include: bool = True

    def stream(self) -> ReasoningSplit:
        return ReasoningSplit(self.fmt, self.inside)

    def message(self, message: dict[str, Any], text: str) -> dict[str, Any]:
        """`message` (built from the answer part, which `split` gave) with the thinking."""
        if not self.include:
            return message
        message["reasoning_content"] = message["reasoning"] = text
        if message.get("content") == "":
            message["content"] = None  # thinking only (vLLM's answer too)
        return message

    def split(self, text: str) -> tuple[str | None, str]:
        return split_reasoning(self.fmt, self.inside, text)

    def fence(self, tokenizer: TextTokenizer) -> ThinkingFirst:
        """The thinking block as a constrained answer's grammar lets it come first."""
        fmt = self.fmt
        opens = None if self.inside else fmt.start
        return ThinkingFirst(
            close=fmt.end,
            open=opens,
            close_token=tokenizer.special_token_id(fmt.end),
            open_token=tokenizer.special_token_id(opens) if opens is not None else None,
        )


def with_thinking(
    rendered: list[dict[str, Any]], messages: Sequence[ChatMessage]
) -> list[dict[str, Any]]:
    """`rendered` (the template's message dicts, one per message) with each earlier
    answer's thinking as `reasoning_content` (Qwen3's templates render it for the turns of
    an unfinished tool-calling exchange; others ignore it)."""
    for entry, message in zip(rendered, messages, strict=True):
        thinking = message.thinking()
        if thinking is not None:
            entry["reasoning_content"] = thinking
    return rendered
