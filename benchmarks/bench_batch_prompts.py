"""A batch of prompts in one /v1/completions request against the same prompts sent as
concurrent single requests: the frontend's CPU per prompt and the wall time per group.

One deployment (`hpcserve up configs/local-mocker-kv.yaml`, the launcher in this process,
simulated workers at a high `engine.mocker.speedup`, one frontend process), one aiohttp
client in this process. A round runs both modes, in alternating order from round to round:

- batch (A): `--groups` requests, one after another, each `"prompt": [P1, ..., P8]`;
- singles (B): `--groups` times, the same 8 prompts as 8 requests at once (gathered).

Every group has fresh prompts (a number in the text), so neither mode finds the frontend's
tokenizer cache or the workers' prefix cache warmer than the other. Per mode and round it
prints the frontend process's user+system CPU (/proc) per prompt, the group's p50 wall time,
and the ratio singles / batch of both, with the load average at the round's end; the last
line: `batch_prompts cpu_per_prompt_ratio=<median singles/batch> wall_ratio=<median>`.

    python benchmarks/bench_batch_prompts.py [--rounds 6] [--groups 150] [--prompts 8] \
        [--max-tokens 16] [--stream] [--speedup 1000] [--sim-workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_frontend import cpu_seconds
from contract.config import load_config
from hpcserve.launcher import start_deployment, stop_deployment

REPO = Path(__file__).resolve().parents[1]
TEXT = "Question {k}: explain in one paragraph why the sky looks blue during the day."
HEADERS = {"content-type": "application/json"}


def prompts_of(group: int, count: int) -> list[str]:
    return [TEXT.format(k=group * count + i) for i in range(count)]


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, object]) -> int:
    """One request; the choices it answered (counted, so that a short answer shows)."""
    async with session.post(url, data=orjson.dumps(body), headers=HEADERS) as response:
        data = await response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {data[:300]!r}")
    if body.get("stream"):
        if not data.rstrip().endswith(b"data: [DONE]"):
            raise RuntimeError(f"stream did not end with [DONE]: {data[-200:]!r}")
        return len({e["choices"][0]["index"] for e in _events(data) if e["choices"]})
    return len(orjson.loads(data)["choices"])


def _events(data: bytes) -> list[dict[str, object]]:
    return [
        orjson.loads(block[6:]) for block in data.split(b"\n\n") if block.startswith(b"data: {")
    ]


async def run_mode(
    session: aiohttp.ClientSession,
    url: str,
    model: str,
    batch: bool,
    first_group: int,
    args: argparse.Namespace,
) -> list[float]:
    """`args.groups` groups of `args.prompts` prompts; each group's wall time."""
    base = {"model": model, "max_tokens": args.max_tokens, "ignore_eos": True,
            "stream": args.stream}  # fmt: skip
    walls = []
    for group in range(first_group, first_group + args.groups):
        prompts = prompts_of(group, args.prompts)
        t0 = time.perf_counter()
        if batch:
            answered = await post(session, url, {**base, "prompt": prompts})
        else:
            counts = await asyncio.gather(
                *(post(session, url, {**base, "prompt": p}) for p in prompts)
            )
            answered = sum(counts)
        walls.append(time.perf_counter() - t0)
        if answered != args.prompts:
            raise RuntimeError(f"{answered} choices for {args.prompts} prompts")
    return walls


async def bench(args: argparse.Namespace) -> None:
    config = load_config(
        REPO / "configs" / "local-mocker-kv.yaml",
        [
            "frontend.port=0",
            "frontend.workers=1",
            f"engine.mocker.speedup={args.speedup}",
            f"workers.0.count={args.sim_workers}",
            f"workers.0.per_process={args.sim_workers}",
        ],
    )
    deployment = await asyncio.to_thread(start_deployment, config, lambda _m: None)
    try:
        pids = {planned.name: managed.pid for planned, managed in deployment.processes}
        frontend = [pid for name, pid in pids.items() if name.startswith("frontend")]
        url = deployment.url + "/completions"
        model = deployment.config.model.served_model_name()
        connector = aiohttp.TCPConnector(limit=args.prompts)
        ratios_cpu: list[float] = []
        ratios_wall: list[float] = []
        group = 0
        async with aiohttp.ClientSession(connector=connector) as session:
            await run_mode(session, url, model, True, 10**6, args)  # warm-up, both paths
            await run_mode(session, url, model, False, 2 * 10**6, args)
            print(f"{args.prompts} prompts per group, {args.groups} groups per mode and round, "
                  f"max_tokens {args.max_tokens}, stream {args.stream}, "
                  f"{args.sim_workers} simulated workers, speedup {args.speedup}")  # fmt: skip
            for round_ in range(args.rounds):
                order = (True, False) if round_ % 2 == 0 else (False, True)
                cpu: dict[bool, float] = {}
                wall: dict[bool, float] = {}
                for batch in order:
                    before = cpu_seconds(frontend)
                    walls = await run_mode(session, url, model, batch, group, args)
                    group += args.groups
                    prompts = args.groups * args.prompts
                    cpu[batch] = 1e6 * (cpu_seconds(frontend) - before) / prompts
                    wall[batch] = 1e3 * statistics.median(walls)
                ratios_cpu.append(cpu[False] / cpu[True])
                ratios_wall.append(wall[False] / wall[True])
                load = Path("/proc/loadavg").read_text().split()[:3]
                print(f"round {round_} ({'batch first' if order[0] else 'singles first'}): "
                      f"frontend CPU/prompt batch {cpu[True]:.0f} us, singles "
                      f"{cpu[False]:.0f} us, ratio {ratios_cpu[-1]:.2f}; group p50 batch "
                      f"{wall[True]:.2f} ms, singles {wall[False]:.2f} ms, ratio "
                      f"{ratios_wall[-1]:.2f}; loadavg {' '.join(load)}")  # fmt: skip
    finally:
        await asyncio.to_thread(stop_deployment, deployment, lambda _m: None)
    print(f"batch_prompts cpu_per_prompt_ratio={statistics.median(ratios_cpu):.2f} "
          f"wall_ratio={statistics.median(ratios_wall):.2f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--groups", type=int, default=150)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--speedup", type=float, default=1000.0)
    parser.add_argument("--sim-workers", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
