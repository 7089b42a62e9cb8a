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
from pathlib import Path
from typing import Any

SHIPPED_TEMPLATES = Path(__file__).parent / "templates"

# messages, add_generation_prompt -> the prompt text, or None: render with jinja
Renderer = Callable[[list[dict[str, Any]], bool], str | None]

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_SMOLLM2_SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n"
)


def _render_smollm2(messages: list[dict[str, Any]], add_generation_prompt: bool) -> str | None:
    """SMOLLM2_TEMPLATE: ChatML, with SmolLM's system prompt when the first message is not
    a system message."""
    parts: list[str] = []
    for message in messages:
        if type(message) is not dict:
            return None
        role, content = message.get("role"), message.get("content")
        if type(role) is not str or type(content) is not str:
            return None
        parts.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
    if messages and messages[0]["role"] != "system":
        parts.insert(0, _SMOLLM2_SYSTEM)
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


# The source as tokenizer_config.json or chat_template.jinja holds it; the form with a
# final newline renders the same (jinja's trim_blocks drops a newline after a block tag).
_KNOWN: dict[str, Renderer] = {
    SMOLLM2_TEMPLATE: _render_smollm2,
    SMOLLM2_TEMPLATE + "\n": _render_smollm2,
}


def known_renderer(source: str) -> Renderer | None:
    """The plain-Python renderer of the chat template `source`, if it is a known one."""
    return _KNOWN.get(source)


def chat_template_file(value: str) -> Path:
    """The file `model.chat_template` names: a path, or the name of a template shipped in
    frontend/templates (`chatml_tools`); ValueError naming the field if there is none."""
    shipped = SHIPPED_TEMPLATES / f"{value}.jinja"
    if "/" not in value and shipped.is_file():
        return shipped
    path = Path(value).expanduser()
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in SHIPPED_TEMPLATES.glob("*.jinja")))
        raise ValueError(
            f"model.chat_template: {value} is neither a file nor a shipped template ({names})"
        )
    return path
