"""Background responses (`background: true` on /v1/responses) against foreground ones:
frontend CPU per request, the POST's answer time, and a cancel's time.

A background response costs the frontend more than a foreground one of the same output: a
record written at once (queued), again when the worker began (in_progress), its events kept
in the run's list, and a task of its own. This runs a deployment (two frontend processes
sharing the port, one simulated mocker worker, round robin, etcd and nats-server:
`hpcserve up`'s own start) and measures, in rounds that alternate the kinds' order:

- CPU: the same conversation (16 new tokens) streamed, stored, foreground and background
  (a background stream is the run's whole cost: its POST follows the run to its end); the
  frontend processes' CPU µs per request (/proc: user + system of their process trees).
- Answer time at c=1: a foreground request's (the whole answer) and a background POST's
  (the queued response: the record's etcd write; the generation goes on after).
- Cancel time: a background request of 2000 tokens, cancelled once in_progress: the cancel's
  answer time (the run stopped, the worker's request aborted, the record written). With two
  processes a cancel lands on the owner or on the other one (then one NATS request-reply
  to the owner more) as the kernel spreads connections.

    PYTHONPATH=$PWD python benchmarks/bench_background.py [--rounds 3] [--requests 100]

Last line: `bench_background cpu_ratio=<median> post_ms=<median> foreground_ms=<median>
cancel_ms=<median>`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_frontend import cpu_seconds
from benchmarks.bench_responses import mocker_deployment

NEW_TOKENS = 16


def body_of(model: str, background: bool, **more: Any) -> dict[str, Any]:
    return {"model": model, "input": "What is the capital of France?", "temperature": 0,
            "max_output_tokens": NEW_TOKENS, "background": background, **more}  # fmt: skip


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> str:
    async with session.post(url, json=body) as response:
        text = await response.text()
        assert response.status == 200, text
        return text


async def cpu_per_request(
    session: aiohttp.ClientSession, base: str, body: dict[str, Any], requests: int,
    frontends: list[int],
) -> float:  # fmt: skip
    """Frontend CPU µs per request of `requests` streamed requests of `body`, c=4."""
    left = iter(range(requests))

    async def lane() -> None:
        for _ in left:
            text = await post(session, base + "/v1/responses", body)
            assert "response.completed" in text or "response.incomplete" in text, text[-300:]

    before = cpu_seconds(frontends)
    await asyncio.gather(*(lane() for _ in range(4)))
    return (cpu_seconds(frontends) - before) / requests * 1e6


async def answer_ms(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> float:
    started = time.perf_counter()
    await post(session, url, body)
    return (time.perf_counter() - started) * 1e3


async def cancel_ms(session: aiohttp.ClientSession, base: str, model: str) -> float:
    """A long background response cancelled once in_progress: the cancel's answer time."""
    body = body_of(model, True, max_output_tokens=2000)
    async with session.post(base + "/v1/responses", json=body) as made:
        url = f"{base}/v1/responses/{(await made.json())['id']}"
    status = "queued"
    while status != "in_progress":
        await asyncio.sleep(0.005)
        async with session.get(url) as got:
            status = (await got.json())["status"]
    started = time.perf_counter()
    async with session.post(url + "/cancel") as answer:
        status = (await answer.json())["status"]
    took = (time.perf_counter() - started) * 1e3
    assert status == "cancelled", status
    return took


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=100, help="per round and kind (CPU)")
    parser.add_argument("--timed", type=int, default=30, help="per round: answers and cancels")
    args = parser.parse_args()
    async with mocker_deployment(2, 100) as (frontends, model, base):
        url = base + "/v1/responses"
        kinds = {"foreground": body_of(model, False, stream=True),
                 "background": body_of(model, True, stream=True)}  # fmt: skip
        ratios: list[float] = []
        posts: list[float] = []
        wholes: list[float] = []
        cancels: list[float] = []
        async with aiohttp.ClientSession() as session:
            for body in kinds.values():  # warm-up: templates, tokenizer, etcd clients
                await cpu_per_request(session, base, body, 40, frontends)
            print(f"loadavg before: {Path('/proc/loadavg').read_text().strip()}")
            print("round  fg_cpu_us  bg_cpu_us  ratio  fg_answer_ms  bg_post_ms  cancel_ms")
            for round_index in range(args.rounds):
                order = list(kinds) if round_index % 2 == 0 else list(kinds)[::-1]
                cpu = {kind: await cpu_per_request(session, base, kinds[kind], args.requests,
                                                   frontends) for kind in order}  # fmt: skip
                ratios.append(cpu["background"] / cpu["foreground"])
                whole = [await answer_ms(session, url, body_of(model, False))
                         for _ in range(args.timed)]  # fmt: skip
                queued = [await answer_ms(session, url, body_of(model, True))
                          for _ in range(args.timed)]  # fmt: skip
                cancelled = [await cancel_ms(session, base, model) for _ in range(args.timed)]
                wholes += whole
                posts += queued
                cancels += cancelled
                print(f"{round_index:5d}  {cpu['foreground']:9.1f}  {cpu['background']:9.1f}  "
                      f"{ratios[-1]:5.2f}  {statistics.median(whole):12.2f}  "
                      f"{statistics.median(queued):10.2f}  "
                      f"{statistics.median(cancelled):9.2f}")  # fmt: skip
            print(f"loadavg after: {Path('/proc/loadavg').read_text().strip()}")
    figures = {"cpu_ratio": ratios, "post_ms": posts, "foreground_ms": wholes,
               "cancel_ms": cancels}  # fmt: skip
    medians = (f"{name}={statistics.median(values):.3f}" for name, values in figures.items())
    print("bench_background " + " ".join(medians))


if __name__ == "__main__":
    asyncio.run(main())
