"""A constrained answer after a reasoning model's thinking (`GuidedDecoding.thinking`): the
grammar `contract.guided` builds leaves the block free (to its end tag, text or one special
token), optional where the output may open it itself, and holds the answer to its constraint
after it. Checked with llguidance's own matcher on SmolLM2's tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from contract.guided import grammar_for
from contract.messages import GuidedDecoding, ThinkingFirst

ANSWER = json.dumps({
    "type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
    "additionalProperties": False,
})  # fmt: skip
IM_START = 1  # a special token of SmolLM2's tokenizer (not an end of sequence)


@pytest.fixture(scope="module")
def tokenizers(model_dir: Path) -> tuple[Any, Any]:
    from llguidance import LLTokenizer
    from tokenizers import Tokenizer

    text = (model_dir / "tokenizer.json").read_text()
    return LLTokenizer(text), Tokenizer.from_str(text)


def outcome(tokenizers: tuple[Any, Any], guided: GuidedDecoding, *parts: str | int) -> str:
    """"complete", "partial" (a prefix of an accepted output) or "refused": the matcher's
    verdict on the output made of text parts and token ids."""
    from llguidance import LLMatcher

    ll_tokenizer, hf = tokenizers
    ids: list[int] = []
    for part in parts:
        ids += [part] if isinstance(part, int) else hf.encode(part, add_special_tokens=False).ids
    matcher = LLMatcher(ll_tokenizer, grammar_for(guided), log_level=0)
    if not matcher.consume_tokens(ids):
        return "refused"
    return "complete" if matcher.is_accepting() else "partial"


def test_the_prompt_opened_the_block(tokenizers) -> None:
    guided = GuidedDecoding(kind="json_schema", spec=ANSWER,
                            thinking=ThinkingFirst(close="</think>"))  # fmt: skip
    check = lambda *parts: outcome(tokenizers, guided, *parts)  # noqa: E731
    assert check('6 plus 1.\n</think>\n\n{"answer": 7}') == "complete"
    assert check('a <b> </thi </think>{"answer": 7}') == "complete"  # tag-like text thinks on
    assert check('{"answer": 7}') == "partial"  # still thinking: JSON is just text here
    assert check("done</think>seven") == "refused"  # after the block: the constraint
    assert check('done</think>{"answer": 7}', " more") == "refused"  # and nothing after it
    assert check('done</think>{"answer":7}') == "refused"  # the constraint's own layout


def test_the_output_may_open_the_block(tokenizers) -> None:
    guided = GuidedDecoding(kind="regex", spec="(yes|no)",
                            thinking=ThinkingFirst(close="</think>", open="<think>"))  # fmt: skip
    check = lambda *parts: outcome(tokenizers, guided, *parts)  # noqa: E731
    assert check("<think>\nhm</think>\n\nyes") == "complete"
    assert check("\n<think>hm</think> no") == "complete"
    assert check("yes") == "complete"  # no block: thinking switched off
    assert check("hm yes") == "refused"  # text outside a block is the answer's


def test_a_special_token_closes_the_block(tokenizers) -> None:
    guided = GuidedDecoding(kind="regex", spec="(yes|no)", thinking=ThinkingFirst(
        close="<|im_start|>", close_token=IM_START))  # fmt: skip
    check = lambda *parts: outcome(tokenizers, guided, *parts)  # noqa: E731
    assert check("hm, <im_start> is thinking", IM_START, "yes") == "complete"
    assert check("hm", IM_START, "maybe") == "refused"
    assert check("yes") == "partial"


def test_a_special_token_opens_the_block(tokenizers) -> None:
    guided = GuidedDecoding(kind="regex", spec="(yes|no)", thinking=ThinkingFirst(
        close="</think>", open="<|im_start|>", open_token=IM_START))  # fmt: skip
    check = lambda *parts: outcome(tokenizers, guided, *parts)  # noqa: E731
    assert check(IM_START, "hm</think>yes") == "complete"
    assert check("no") == "complete"
    assert check("hm</think>yes") == "refused"  # a block is opened by the token only
