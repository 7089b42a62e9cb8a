"""What constrained output (`SamplingParams.guided`) costs the torch engine, and that a plain
request pays nothing for it.

1. Per token of a guided row (SmolLM2's tokenizer, a JSON Schema with an enum, a nested object
   and an array): llguidance's bitmask, its application to the logits (`apply_bitmask`, on
   `--device`) and the matcher's consume, replaying a valid document token by token; for 1
   row and for `--rows` rows in one parallel bitmask call.
2. The engine, in one process: `--rows` greedy rows of `--new-tokens` decode steps, plain (A)
   vs guided (B) by a pattern of letters, spaces and punctuation ending in '#' (a greedy row
   practically never gets there: both sides run about the same steps; a bounded repetition
   such as `{400}` makes llguidance's first masks cost ~10 ms a row, not a fair per-step
   cost), alternating which goes first per round.
3. `--vs DIR` (a checkout of the baseline, e.g. `git archive main | tar x -C DIR`): plain
   requests only, this tree vs DIR, each round one subprocess per tree (alternating which
   goes first), same engine settings: the A/B of "a plain request pays nothing".

Prints per-round figures with the load average beside them and summary lines
`guided mask_us_per_token=... apply_us=... consume_us=...`, `guided engine_ratio=...`,
`guided plain_vs_baseline=...`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer"},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {"type": "object", "properties": {"city": {"type": "string"}},
                    "required": ["city"]},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "role", "address", "tags"],
}  # fmt: skip
DOCUMENT = (
    '{"name": "Ada Lovelace", "age": 36, "role": "admin", "address": {"city": "London"}, '
    '"tags": ["mathematics", "engines", "poetry", "notes"]}'
)
PLAIN_PROMPT = "Write a long story about a lighthouse keeper."


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 1)[0]


def mask_costs(model_dir: Path, rows: int, device: str) -> None:
    """Part 1: microseconds per token of the bitmask, its application and the consume."""
    import torch
    from tokenizers import Tokenizer

    from contract.messages import GuidedDecoding
    from mpi_workers.engine.torch.guided import Guides, apply_bitmask

    guides = Guides(model_dir, 49152, frozenset({2}))
    guided = GuidedDecoding(kind="json_schema", spec=json.dumps(SCHEMA))
    ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(DOCUMENT).ids
    logits = torch.randn(rows, 49152, device=device)
    for batch in (1, rows):
        for _ in range(2):  # the first pass warms llguidance's caches, the second is timed
            matchers = [guides.matcher(guided, []) for _ in range(batch)]
            mask_s = apply_s = consume_s = 0.0
            for token in ids:
                start = time.perf_counter()
                bitmask = guides.bitmask(matchers)
                mid = time.perf_counter()
                out = apply_bitmask(logits[:batch], list(range(batch)), bitmask)
                if device != "cpu":
                    torch.cuda.synchronize()
                end = time.perf_counter()
                assert torch.isfinite(out[:, token]).all()
                for matcher in matchers:
                    guides.consume(matcher, token)
                mask_s += mid - start
                apply_s += end - mid
                consume_s += time.perf_counter() - end
        n = len(ids)
        print(f"{batch} row(s), {n} tokens: bitmask {1e6 * mask_s / n:.1f} us/step, "
              f"apply {1e6 * apply_s / n:.1f} us/step, consume {1e6 * consume_s / n:.1f} "
              f"us/step (load {loadavg()})", flush=True)  # fmt: skip
        if batch == 1:
            single = (1e6 * mask_s / n, 1e6 * apply_s / n, 1e6 * consume_s / n)
    print(f"guided mask_us_per_token={single[0]:.1f} apply_us={single[1]:.1f} "
          f"consume_us={single[2]:.1f} ({device})", flush=True)  # fmt: skip


async def decode_rate(engine, prompt: list[int], rows: int, new_tokens: int, guided) -> float:
    """Generated tokens per second of `rows` greedy requests (guided: None or a constraint)."""
    from contract.messages import GenerateRequest, SamplingParams

    constraint = {} if guided is None else {"guided": guided}  # (a baseline may lack it)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, **constraint)
    stamp = time.perf_counter_ns()
    requests = [
        GenerateRequest(request_id=f"r{stamp}-{i}", token_ids=[3000 + i, *prompt],
                        sampling=params)
        for i in range(rows)
    ]  # fmt: skip
    start = time.perf_counter()
    outs = await asyncio.gather(*(engine.generate_all(r) for r in requests))
    return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start)


def make_engine(device: str):
    from hpcserve.model_prepare import prepare_default_model
    from mpi_workers.engine.torch.engine import TorchEngine

    return TorchEngine(prepare_default_model(), device=device, num_blocks=512, max_num_seqs=16)


def prompt_ids(model_dir: Path) -> list[int]:
    from tokenizers import Tokenizer

    text = f"<|im_start|>user\n{PLAIN_PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text).ids


async def engine_ab(rows: int, new_tokens: int, rounds: int, device: str) -> None:
    """Part 2: plain vs constrained rows in one engine, alternating."""
    from contract.messages import GuidedDecoding

    engine = make_engine(device)
    prompt = prompt_ids(engine.model_dir)
    guided = GuidedDecoding(kind="regex", spec="[a-zA-Z ,.]*#")
    await engine.start()
    ratios: list[float] = []
    try:
        await decode_rate(engine, prompt, rows, 4, None)  # warm-up (and llguidance's tokenizer)
        await decode_rate(engine, prompt, rows, 4, guided)
        for r in range(rounds):
            rates: dict[str, float] = {}
            for mode in (("plain", "guided") if r % 2 == 0 else ("guided", "plain")):
                rates[mode] = await decode_rate(
                    engine, prompt, rows, new_tokens, guided if mode == "guided" else None
                )
            ratios.append(rates["guided"] / rates["plain"])
            print(f"round {r}: plain {rates['plain']:.1f} tok/s, guided {rates['guided']:.1f} "
                  f"tok/s, ratio {ratios[-1]:.3f} (load {loadavg()})", flush=True)  # fmt: skip
    finally:
        await engine.shutdown()
    print(f"guided engine_ratio={statistics.median(ratios):.3f} (guided / plain tok/s, "
          f"{rows} rows, {device})", flush=True)  # fmt: skip


async def plain_only(rows: int, new_tokens: int, reps: int, device: str) -> None:
    """One side of part 3: the median plain rate over `reps` batches, as `plain_tok_s=`."""
    engine = make_engine(device)
    prompt = prompt_ids(engine.model_dir)
    await engine.start()
    try:
        await decode_rate(engine, prompt, rows, 4, None)
        rates = [await decode_rate(engine, prompt, rows, new_tokens, None) for _ in range(reps)]
    finally:
        await engine.shutdown()
    print(f"plain_tok_s={statistics.median(rates):.2f}", flush=True)


def versus(baseline: Path, args: argparse.Namespace) -> None:
    """Part 3: subprocesses of this script's `--plain-only`, this tree vs `baseline`."""
    here = Path(__file__).resolve().parents[1]
    ratios: list[float] = []
    for r in range(args.rounds):
        rates: dict[str, float] = {}
        order = (("this", here), ("baseline", baseline))
        for name, tree in order if r % 2 == 0 else order[::-1]:
            command = [sys.executable, __file__, "--plain-only", "--src", str(tree),
                       "--rows", str(args.rows), "--new-tokens", str(args.new_tokens),
                       "--device", args.device]  # fmt: skip
            out = subprocess.run(command, capture_output=True, text=True, check=True,
                                 env={**os.environ, "PYTHONPATH": str(tree)}).stdout  # fmt: skip
            rates[name] = float(out.rsplit("plain_tok_s=", 1)[1].split()[0])
        ratios.append(rates["this"] / rates["baseline"])
        print(f"round {r}: this {rates['this']:.1f} tok/s, baseline {rates['baseline']:.1f} "
              f"tok/s, ratio {ratios[-1]:.3f} (load {loadavg()})", flush=True)  # fmt: skip
    print(f"guided plain_vs_baseline={statistics.median(ratios):.3f} (this / {baseline}, "
          f"{args.rows} plain rows)", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vs", type=Path, help="a baseline checkout: part 3 only")
    parser.add_argument("--plain-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1],
                        help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args()
    sys.path.insert(0, str(args.src))
    if args.plain_only:
        asyncio.run(plain_only(args.rows, args.new_tokens, 5, args.device))
        return
    if args.vs is not None:
        versus(args.vs.resolve(), args)
        return
    from hpcserve.model_prepare import prepare_default_model

    mask_costs(prepare_default_model(), args.rows, args.device)
    asyncio.run(engine_ab(args.rows, args.new_tokens, args.rounds, args.device))


if __name__ == "__main__":
    main()
