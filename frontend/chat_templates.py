"""Known chat templates rendered in plain Python instead of through jinja.

Rendering the default model's (SmolLM2's) ChatML template in jinja's sandbox was the largest
Python step of a chat request's tokenization: ~10-17 µs in a hot loop, ~25-30 µs in situ at
c=1 (benchmarks/README.md), against ~1 µs for the same string built directly. A template is
replaced only when its source is one listed here character for character, and a renderer
only takes messages it can render exactly as jinja would (dicts whose role and content are
plain strings); for anything else it returns None and the caller renders with jinja (whose
errors are then the template's own). tests/frontend/test_chat_templates.py checks each
renderer against jinja on random conversations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# messages, add_generation_prompt -> the prompt text, or None: render with jinja
Renderer = Callable[[list[dict[str, Any]], bool], str | None]
# the same, as [text, the template's added token, text, ..., text]: the prompt is their join,
# and the tokenizer need not split it again at the template's own added tokens
Segmenter = Callable[[list[dict[str, Any]], bool], list[str] | None]

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_START, _END = "<|im_start|>", "<|im_end|>"
_SMOLLM2_SYSTEM = [
    _START,
    "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face",
    _END,
    "\n",
]


def _segment_smollm2(
    messages: list[dict[str, Any]], add_generation_prompt: bool
) -> list[str] | None:
    """SMOLLM2_TEMPLATE: ChatML, with SmolLM's system prompt when the first message is not
    a system message."""
    segments = [""]
    for message in messages:
        if type(message) is not dict:
            return None
        role, content = message.get("role"), message.get("content")
        if type(role) is not str or type(content) is not str:
            return None
        segments += (_START, f"{role}\n{content}", _END, "\n")
    if messages and messages[0]["role"] != "system":
        segments[1:1] = _SMOLLM2_SYSTEM
    if add_generation_prompt:
        segments += (_START, "assistant\n")
    return segments


def _render_smollm2(messages: list[dict[str, Any]], add_generation_prompt: bool) -> str | None:
    segments = _segment_smollm2(messages, add_generation_prompt)
    return None if segments is None else "".join(segments)


# The source as tokenizer_config.json or chat_template.jinja holds it; the form with a
# final newline renders the same (jinja's trim_blocks drops a newline after a block tag).
_KNOWN: dict[str, tuple[Renderer, Segmenter]] = {
    SMOLLM2_TEMPLATE: (_render_smollm2, _segment_smollm2),
    SMOLLM2_TEMPLATE + "\n": (_render_smollm2, _segment_smollm2),
}


def known_renderer(source: str) -> Renderer | None:
    """The plain-Python renderer of the chat template `source`, if it is a known one."""
    known = _KNOWN.get(source)
    return None if known is None else known[0]


def known_segmenter(source: str) -> Segmenter | None:
    """The chat template `source`'s renderer as segments (`Segmenter`), if it is known."""
    known = _KNOWN.get(source)
    return None if known is None else known[1]
