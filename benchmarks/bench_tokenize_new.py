"""CPU µs to turn a NEW chat question into prompt ids (`TextTokenizer.encode_chat`), this
tree's tokenizer against another tree's (`--baseline DIR`, e.g. main's checkout), issue #14.

A repeated question finds its whole prompt in the tokenizer's piece cache; a new one does not,
and its text is split into pre-tokens whose ids are mostly cached already (the words were
seen before) with a few new ones. Two kinds of new questions, both after a warm-up of
`--warm` questions of the same words:
- `sentence`: a new sentence each time, 8-16 words of a 200-word vocabulary, one word in 20
  new (a number or a made-up word);
- `numbered`: bench_frontend's `--ab-new-prompts` question (the same sentence, a new number).
Two ways of running them: `hot` (back to back) and `cold` (an untimed walk over 16 MB of
Python objects between two questions, so the tokenizer's code and data have left the CPU's
caches, as in a frontend that runs ~0.6 ms of other Python per request).

The sides are alternated chunk by chunk (`--rounds`, each side first in every other round)
and get the same questions; each chunk's CPU time (thread_time: a busy machine's
descheduling is not counted) over `--chunk` questions. Both sides' ids are checked equal.

    python benchmarks/bench_tokenize_new.py --baseline /work/main [--rounds 6]

Per round and kind/mode: `us_per_question this baseline ratio`, then the medians and the load
average at start and end.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_frontend import QUESTION
from benchmarks.bench_kv_choose import load_module  # a baseline tree's module by path
from frontend.tokenization import TextTokenizer
from hpcserve.model_prepare import prepare_default_model

Messages = list[dict[str, Any]]
_WORDS = (
    "the a an of to and in on at by for with from about into over after before why how what "
    "when where which who is are was were be been can could should would will do does did not "
    "no yes all any both each few more most other some such only own same so than too very "
    "just now then here there explain describe compare summarize list write give tell show "
    "make find use help please one two three four five short long simple best main first last "
    "new old good bad big small many much sky blue light sun water air energy heat time year "
    "day week city country world history science music language computer program code network "
    "system people person child school work company number group problem fact story poem "
    "summary reason difference cat dog planet star ocean mountain river forest recipe bread "
    "coffee tea health exercise sleep food money book movie game car train plane road house "
    "garden tree flower bird fish weather rain snow wind cloud color red green paper test data "
    "model memory file error question answer example way part place case hand life Python "
    "Paris Rome Einstein"
)
VOCABULARY = _WORDS.split()


def sentence(rng: random.Random) -> str:
    words = []
    for _ in range(rng.randrange(8, 17)):
        if rng.random() < 0.05:  # a word the tokenizer has not seen
            new = str(rng.randrange(10**6)) if rng.random() < 0.5 else rng.choice(VOCABULARY)
            words.append(new + "".join(rng.choice("aeiouxyz") for _ in range(3)))
        else:
            words.append(rng.choice(VOCABULARY))
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice("?.!?")


def questions(kind: str, rng: random.Random, count: int, first: int) -> list[Messages]:
    if kind == "sentence":
        texts = [sentence(rng) for _ in range(count)]
    else:  # bench_frontend's drive_new_prompts
        texts = [f"{QUESTION} (question {number})" for number in range(first, first + count)]
    return [[{"role": "user", "content": text}] for text in texts]


def timed(encode: Callable[[Messages], list[int]], chunk: list[Messages], cold: bool,
          evict: list[int]) -> tuple[float, list[list[int]]]:  # fmt: skip
    """CPU µs per question over `chunk`, and the ids; `cold`: `evict` walked between two."""
    total = 0
    out = []
    for messages in chunk:
        if cold:
            sum(evict)
        start = time.thread_time_ns()
        ids = encode(messages)
        total += time.thread_time_ns() - start
        out.append(ids)
    return total / len(chunk) / 1000, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="another checkout (e.g. /work/main)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--chunk", type=int, default=400, help="questions a side a round")
    parser.add_argument("--warm", type=int, default=3000)
    args = parser.parse_args()

    baseline = load_module(Path(args.baseline) / "frontend" / "tokenization.py", "base_tok")
    model = prepare_default_model()
    sides = {"this": TextTokenizer(model), "baseline": baseline.TextTokenizer(model)}
    rng = random.Random(5)
    warm = questions("sentence", rng, args.warm, 0)
    for tokenizer in sides.values():
        for messages in warm:
            tokenizer.encode_chat(messages)
    evict = list(range(2_000_000))  # ~16 MB of pointers, more of ints: past the CPU's caches
    load_start = Path("/proc/loadavg").read_text().split()[:3]
    ratios: dict[str, list[float]] = {}
    figures: dict[str, dict[str, list[float]]] = {}
    number = 10**6
    for round_ in range(args.rounds):
        for kind in ("sentence", "numbered"):
            for mode in ("hot", "cold"):
                chunk = questions(kind, rng, args.chunk, number)
                number += args.chunk
                order = ["this", "baseline"] if round_ % 2 == 0 else ["baseline", "this"]
                us: dict[str, float] = {}
                ids: dict[str, list[list[int]]] = {}
                for name in order:
                    us[name], ids[name] = timed(
                        sides[name].encode_chat, chunk, mode == "cold", evict
                    )
                if ids["this"] != ids["baseline"]:
                    raise SystemExit(f"{kind}/{mode}: the sides' ids differ")
                key = f"{kind}/{mode}"
                ratios.setdefault(key, []).append(us["this"] / us["baseline"])
                per_side = figures.setdefault(key, {"this": [], "baseline": []})
                for name in us:
                    per_side[name].append(us[name])
                print(f"round {round_} {key:16} this {us['this']:6.1f} baseline "
                      f"{us['baseline']:6.1f} us/question ratio {ratios[key][-1]:.2f}")  # fmt: skip
    load_end = Path("/proc/loadavg").read_text().split()[:3]
    print(f"load average start {' '.join(load_start)} end {' '.join(load_end)}")
    for key, values in ratios.items():
        this = statistics.median(figures[key]["this"])
        base = statistics.median(figures[key]["baseline"])
        print(f"tokenize_new {key} this_us={this:.1f} baseline_us={base:.1f} "
              f"vs_baseline={statistics.median(values):.2f} "
              f"rounds={','.join(f'{value:.2f}' for value in values)}")  # fmt: skip


if __name__ == "__main__":
    main()
