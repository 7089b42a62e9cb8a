"""Whether a worker's KV events delay the reply they arrive with, in a frontend process at c=1.

A worker's publisher sends a pass's replies, then the pass's KV event batch (a new prompt:
`--blocks` stored hashes and as many evicted). They reach the frontend on two NATS
connections (replies: the worker client's; events: the KV index feed's), often in one read.
Here a child process plays the worker (a reply, then a batch, for each request) and this
process the frontend: a handler publishes a request, waits for its reply (resolved by the
reply subscription's callback, as `WorkerClient._on_reply` does) and notes whether a KV batch
was applied between the reply's arrival (nats-py's read loop parsing it: `_process_msg`,
wrapped here) and the handler's resuming, and how long that took.

This tree's `KvIndexFeed` and `--baseline DIR`'s (e.g. main's `frontend/kv_index.py`, run with
this tree's `contract`, so both parse the same batches) are alternated in rounds, a fresh
feed and index each round. Both on uvloop, as the frontend runs.

    python benchmarks/bench_kv_reply_order.py --baseline /work/main [--rounds 8] [--requests 400]

Last line: `kv_reply_order this_between=<share> this_hop_us=<p50> baseline_between=...
baseline_hop_us=... rtt_ratio=<median of rounds' this/baseline round-trip p50>`.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench_kv_intake import load_module

from contract.bus import connect, kv_events_subject
from contract.messages import KvRemoved, KvStored, kv_batch_json
from frontend import kv_index

REQUESTS = "bench.requests"
DEPLOYMENT = "bench"


def _worker(url: str, blocks: int, resident: int, same_write: bool) -> None:
    """The child: for each request a reply, then a KV batch of a new prompt's blocks (and an
    evicted one's), published as the worker's outbox does (the batch once the reply is
    written; `same_write`: in the same write, as main's worker did). A request `reset`
    starts the batches again at seq 1."""
    import uvloop

    async def run() -> None:
        nc = await connect(url, "bench-worker")
        rng = random.Random(3)
        held: list[list[int]] = []
        seq = 0
        stop = asyncio.Event()

        async def on_request(msg) -> None:  # type: ignore[no-untyped-def]
            nonlocal seq
            if msg.data == b"reset":
                seq = 0
                held.clear()
                await nc.publish(msg.reply, b"ok")
                return
            if msg.data == b"stop":
                stop.set()
                return
            await nc.publish(msg.reply, b'{"token_ids": [1, 2, 3], "finish_reason": "length"}')
            hashes = [rng.getrandbits(63) for _ in range(blocks)]
            events: list = [KvStored(parent_hash=None, block_hashes=hashes)]
            held.append(hashes)
            if len(held) > resident:
                events.append(KvRemoved(block_hashes=held.pop(0)))
            seq += 1
            if not same_write:
                await asyncio.sleep(0)  # the worker's publisher: the reply's write first
            await nc.publish(kv_events_subject(DEPLOYMENT), kv_batch_json("w0", seq, events))

        await nc.subscribe(REQUESTS, cb=on_request)
        await nc.flush()
        await stop.wait()
        await nc.drain()

    uvloop.run(run())


async def one_round(module: ModuleType, url: str, requests: int) -> dict[str, float]:
    """`requests` c=1 round trips with `module`'s feed subscribed; what each handler saw."""
    feed = module.KvIndexFeed(module.KvIndex(), nats_url=url, deployment=DEPLOYMENT)
    feed._workers = {"w0"}  # known and synced by hand: no directory here
    feed._sync["w0"] = module._WorkerSync(last_seq=0)
    applied = [0]
    handle = feed.handle_batch

    def counted(batch) -> None:  # type: ignore[no-untyped-def]
        applied[0] += 1
        handle(batch)

    feed.handle_batch = counted
    await feed.start()
    nc = await connect(url, "bench-frontend")
    loop = asyncio.get_running_loop()
    waiting: dict[str, tuple[asyncio.Future[None], list[float]]] = {}

    async def on_reply(msg) -> None:  # type: ignore[no-untyped-def]
        future, _ = waiting.pop(msg.subject)
        future.set_result(None)

    parsed = nc._process_msg  # the read loop's hand-over of each message (nats-py private)

    async def stamped(sid, subject, reply, data, headers) -> None:  # type: ignore[no-untyped-def]
        waiter = waiting.get(subject.decode())
        if waiter is not None:
            waiter[1].extend((time.perf_counter(), applied[0]))
        await parsed(sid, subject, reply, data, headers)

    nc._process_msg = stamped
    inbox = nc.new_inbox()
    await nc.subscribe(f"{inbox}.*", cb=on_reply)
    await nc.request(REQUESTS, b"reset", timeout=5)
    hops, rtts, between = [], [], 0
    for k in range(requests):
        subject = f"{inbox}.{k}"
        future, marks = loop.create_future(), []
        waiting[subject] = (future, marks)
        t0 = time.perf_counter()
        await nc.publish(REQUESTS, b"go", reply=subject)
        await future
        t1 = time.perf_counter()
        hops.append(t1 - marks[0])
        rtts.append(t1 - t0)
        between += applied[0] != marks[1]
    for _ in range(1000):  # the last batch in, then the index checked
        if feed._sync["w0"].last_seq == requests:
            break
        await asyncio.sleep(0.001)
    assert feed._sync["w0"].last_seq == requests and feed.num_gaps == 0
    await nc.close()
    await feed.stop()
    return {"between": between / requests, "hop_us": statistics.median(hops) * 1e6,
            "rtt_us": statistics.median(rtts) * 1e6}  # fmt: skip


async def main_async(args: argparse.Namespace, url: str) -> None:
    sides: dict[str, ModuleType] = {"this": kv_index}
    if args.baseline:
        sides["baseline"] = load_module(
            Path(args.baseline) / "frontend" / "kv_index.py", "baseline_kv_index"
        )
    seen: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    ratios = []
    nc = await connect(url, "bench-ready")
    deadline = time.monotonic() + 30
    while True:  # the child's subscription ready
        try:
            await nc.request(REQUESTS, b"reset", timeout=1)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.01)
    await nc.close()
    await one_round(kv_index, url, 50)  # warm-up
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        got = {name: await one_round(sides[name], url, args.requests) for name in order}
        line = ", ".join(
            f"{n}: applied between {got[n]['between']:.2f}, reply->handler p50 "
            f"{got[n]['hop_us']:.1f} µs, round trip p50 {got[n]['rtt_us']:.0f} µs"
            for n in sides
        )
        if "baseline" in got:
            ratios.append(got["this"]["rtt_us"] / got["baseline"]["rtt_us"])
            line += f"; rtt this/baseline x{ratios[-1]:.3f}"
        print(f"round {r}: {line}; load {os.getloadavg()[0]:.2f}", flush=True)
        for name in sides:
            seen[name].append(got[name])
    last = "kv_reply_order"
    for name in sides:
        between = statistics.mean(s["between"] for s in seen[name])
        hop = statistics.median(s["hop_us"] for s in seen[name])
        last += f" {name}_between={between:.3f} {name}_hop_us={hop:.1f}"
    if ratios:
        last += f" rtt_ratio={statistics.median(ratios):.3f}"
    print(last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="another tree's frontend/kv_index.py, alternated")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--requests", type=int, default=400, help="c=1 requests a round")
    parser.add_argument("--blocks", type=int, default=37, help="a new prompt's full blocks")
    parser.add_argument("--resident", type=int, default=200, help="prompts the worker keeps")
    parser.add_argument(
        "--same-write", action="store_true",
        help="the worker writes each reply and its batch in one write (main's worker)",
    )  # fmt: skip
    args = parser.parse_args()
    import uvloop
    from real_services import start_nats

    with tempfile.TemporaryDirectory(prefix="bench-kv-reply-order-") as tmp:
        (Path(tmp) / "logs").mkdir()
        nats_server, url = start_nats(Path(tmp))
        worker_args = (url, args.blocks, args.resident, args.same_write)
        child = multiprocessing.Process(target=_worker, args=worker_args)
        child.start()
        try:
            uvloop.run(main_async(args, url))
        finally:

            async def stop() -> None:
                nc = await connect(url, "bench-stop")
                await nc.publish(REQUESTS, b"stop")
                await nc.flush()
                await nc.close()

            asyncio.run(stop())
            child.join(10)
            nats_server.stop()


if __name__ == "__main__":
    main()
