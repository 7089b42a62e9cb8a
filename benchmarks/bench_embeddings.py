"""Embeddings/s and prompt tokens/s of the built-in TorchEngine on CPU: a corpus embedded
batched (every input submitted at once: the scheduler packs them into shared steps of
`max_num_batched_tokens`) vs one at a time (each awaited before the next: one forward per
input), alternated round by round on one warm engine; the ratio per round and its median.

Each round embeds the same `--inputs` passages (varied lengths, `--min-tokens` ..
`--max-tokens`) with the prefix cache reset before each side, so both compute every token.
A `--reference` side adds transformers' `AutoModel` run on the same inputs one at a time
(its own forward, no paging) as a sanity anchor. The last line is
`embeddings batched_vs_single=<median ratio> batched_emb_s=<x> batched_tok_s=<y>
single_emb_s=<a> single_tok_s=<b>`; the load average is printed with every round (the
machine is shared: read the ratios, not the absolute figures).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contract.messages import GenerateRequest, PoolingParams
from hpcserve.model_prepare import prepare_default_model
from mpi_workers.engine.torch.engine import TorchEngine

WORDS = [
    "cluster", "node", "job", "scheduler", "rank", "memory", "vector", "passage", "retrieval",
    "query", "index", "token", "model", "batch", "queue", "partition", "account", "GPU", "core",
    "network", "storage", "file", "search", "answer", "document",
]  # fmt: skip


def corpus(tokenizer, count: int, low: int, high: int, seed: int = 0) -> list[list[int]]:
    """`count` passages of random words, each cut to a length drawn from [low, high]."""
    rng = random.Random(seed)
    passages = []
    for _ in range(count):
        length = rng.randint(low, high)
        text = " ".join(rng.choice(WORDS) for _ in range(length))
        passages.append(tokenizer(text)["input_ids"][:length])
    return passages


def request(tag: str, ids: list[int]) -> GenerateRequest:
    return GenerateRequest(request_id=tag, token_ids=ids, pooling=PoolingParams())


async def batched(engine: TorchEngine, inputs: list[list[int]], tag: str) -> float:
    await engine.reset_prefix_cache()
    start = time.perf_counter()
    outs = await asyncio.gather(
        *(engine.generate_all(request(f"{tag}-{i}", ids)) for i, ids in enumerate(inputs))
    )
    elapsed = time.perf_counter() - start
    assert all(out.embedding is not None for out in outs)
    return elapsed


async def single(engine: TorchEngine, inputs: list[list[int]], tag: str) -> float:
    await engine.reset_prefix_cache()
    start = time.perf_counter()
    for i, ids in enumerate(inputs):
        out = await engine.generate_all(request(f"{tag}-{i}", ids))
        assert out.embedding is not None
    return time.perf_counter() - start


def reference(model, inputs: list[list[int]]) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for ids in inputs:
            model(torch.tensor([ids])).last_hidden_state[0, -1]
    return time.perf_counter() - start


def load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=64)
    parser.add_argument("--min-tokens", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--reference", action="store_true", help="also time transformers")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModel, AutoTokenizer

    model_dir = prepare_default_model()
    inputs = corpus(AutoTokenizer.from_pretrained(model_dir), args.inputs, args.min_tokens,
                    args.max_tokens)  # fmt: skip
    tokens = sum(len(ids) for ids in inputs)
    engine = TorchEngine(model_dir, num_blocks=2048, max_num_seqs=256,
                         max_num_batched_tokens=args.max_num_batched_tokens)  # fmt: skip
    hf = None
    if args.reference:
        hf = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    await engine.start()
    try:
        await batched(engine, inputs[:4], "warm")
        print(f"{len(inputs)} inputs, {tokens} tokens, threads {torch.get_num_threads()}, "
              f"max_num_batched_tokens {args.max_num_batched_tokens}")  # fmt: skip
        ratios, batched_s, single_s = [], [], []
        for r in range(args.rounds):
            order = ("batched", "single") if r % 2 == 0 else ("single", "batched")
            times = {}
            for side in order:
                run = batched if side == "batched" else single
                times[side] = await run(engine, inputs, f"r{r}{side}")
            batched_s.append(times["batched"])
            single_s.append(times["single"])
            ratios.append(times["single"] / times["batched"])
            line = (f"round {r} ({order[0]} first): batched {times['batched']:.3f} s, single "
                    f"{times['single']:.3f} s, batched_vs_single x{ratios[-1]:.2f}")  # fmt: skip
            if hf is not None:
                line += f", transformers one at a time {reference(hf, inputs):.3f} s"
            print(f"{line}; load {load()}")
    finally:
        await engine.shutdown()
    b, s = statistics.median(batched_s), statistics.median(single_s)
    print(f"embeddings batched_vs_single={statistics.median(ratios):.2f} "
          f"batched_emb_s={len(inputs) / b:.1f} batched_tok_s={tokens / b:.0f} "
          f"single_emb_s={len(inputs) / s:.1f} single_tok_s={tokens / s:.0f}")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
