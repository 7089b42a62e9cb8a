"""The reasoning split of `frontend.reasoning`: thinking and answer for each way a block
starts (written by the model, opened or closed by the prompt, R1's implicit start), the same
split for every division of the text into streamed pieces, and what stays answer text."""

from __future__ import annotations

import pytest

from frontend.reasoning import (
    FORMATS,
    ReasoningMode,
    ReasoningSplit,
    split_reasoning,
    starts_inside,
)

QWEN3 = FORMATS["qwen3"]
R1 = FORMATS["deepseek_r1"]
MISTRAL = FORMATS["mistral"]

# format, starts inside (from the prompt), output, expected thinking (None: no block), answer
CASES = [
    (QWEN3, False, "<think>\nLet me add 2 and 2.\n</think>\n\nIt is 4.", "\nLet me add 2 and 2.\n",
     "It is 4."),
    (QWEN3, False, "  \n<think>x</think>y", "x", "y"),  # whitespace before the tag
    (QWEN3, False, "It is 4.", None, "It is 4."),  # no block: all answer
    (QWEN3, False, "It is <think>4</think>.", None, "It is <think>4</think>."),  # not at the start
    (QWEN3, False, "\n\nIt is 4.", None, "\n\nIt is 4."),  # leading whitespace kept as answer
    (QWEN3, True, "Let me think.\n</think>\n\nIt is 4.", "Let me think.\n", "It is 4."),
    (QWEN3, True, "Still thinking when the limit came", "Still thinking when the limit came", ""),
    (QWEN3, False, "<think></think>It is 4.", "", "It is 4."),  # an empty block
    (QWEN3, False, "<think>a</think>b</think>c", "a", "b</think>c"),  # one block only
    (QWEN3, False, "<thin", None, "<thin"),  # a tag's beginning at the end: answer text
    (QWEN3, True, "almost </thi", "almost </thi", ""),  # the end tag's beginning: thinking
    (R1, True, "Hmm, 2 + 2.</think>4", "Hmm, 2 + 2.", "4"),  # R1 thinks without the tag
    (R1, True, "<think>Hmm.</think>4", "Hmm.", "4"),  # R1-0528 writes it
    (R1, True, "\n<think>\nHmm.</think>\n4\n", "\nHmm.", "4\n"),
    (MISTRAL, False, "[THINK]Plan.[/THINK]Answer.", "Plan.", "Answer."),
    (MISTRAL, False, "Answer. [THINK] is a word here", None, "Answer. [THINK] is a word here"),
]  # fmt: skip


@pytest.mark.parametrize(("fmt", "inside", "text", "thinking", "answer"), CASES)
def test_whole_answers_split(fmt, inside, text, thinking, answer) -> None:
    assert split_reasoning(fmt, inside, text) == (thinking, answer)


@pytest.mark.parametrize(("fmt", "inside", "text", "thinking", "answer"), CASES)
def test_every_streamed_division_gives_the_whole_split(fmt, inside, text, thinking, answer):
    """Two cuts anywhere (three pieces, empty ones too): the pieces add up to the whole."""
    for first in range(len(text) + 1):
        for second in range(first, len(text) + 1):
            split = ReasoningSplit(fmt, inside)
            pieces = [text[:first], text[first:second], text[second:]]
            got_thinking = got_answer = ""
            for number, piece in enumerate(pieces):
                part_thinking, part_answer = split.feed(piece, final=number == 2)
                got_thinking += part_thinking
                got_answer += part_answer
            assert (got_thinking if split.seen else None, got_answer) == (thinking, answer), (
                pieces
            )


def test_nothing_of_a_possible_tag_is_sent_early() -> None:
    """Streamed: a piece ending in a tag's beginning holds that beginning back, and only it."""
    split = ReasoningSplit(QWEN3, inside=False)
    assert split.feed("<th") == ("", "")
    assert split.feed("ink>Plan step one </") == ("Plan step one ", "")
    assert split.feed("think>\n\nAns") == ("", "Ans")
    assert split.feed("wer </think> stays") == ("", "wer </think> stays")


@pytest.mark.parametrize(
    ("fmt", "tail", "inside"),
    [
        (QWEN3, "<|im_start|>assistant\n", False),  # Qwen3 thinking on: it writes the tag
        (QWEN3, "<|im_start|>assistant\n<think>\n", True),  # Qwen3-Thinking-2507
        (QWEN3, "<|im_start|>assistant\n<think>\n\n</think>\n\n", False),  # thinking off
        (R1, "<｜Assistant｜>", True),
        (R1, "<｜Assistant｜><think>\n", True),
        (R1, "<｜Assistant｜><think>\n\n</think>\n\n", False),
        (MISTRAL, "[/INST][THINK]", True),
    ],
)
def test_the_prompt_says_where_the_output_starts(fmt, tail, inside) -> None:
    assert starts_inside(fmt, tail) is inside


def test_a_message_carries_the_thinking_under_both_names() -> None:
    mode = ReasoningMode(QWEN3, inside=False)
    message = mode.message({"role": "assistant", "content": ""}, "plan")
    assert message == {
        "role": "assistant",
        "content": None,  # thinking only: no answer
        "reasoning_content": "plan",
        "reasoning": "plan",
    }
    left_out = ReasoningMode(QWEN3, inside=False, include=False)
    assert left_out.message({"role": "assistant", "content": "4"}, "plan") == {
        "role": "assistant",
        "content": "4",
    }
