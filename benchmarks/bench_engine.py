"""Tokens/s of the built-in TorchEngine vs. HF transformers `generate` on the same model.

Cases: batch 1 and batch 8 (greedy, EOS ignored so both sides produce exactly
`--new-tokens`), and a prefix-cache case (a long shared prefix: time to first token cold vs.
warm). The last line is `speedup_vs_hf bs1=<x> bs8=<y>`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contract.messages import GenerateRequest, SamplingParams
from hpcserve.model_prepare import prepare_default_model
from mpi_workers.engine.engine import TorchEngine

QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a hash table is.",
    "Give me three tips for sleeping better.",
    "How do airplanes fly?",
    "What is 17 times 23?",
    "Tell me a fun fact about octopuses.",
    "Summarise the plot of Hamlet in two sentences.",
]


def prompts(tokenizer, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids))
    return out


async def run_engine(engine: TorchEngine, batch: list[list[int]], new_tokens: int, tag: str):
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    reqs = [
        GenerateRequest(request_id=f"{tag}-{i}", token_ids=ids, sampling=params)
        for i, ids in enumerate(batch)
    ]
    start = time.perf_counter()
    outs = await asyncio.gather(*(engine.generate_all(r) for r in reqs))
    elapsed = time.perf_counter() - start
    return sum(len(o.token_ids) for o in outs) / elapsed, elapsed


async def ttft(engine: TorchEngine, ids: list[int], tag: str) -> float:
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    await engine.generate_all(GenerateRequest(request_id=tag, token_ids=ids, sampling=params))
    return time.perf_counter() - start


def run_hf(model, tokenizer, batch: list[list[int]], new_tokens: int) -> tuple[float, float]:
    width = max(len(ids) for ids in batch)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
    elapsed = time.perf_counter() - start
    return (out.shape[1] - width) * len(batch) / elapsed, elapsed


async def main_async(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(args.model) if args.model else prepare_default_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.set_num_threads(args.threads)
    engine = TorchEngine(model_dir, num_blocks=args.num_blocks, max_num_seqs=16)
    await engine.start()
    rows = []
    ours: dict[int, float] = {}
    theirs: dict[int, float] = {}
    # Both sides: one warm-up, then the best of --repeats runs (the machine may be shared).
    await run_engine(engine, prompts(tokenizer, 1), 8, "warmup")
    for bs in (1, 8):
        batch = prompts(tokenizer, bs)
        runs = [
            await run_engine(engine, batch, args.new_tokens, f"bs{bs}-{r}")
            for r in range(args.repeats)
        ]
        ours[bs], t_ours = max(runs)
        rows.append((f"engine bs={bs}", ours[bs], t_ours))
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    run_hf(hf, tokenizer, prompts(tokenizer, 1), 8)
    for bs in (1, 8):
        batch = prompts(tokenizer, bs)
        theirs[bs], t_hf = max(
            run_hf(hf, tokenizer, batch, args.new_tokens) for _ in range(args.repeats)
        )
        rows.append((f"hf generate bs={bs}", theirs[bs], t_hf))

    prefix = prompts(tokenizer, 1)[0]
    filler = tokenizer("The quick brown fox jumps over the lazy dog. " * 80)["input_ids"]
    shared = (filler * 4)[: args.prefix_tokens]
    cold = await ttft(engine, shared + prefix, "cold")
    warm = await ttft(engine, shared + prefix[:-3] + [prefix[-1]], "warm")

    print(f"\n{'case':<22}{'tok/s':>10}{'seconds':>10}   (best of {args.repeats})")
    for name, tps, secs in rows:
        print(f"{name:<22}{tps:>10.1f}{secs:>10.2f}")
    print(
        f"\nprefix cache ({len(shared)}-token shared prefix): TTFT cold {cold * 1e3:.0f} ms, "
        f"warm {warm * 1e3:.0f} ms, ratio {cold / warm:.1f}x; "
        f"cached prompt tokens {engine.stats.num_cached_prompt_tokens}"
    )
    await engine.shutdown()
    print(f"speedup_vs_hf bs1={ours[1] / theirs[1]:.2f} bs8={ours[8] / theirs[8]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="HF model folder (default: SmolLM2-135M)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefix-tokens", type=int, default=768)
    parser.add_argument("--num-blocks", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2, help="best of N runs per case")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
