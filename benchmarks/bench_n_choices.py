"""What sharing the prompt saves for the `n` choices of one request, in the torch engine.

The n choices of one OpenAI request reach the engine together (the frontend sends them to
one worker). With sharing (the scheduler's default) a choice whose prompt blocks another
choice is computing waits for them and takes them from the prefix cache; without it (the
baseline, the same engine with that wait switched off) every choice prefills the prompt.
Each round uses a fresh prompt (a new first token), so nothing is cached before it.

Prints, for `--n` choices of a `--prompt-tokens` prompt and `--new-tokens` each: the time until
every choice has finished and the prompt tokens the engine computed, both ways, alternating
rounds in one process. Last line: `n_choices share_speedup=<x> prompt_compute_ratio=<y>`
(baseline time / shared time; shared computed prompt tokens / baseline's).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contract.messages import GenerateRequest, SamplingParams
from hpcserve.model_prepare import prepare_default_model
from mpi_workers.engine.scheduler import Scheduler
from mpi_workers.engine.torch.engine import TorchEngine

_shares = Scheduler._awaits_shared_prefix


async def one_request(engine: TorchEngine, prompt: list[int], n: int, new_tokens: int,
                      tag: str) -> tuple[float, int]:  # fmt: skip
    """Seconds until all n choices finished, prompt tokens computed meanwhile."""
    before = engine.stats.num_computed_prompt_tokens
    requests = [
        GenerateRequest(
            request_id=f"{tag}-{i}",
            token_ids=prompt,
            sampling=SamplingParams(
                max_tokens=new_tokens, temperature=0.8, seed=100 + i, ignore_eos=True
            ),
        )
        for i in range(n)
    ]
    start = time.perf_counter()
    await asyncio.gather(*(engine.generate_all(r) for r in requests))
    return time.perf_counter() - start, engine.stats.num_computed_prompt_tokens - before


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=400)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    engine = TorchEngine(prepare_default_model(), device=args.device, block_size=16,
                         max_num_batched_tokens=4096, max_model_len=4096)  # fmt: skip
    await engine.start()
    results: dict[str, list[tuple[float, int]]] = {"shared": [], "baseline": []}
    try:
        await one_request(engine, list(range(1000, 1064)), args.n, 2, "warm")  # warm-up
        for r in range(args.rounds):
            for mode in ("shared", "baseline"):
                # a fresh first token: this prompt has no cached block
                prompt = [2000 + 2 * r + (mode == "baseline")] + [
                    3000 + (i * 7919) % 20000 for i in range(args.prompt_tokens - 1)
                ]
                Scheduler._awaits_shared_prefix = (  # type: ignore[method-assign]
                    _shares if mode == "shared" else lambda self, seq: False
                )
                results[mode].append(
                    await one_request(engine, prompt, args.n, args.new_tokens, f"{mode}{r}")
                )
    finally:
        Scheduler._awaits_shared_prefix = _shares  # type: ignore[method-assign]
        await engine.shutdown()

    print(f"n={args.n} choices, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens "
          f"each, {args.device}, {args.rounds} rounds (median)")  # fmt: skip
    print(f"{'mode':10} {'seconds':>9} {'prompt tokens computed':>24}")
    summary = {}
    for mode, runs in results.items():
        seconds = statistics.median(t for t, _ in runs)
        computed = statistics.median(c for _, c in runs)
        summary[mode] = (seconds, computed)
        print(f"{mode:10} {seconds:9.3f} {computed:24.0f}")
    speedup = summary["baseline"][0] / summary["shared"][0]
    ratio = summary["shared"][1] / summary["baseline"][1]
    print(f"n_choices share_speedup={speedup:.2f} prompt_compute_ratio={ratio:.3f}")


if __name__ == "__main__":
    asyncio.run(main())
