"""What serving costs: the same requests through the deployment vs. the engine called directly.

Served: `hpcserve up`'s processes (etcd, NATS, a torch worker, the frontend) started through the
launcher; streaming `/v1/completions` with the prompt as token ids, `ignore_eos`, greedy.
Direct: the same engine configuration in this process, `engine.generate` on the same token ids.
The two never run at the same time (2 cores). Per concurrency level it reports TTFT,
inter-token latency (per request: its mean gap after the first token) p50/p99 and output
tokens/s, then the served/direct ratios and the CPU each process used while served.

    python benchmarks/bench_serving.py [--concurrency 1 8 32] [--output-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contract.config import DeploymentConfig, load_config
from contract.messages import GenerateRequest, SamplingParams
from hpcserve.launcher import start_deployment, stop_deployment
from mpi_workers.engine.factory import build_engine

REPO = Path(__file__).resolve().parents[1]
TEXT = (
    "The history of computing is a story of layers: transistors make gates, gates make "
    "processors, processors run operating systems, and operating systems host programs that "
    "people use every day to write, talk, learn and play. "
)


@dataclass
class Sample:
    ttft_s: float
    itl_s: float  # this request's mean gap between tokens after the first
    tokens: int


@dataclass
class Level:
    concurrency: int
    samples: list[Sample]
    wall_s: float

    @property
    def tokens_per_s(self) -> float:
        return sum(s.tokens for s in self.samples) / self.wall_s

    def ttft(self, q: float) -> float:
        return percentile([s.ttft_s for s in self.samples], q)

    def itl(self, q: float) -> float:
        return percentile([s.itl_s for s in self.samples], q)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def make_prompts(model_dir: Path, count: int, prompt_tokens: int, tag: str) -> list[list[int]]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    prompts = []
    for i in range(count):
        ids = tokenizer.encode(f"Request {tag}-{i}. {TEXT * 8}").ids
        prompts.append(ids[:prompt_tokens])
    return prompts


# ---- direct: the engine in this process --------------------------------------------------


async def direct_one(engine, request_id: str, ids: list[int], output_tokens: int) -> Sample:
    params = SamplingParams(max_tokens=output_tokens, temperature=0.0, ignore_eos=True)
    request = GenerateRequest(request_id=request_id, token_ids=ids, sampling=params)
    start = time.perf_counter()
    stamps: list[float] = []
    tokens = 0
    async for out in engine.generate(request):
        if out.token_ids:
            now = time.perf_counter()
            stamps.extend([now] * len(out.token_ids))
            tokens += len(out.token_ids)
    return Sample(stamps[0] - start, mean_gap(stamps[0], stamps[-1], tokens), tokens)


async def run_direct(config: DeploymentConfig, model_dir: Path, workload) -> dict[int, Level]:
    engine = build_engine(config, model_dir)
    await engine.start()
    try:
        await direct_one(engine, "warmup", workload[0][1][0], 4)
        results = {}
        for concurrency, prompts, output_tokens in workload:
            results[concurrency] = await run_level(
                concurrency, prompts,
                lambda i, ids, c=concurrency, n=output_tokens: direct_one(
                    engine, f"d{c}-{i}", ids, n
                ),
            )  # fmt: skip
    finally:
        await engine.shutdown()
    return results


# ---- served: through the frontend --------------------------------------------------------


async def served_one(
    client: httpx.AsyncClient, model: str, ids: list[int], output_tokens: int
) -> Sample:
    body = {
        "model": model, "prompt": ids, "max_tokens": output_tokens, "temperature": 0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    start = time.perf_counter()
    stamps: list[float] = []
    tokens = 0
    async with client.stream("POST", "/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                stamps.append(time.perf_counter())
    if not stamps:
        raise RuntimeError("no tokens streamed")
    # Text chunks can merge tokens (incomplete UTF-8): use the real count from `usage`.
    return Sample(stamps[0] - start, mean_gap(stamps[0], stamps[-1], tokens), tokens)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc); 0 when unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_served(
    config: DeploymentConfig, workload, start=start_deployment
) -> dict[int, Level]:
    """`start(config, say)` starts the deployment (bench_disagg places workers on GPUs)."""
    deployment = await asyncio.to_thread(start, config, lambda _m: None)
    pids = {planned.name: managed.pid for planned, managed in deployment.processes}
    pids["bench client"] = os.getpid()
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    t0 = time.perf_counter()
    try:
        limits = httpx.Limits(max_connections=128, max_keepalive_connections=128)
        async with httpx.AsyncClient(base_url=deployment.url, timeout=600, limits=limits) as client:
            model = (await client.get("/models")).json()["data"][0]["id"]
            await served_one(client, model, workload[0][1][0], 4)
            results = {}
            for concurrency, prompts, output_tokens in workload:
                results[concurrency] = await run_level(
                    concurrency, prompts,
                    lambda _i, ids, n=output_tokens: served_one(client, model, ids, n),
                )  # fmt: skip
        wall = time.perf_counter() - t0
        used = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
        print(f"CPU use during the served run ({wall:.0f} s wall, 100% = one core):")
        for name, seconds in used.items():
            print(f"  {name:<20} {seconds:6.1f} s  {100 * seconds / wall:5.0f}%")
    finally:
        await asyncio.to_thread(stop_deployment, deployment, lambda _m: None)
    return results


# ---- common ------------------------------------------------------------------------------


def mean_gap(first: float, last: float, tokens: int) -> float:
    """Inter-token latency of one request: the same definition on both paths."""
    return (last - first) / max(1, tokens - 1)


async def run_level(concurrency: int, prompts: list[list[int]], one) -> Level:
    """`len(prompts)` requests, at most `concurrency` in flight."""
    semaphore = asyncio.Semaphore(concurrency)

    async def limited(i: int, ids: list[int]) -> Sample:
        async with semaphore:
            return await one(i, ids)

    start = time.perf_counter()
    samples = await asyncio.gather(*(limited(i, ids) for i, ids in enumerate(prompts)))
    return Level(concurrency, list(samples), time.perf_counter() - start)


def report(direct: dict[int, Level], served: dict[int, Level]) -> None:
    header = (
        f"{'conc':>4} {'path':<7} {'reqs':>4} {'TTFT p50':>9} {'TTFT p99':>9} "
        f"{'ITL p50':>8} {'ITL p99':>8} {'tok/s':>7}"
    )
    print(header)
    print("-" * len(header))
    for concurrency in direct:
        for name, level in (("direct", direct[concurrency]), ("served", served[concurrency])):
            print(
                f"{concurrency:>4} {name:<7} {len(level.samples):>4} "
                f"{level.ttft(50) * 1e3:>7.1f}ms {level.ttft(99) * 1e3:>7.1f}ms "
                f"{level.itl(50) * 1e3:>6.1f}ms {level.itl(99) * 1e3:>6.1f}ms "
                f"{level.tokens_per_s:>7.1f}"
            )
    print("\nserving overhead (served / direct; 1.00 = free):")
    for concurrency in direct:
        d, s = direct[concurrency], served[concurrency]
        print(
            f"  c={concurrency:<3} TTFT p50 x{s.ttft(50) / d.ttft(50):.2f}  "
            f"ITL p50 x{s.itl(50) / d.itl(50):.2f}  "
            f"throughput x{s.tokens_per_s / d.tokens_per_s:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "local-agg.yaml"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=0, help="per level; default max(4, c)")
    args = parser.parse_args()

    run_dir = tempfile.mkdtemp(prefix="hpcserve-bench-")
    config = load_config(
        args.config,
        [
            "frontend.port=0",
            f"run_dir={run_dir}",
            f"engine.max_num_seqs={max(64, *args.concurrency)}",
        ],
    )
    from hpcserve.model_prepare import prepare_default_model

    model_dir = config.model.resolved_path() if config.model.path else prepare_default_model()
    workload = []
    for concurrency in args.concurrency:
        count = args.requests or max(4, concurrency)
        prompts = make_prompts(model_dir, count, args.prompt_tokens, f"c{concurrency}")
        workload.append((concurrency, prompts, args.output_tokens))

    t0 = time.perf_counter()
    direct = asyncio.run(run_direct(config, model_dir, workload))
    served = asyncio.run(run_served(config, workload))
    print(
        f"\nbench_serving: prompt {args.prompt_tokens} tokens, output {args.output_tokens} "
        f"tokens (ignore_eos, greedy), {time.perf_counter() - t0:.0f} s in all\n"
    )
    report(direct, served)


if __name__ == "__main__":
    main()
