"""What prompt logprobs (`echo` + `logprobs`) cost the torch engine's prefill.

One request of a `--prompt-tokens` prompt and one new token, with prompt logprobs (top
`--top`) and without (the baseline), alternating within each round in one process. Each
request has a fresh first token, so neither reads the prefix cache. The difference is the
logits of every prompt row (`PROMPT_LOGPROB_SLICE` rows at a time: the vocabulary projection,
log_softmax, the gather and the top k) and the entries built on the host.

Prints each round's seconds both ways and their ratio, the load average beside them, and a
last line `prompt_logprobs cost_ratio=<median with / without>`.
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
from mpi_workers.engine.torch.engine import TorchEngine


async def prefill(engine: TorchEngine, prompt: list[int], top: int | None, tag: str) -> float:
    """Seconds until the one-token answer (with its prompt logprobs, if asked) is back."""
    sampling = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=top)
    request = GenerateRequest(request_id=tag, token_ids=prompt, sampling=sampling)
    start = time.perf_counter()
    out = await engine.generate_all(request)
    elapsed = time.perf_counter() - start
    assert (out.prompt_logprobs is not None) is (top is not None)
    assert out.num_cached_tokens == 0
    return elapsed


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 1)[0]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--top", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=2048, help="max_num_batched_tokens")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    engine = TorchEngine(prepare_default_model(), device=args.device, block_size=16,
                         max_num_batched_tokens=args.chunk, max_model_len=4096)  # fmt: skip
    await engine.start()
    ratios: list[float] = []
    try:
        await prefill(engine, list(range(1000, 1064)), args.top, "warm-a")  # warm-up
        await prefill(engine, list(range(1100, 1164)), None, "warm-b")
        for r in range(args.rounds):
            times: dict[str, float] = {}
            # alternate which goes first, so a drift in the machine's load hits both
            order = ("with", "without") if r % 2 == 0 else ("without", "with")
            for mode in order:
                prompt = [2000 + 2 * r + (mode == "with")] + [
                    3000 + (i * 7919) % 20000 for i in range(args.prompt_tokens - 1)
                ]
                top = args.top if mode == "with" else None
                times[mode] = await prefill(engine, prompt, top, f"{mode}{r}")
            ratios.append(times["with"] / times["without"])
            print(f"round {r}: with {times['with']:.3f} s, without {times['without']:.3f} s, "
                  f"ratio {ratios[-1]:.3f} (load {loadavg()})", flush=True)  # fmt: skip
    finally:
        await engine.shutdown()
    print(f"prompt_logprobs cost_ratio={statistics.median(ratios):.3f} "
          f"(prompt {args.prompt_tokens} tokens, top {args.top}, chunk {args.chunk}, "
          f"{args.device})")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
