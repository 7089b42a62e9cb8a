"""Frontend CPU per request of /v1/responses against /v1/chat/completions, same conversation.

/v1/responses is served by the chat path after a translation (`frontend.responses_api`) and
answers in its own shape (`frontend.response_objects`); with `store: true` (OpenAI's
default) it also writes the response to etcd (`frontend.response_store`). This runs a
deployment (one frontend process, one simulated mocker worker at 1000x, round robin, etcd and
nats-server: `hpcserve up`'s own start), and sends the same conversation (a system turn and a
user turn; 16 new tokens) to each endpoint in rounds that alternate their order: chat,
responses store false, responses store true, each non-streamed and streamed. Per round and
kind it prints the frontend process's CPU µs per request (/proc: user + system of its process
tree) and the ratio to chat's of the same round and streaming; the load average before and
after; the output tokens per request (the mocker may sample EOS early: equal counts show
the kinds did equal work).

    PYTHONPATH=$PWD python benchmarks/bench_responses.py [--rounds 6] [--requests 300] [-c 4]

Last line: `bench_responses ratio_nostore=<median> ratio_store=<median>
ratio_stream_nostore=<median> ratio_stream_store=<median>` (CPU per request / chat's).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_frontend import cpu_seconds
from contract.config import load_config
from hpcserve.launcher import start_deployment, stop_deployment

REPO = Path(__file__).resolve().parents[1]
SYSTEM = "You are a helpful assistant. Answer in one short sentence."
USER = "What is the capital of France, and what is it known for?"
NEW_TOKENS = 16

KINDS = ["chat", "responses", "responses_store"]


def body_of(kind: str, model: str, stream: bool) -> tuple[str, dict[str, Any]]:
    """(path, body) of one request of `kind`: the same conversation and budget."""
    if kind == "chat":
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
        body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": NEW_TOKENS,
                                "stream": stream}  # fmt: skip
        if stream:
            body["stream_options"] = {"include_usage": True}
        return "/v1/chat/completions", body
    return "/v1/responses", {
        "model": model, "instructions": SYSTEM, "input": USER, "max_output_tokens": NEW_TOKENS,
        "stream": stream, "store": kind == "responses_store",
    }  # fmt: skip


async def send(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], stream: bool
) -> int:
    """One request; the output tokens it reports (chat's usage, or the response's)."""
    async with session.post(url, json=body) as response:
        assert response.status == 200, await response.text()
        if not stream:
            data = await response.json()
            usage = data["usage"]
            return int(usage.get("completion_tokens", usage.get("output_tokens", 0)))
        text = await response.text()
    marker = '"completion_tokens":' if "chat" in url else '"output_tokens":'
    tail = text.rsplit(marker, 1)[1]
    return int(tail.split(",", 1)[0].split("}", 1)[0])


async def run_kind(
    session: aiohttp.ClientSession, base: str, kind: str, model: str, stream: bool,
    requests: int, concurrency: int, frontend: int,
) -> tuple[float, float]:  # fmt: skip
    """(frontend CPU µs per request, output tokens per request) of `requests` requests."""
    path, body = body_of(kind, model, stream)
    url = base + path
    tokens: list[int] = []
    left = iter(range(requests))

    async def lane() -> None:
        for _ in left:
            tokens.append(await send(session, url, body, stream))

    before = cpu_seconds([frontend])
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    after = cpu_seconds([frontend])
    return (after - before) / requests * 1e6, statistics.mean(tokens)


@contextlib.asynccontextmanager
async def mocker_deployment(
    frontends: int, speedup: int
) -> AsyncIterator[tuple[list[int], str, str]]:
    """A deployment of `frontends` frontend processes and one mocker worker at `speedup`
    (round robin; etcd and nats-server started as `hpcserve up` starts them): the frontend
    processes' pids, the served model's name, the base URL. Stopped on the way out."""
    config = load_config(REPO / "configs" / "local-mocker-kv.yaml", [
        "workers.0.count=1", "workers.0.per_process=1", "frontend.router=round_robin",
        "frontend.port=0", f"frontend.workers={frontends}", f"engine.mocker.speedup={speedup}",
    ])  # fmt: skip
    deployment = await asyncio.to_thread(start_deployment, config, lambda _m: None)
    try:
        pids = {planned.name: managed.pid for planned, managed in deployment.processes}
        model = deployment.config.model.served_name or Path(str(deployment.config.model.path)).name
        yield ([pid for name, pid in pids.items() if name.startswith("frontend")], model,
               deployment.url.removesuffix("/v1"))  # fmt: skip
    finally:
        await asyncio.to_thread(stop_deployment, deployment, lambda _m: None)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=300, help="per round and kind")
    parser.add_argument("-c", "--concurrency", type=int, default=4)
    args = parser.parse_args()
    async with mocker_deployment(1, 1000) as (frontends, model, base):
        (frontend,) = frontends
        ratios: dict[str, list[float]] = {}
        async with aiohttp.ClientSession() as session:
            for stream in (False, True):  # warm-up: templates, tokenizer, etcd client
                for kind in KINDS:
                    await run_kind(session, base, kind, model, stream, 50, args.concurrency,
                                   frontend)  # fmt: skip
            print(f"loadavg before: {Path('/proc/loadavg').read_text().strip()}")
            print("round  stream  kind              cpu_us/req  tokens/req  ratio_to_chat")
            for round_index in range(args.rounds):
                for stream in (False, True):
                    order = KINDS if round_index % 2 == 0 else KINDS[::-1]
                    cpu: dict[str, tuple[float, float]] = {}
                    for kind in order:
                        cpu[kind] = await run_kind(
                            session, base, kind, model, stream, args.requests,
                            args.concurrency, frontend)  # fmt: skip
                    for kind in KINDS:
                        us, tokens = cpu[kind]
                        ratio = us / cpu["chat"][0]
                        if kind != "chat":
                            key = ("stream_" if stream else "") + (
                                "store" if kind == "responses_store" else "nostore")  # fmt: skip
                            ratios.setdefault(key, []).append(ratio)
                        print(f"{round_index:5d}  {stream!s:6s}  {kind:16s}  {us:10.1f}  "
                              f"{tokens:10.1f}  {ratio:13.3f}")  # fmt: skip
            print(f"loadavg after: {Path('/proc/loadavg').read_text().strip()}")
    medians = {key: statistics.median(values) for key, values in ratios.items()}
    print("bench_responses " + " ".join(
        f"ratio_{key}={value:.3f}" for key, value in sorted(medians.items())))  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
