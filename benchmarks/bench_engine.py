"""Tokens/s of the built-in TorchEngine vs. HF transformers `generate` on the same model.

Cases: batch 1 and batch 8 (greedy, EOS ignored so both sides produce exactly
`--new-tokens`), and a prefix-cache case (a long shared prefix: time to first token cold vs.
warm). Each of `--dtypes` (default float32, the CPU default, then bfloat16) runs ours vs HF
in that same dtype. The last line is `speedup_vs_hf bs1=<x> bs8=<y>` for the first dtype;
the line before it the same for the others, e.g. `speedup_vs_hf[bfloat16] ...`.

`--device cuda --shape llama8b|smollm2` measures the engine on one GPU instead (random
weights; synchronous vs overlapped stepping vs a hand-written reference loop; see
`bench_gpu_engine.py`, which it runs), ending in `gpu_engine bs1_roofline=<x>
bs128_tok_s=<y> e2e_bs128_tok_s=<z> vs_reference_bs128=<r>`.
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
from mpi_workers.engine.torch.engine import TorchEngine

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


async def compare(
    model_dir: Path, tokenizer, dtype: torch.dtype, args: argparse.Namespace
) -> tuple[list[tuple[str, float, float]], dict[int, float], TorchEngine]:
    """Our engine and HF generate in `dtype`, batch 1 and 8; (rows, speedups, our engine)."""
    from transformers import AutoModelForCausalLM

    name = str(dtype).removeprefix("torch.")
    engine = TorchEngine(model_dir, dtype=dtype, num_blocks=args.num_blocks, max_num_seqs=16)
    await engine.start()
    rows = []
    ours: dict[int, float] = {}
    theirs: dict[int, float] = {}
    # Both sides: one warm-up, then the best of --repeats runs (the machine may be shared).
    await run_engine(engine, prompts(tokenizer, 1), 8, "warmup")
    for bs in (1, 8):
        batch = prompts(tokenizer, bs)
        runs = [
            await run_engine(engine, batch, args.new_tokens, f"{name}-bs{bs}-{r}")
            for r in range(args.repeats)
        ]
        ours[bs], t_ours = max(runs)
        rows.append((f"engine {name} bs={bs}", ours[bs], t_ours))
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    run_hf(hf, tokenizer, prompts(tokenizer, 1), 8)
    for bs in (1, 8):
        batch = prompts(tokenizer, bs)
        theirs[bs], t_hf = max(
            run_hf(hf, tokenizer, batch, args.new_tokens) for _ in range(args.repeats)
        )
        rows.append((f"hf {name} bs={bs}", theirs[bs], t_hf))
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    del hf
    floor_ms = weight_bytes / read_bandwidth() * 1e3
    hf_step_ms = 8 / theirs[8] * 1e3
    print(
        f"{name}: decode reads every weight once per step ({weight_bytes / 2**20:.0f} MiB): "
        f"floor {floor_ms:.1f} ms/step at this machine's read bandwidth; HF bs=8 "
        f"{hf_step_ms:.1f} ms/step, ours {8 / ours[8] * 1e3:.1f} -> at most "
        f"{hf_step_ms / floor_ms:.1f}x HF at bs=8 for any engine"
    )
    return rows, {bs: ours[bs] / theirs[bs] for bs in (1, 8)}, engine


def read_bandwidth(mib: int = 512) -> float:
    """Bytes/s of summing a buffer larger than the caches (best of 3)."""
    buf = torch.ones(mib * 2**20 // 4)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - start)
    return buf.numel() * 4 / best


async def prefix_case(engine: TorchEngine, tokenizer, prefix_tokens: int) -> str:
    """TTFT of a long prompt cold, then of one sharing all but its last blocks."""
    prefix = prompts(tokenizer, 1)[0]
    filler = tokenizer("The quick brown fox jumps over the lazy dog. " * 80)["input_ids"]
    shared = (filler * 4)[:prefix_tokens]
    cold = await ttft(engine, shared + prefix, "cold")
    warm = await ttft(engine, shared + prefix[:-3] + [prefix[-1]], "warm")
    return (
        f"\nprefix cache ({len(shared)}-token shared prefix, {engine.dtype}): TTFT cold "
        f"{cold * 1e3:.0f} ms, warm {warm * 1e3:.0f} ms, ratio {cold / warm:.1f}x; "
        f"cached prompt tokens {engine.stats.num_cached_prompt_tokens}"
    )


async def main_async(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    model_dir = Path(args.model) if args.model else prepare_default_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.set_num_threads(args.threads)
    dtypes = [getattr(torch, name) for name in args.dtypes]
    rows: list[tuple[str, float, float]] = []
    speedups: dict[str, dict[int, float]] = {}
    prefix_line = ""
    for dtype in dtypes:
        dtype_rows, speedups[str(dtype)], engine = await compare(model_dir, tokenizer, dtype, args)
        rows += dtype_rows
        if dtype == dtypes[0]:  # the prefix-cache case, in the default dtype
            prefix_line = await prefix_case(engine, tokenizer, args.prefix_tokens)
        await engine.shutdown()

    print(f"\n{'case':<24}{'tok/s':>10}{'seconds':>10}   (best of {args.repeats})")
    for name, tps, secs in rows:
        print(f"{name:<24}{tps:>10.1f}{secs:>10.2f}")
    print(prefix_line)
    # Each dtype against HF in the same dtype; the last line is the first dtype (the default).
    for dtype in reversed(dtypes):
        ratio = speedups[str(dtype)]
        tag = "" if dtype == dtypes[0] else f"[{str(dtype).removeprefix('torch.')}]"
        print(f"speedup_vs_hf{tag} bs1={ratio[1]:.2f} bs8={ratio[8]:.2f}")


def main() -> None:
    if "--device" in sys.argv:
        gpu_main()
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="HF model folder (default: SmolLM2-135M)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefix-tokens", type=int, default=768)
    parser.add_argument("--num-blocks", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2, help="best of N runs per case")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--dtypes", nargs="+", default=["float32", "bfloat16"],
        help="each runs ours vs HF in that dtype; the first one is the last line's",
    )  # fmt: skip
    asyncio.run(main_async(parser.parse_args()))


def gpu_main() -> None:
    """`--device cuda [--shape S] [--prompt N] [--new-tokens N]`: the GPU engine benchmark."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", choices=["cuda"], required=True)
    parser.add_argument("--shape", choices=["llama8b", "smollm2"], default="llama8b")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_gpu_engine import main_async as gpu_main_async

    asyncio.run(gpu_main_async(args))


if __name__ == "__main__":
    main()
