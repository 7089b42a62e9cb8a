"""CPU cost of the reasoning split per streamed chunk (`frontend.reasoning.ReasoningSplit`).

With `frontend.reasoning_parser` set, a streamed chat answer goes through its choice's split
once per chunk. This measures that step alone, on the default model's own token pieces
(SmolLM2's tokenizer, one token per chunk, as a c=1 stream sends them), for two answers: a
thinking block then an answer (the common case), and an answer with no block (a model with
thinking switched off); in rounds that alternate the split with the baseline (the same loop
that only passes the pieces on: what a deployment without the parser does). Prints per round
and answer: µs per chunk with the split, the baseline's, and their difference; the load
average before and after. The frontend spends ~14 µs per SSE event through NATS
(/work/shared/notes/serving-facts.md), so the difference is put against that.

    python benchmarks/bench_reasoning.py [--rounds 6] [--repeat 300]

Last line: `reasoning_split us_per_chunk_extra=<median over rounds and answers>`.
A deployment without the parser runs none of this (`prepared.reasoning` is None).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_tool_calls import alternated_rounds, chunk_options, pieces_of
from frontend.reasoning import FORMATS, ReasoningSplit

THINKING = (
    "<think>\nThe user asks about the weather in Paris in spring. Typical temperatures are "
    "between 10 and 18 degrees; showers are common in April, and evenings are cool. I should "
    "suggest a light coat and an umbrella.\n</think>\n\n"
    "Paris in spring is mild, 10 to 18 degrees. Bring a light coat and an umbrella."
)
ANSWER_ONLY = "Paris in spring is mild, 10 to 18 degrees. Bring a light coat and an umbrella. " * 3
ANSWERS = [("thinking", THINKING), ("answer_only", ANSWER_ONLY)]


def with_split(pieces: list[str], repeat: int) -> float:
    """Seconds per chunk through a fresh split per answer."""
    fmt = FORMATS["qwen3"]
    start = time.perf_counter()
    for _ in range(repeat):
        split = ReasoningSplit(fmt, inside=False)
        out: list[object] = []
        last = len(pieces) - 1
        for number, piece in enumerate(pieces):
            out += split.feed(piece, number == last)
    return (time.perf_counter() - start) / (repeat * len(pieces))


def main() -> None:
    args, tokenizer = chunk_options(__doc__)
    answers = [(name, pieces_of(tokenizer, text), with_split) for name, text in ANSWERS]
    median = alternated_rounds(args.rounds, args.repeat, answers, "split_us")
    print(f"per SSE event (~14 us through NATS): +{median / 14.0:.1%} CPU for a streamed answer")
    print(f"reasoning_split us_per_chunk_extra={median:.3f}")


if __name__ == "__main__":
    main()
