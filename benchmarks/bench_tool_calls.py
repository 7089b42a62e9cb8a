"""CPU cost of tool-call parsing per streamed chunk (`frontend.tool_calls.ToolCallStream`).

A streamed answer to a request with tools goes through its choice's call finder once per
chunk. This measures that step alone, on the default model's own token pieces (SmolLM2's
tokenizer, one token per chunk, as a c=1 stream sends them), for three answers: plain text
(no call), text then a hermes call, and a pythonic call list; in rounds that alternate the
parser with the baseline (the same loop that only joins the pieces: what a request without
tools does). Prints per round and answer: µs per chunk with the parser, the baseline's, and
their difference; the load average before and after. The frontend spends ~14 µs per SSE event
through NATS (/work/shared/notes/serving-facts.md), so the difference is put against that.

    python benchmarks/bench_tool_calls.py [--rounds 6] [--repeat 300]

Last line: `tool_call_parsing us_per_chunk_extra=<median over rounds and answers>`.
A request without tools runs none of this (`prepared.tools` is None); its end-to-end cost is
measured by `bench_frontend.py --ab-tree <checkout before>` (c=1 added latency, A/B).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contract.config import default_model_dir
from frontend.tokenization import TextTokenizer
from frontend.tool_calls import FORMATS, ToolCallStream

PLAIN = (
    "The weather in Paris is mild in spring, with temperatures between 10 and 18 degrees. "
    "Bring a light coat and an umbrella: April showers are common, and evenings stay cool. "
) * 3
HERMES = (
    "Let me look that up for you.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius", "days": 3}}\n'
    "</tool_call>"
)
PYTHONIC = '[get_weather(city="Paris", unit="celsius", days=3), get_time(zone="CET")]'
ANSWERS = [("plain", "hermes", PLAIN), ("hermes_call", "hermes", HERMES),
           ("pythonic_call", "pythonic", PYTHONIC)]  # fmt: skip


def pieces_of(tokenizer: TextTokenizer, text: str) -> list[str]:
    """The text as the detokenizer streams it: one token's text per chunk."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return [tokenizer.decode([i]) for i in ids]


def with_parser(fmt: str, pieces: list[str], repeat: int) -> float:
    """Seconds per chunk through a fresh call finder per answer."""
    parser = FORMATS[fmt]
    start = time.perf_counter()
    for _ in range(repeat):
        stream = ToolCallStream(parser)
        out: list[object] = []
        for piece in pieces:
            out += stream.feed(piece)
        out += stream.finish()
    return (time.perf_counter() - start) / (repeat * len(pieces))


def baseline(pieces: list[str], repeat: int) -> float:
    """Seconds per chunk of the same loop without a parser (pieces passed on as they are)."""
    start = time.perf_counter()
    for _ in range(repeat):
        out: list[object] = []
        for piece in pieces:
            out += [piece]
    return (time.perf_counter() - start) / (repeat * len(pieces))


Measure = Callable[[list[str], int], float]  # seconds per chunk over `repeat` answers


def alternated_rounds(
    rounds: int, repeat: int, answers: list[tuple[str, list[str], Measure]], column: str
) -> float:
    """Each round, each answer measured and its baseline (which goes first alternates), a
    row printed; the median extra µs per chunk over rounds and answers."""
    print(f"loadavg before: {Path('/proc/loadavg').read_text().strip()}")
    print(f"round  answer          chunks  {column:>9s}  baseline_us  extra_us")
    extras: list[float] = []
    for round_index in range(rounds):
        for name, pieces, measure in answers:
            if round_index % 2:
                base = baseline(pieces, repeat)
                measured = measure(pieces, repeat)
            else:
                measured = measure(pieces, repeat)
                base = baseline(pieces, repeat)
            extra = (measured - base) * 1e6
            extras.append(extra)
            print(f"{round_index:5d}  {name:14s}  {len(pieces):6d}  {measured * 1e6:9.3f}  "
                  f"{base * 1e6:11.3f}  {extra:8.3f}")  # fmt: skip
    print(f"loadavg after: {Path('/proc/loadavg').read_text().strip()}")
    return statistics.median(extras)


def chunk_options(doc: str) -> tuple[argparse.Namespace, TextTokenizer]:
    """The per-chunk benchmarks' options (rounds, answers per round, model) and tokenizer."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=300, help="answers per round and side")
    parser.add_argument("--model", default=None, help="model folder (default: SmolLM2)")
    args = parser.parse_args()
    return args, TextTokenizer(args.model or default_model_dir())


def main() -> None:
    args, tokenizer = chunk_options(__doc__)
    answers: list[tuple[str, list[str], Measure]] = [
        (name, pieces_of(tokenizer, text), functools.partial(with_parser, fmt))
        for name, fmt, text in ANSWERS
    ]
    median = alternated_rounds(args.rounds, args.repeat, answers, "parser_us")
    print(f"per SSE event (~14 us through NATS): +{median / 14.0:.1%} CPU for a request with tools")
    print(f"tool_call_parsing us_per_chunk_extra={median:.3f}")


if __name__ == "__main__":
    main()
