"""CPU a reply message costs the frontend process to receive, through a real nats-server:
replies taken in nats-py's read loop (`frontend/nats_read_loop.py`) against nats-py's own path
(a `Msg`, its subscription's queue and task, then the callback), alternated round by round.

A child process plays the worker: it listens on the card's subject (so no request meets "no
responders") and, once the frontend's streams are open, publishes the timed replies, half of
them one request's chunk on its own subject, half a worker step's batch of `--batch` chunks on
`<inbox>.batch`. This process counts its CPU from the first reply to the last one taken off
the streams' queues: the read, the hand-over, the parse and the queueing. Prints each round,
then `reply_delivery read_loop_over_callback=<median ratio>`.

    python benchmarks/bench_reply_delivery.py [--rounds 8] [--messages 4000] [--batch 8]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from real_services import start_nats  # noqa: E402

import frontend.worker_client as worker_client  # noqa: E402
from contract.bus import connect  # noqa: E402
from contract.discovery import WorkerCard  # noqa: E402
from contract.messages import (  # noqa: E402
    GenerateOutput,
    GenerateRequest,
    SamplingParams,
    batch_subject,
    output_json,
)
from frontend.router import LoadTracker  # noqa: E402

STREAMS = 64  # open requests the replies are spread over


def card(round_: int) -> WorkerCard:
    subject = f"bench.reply.{round_}"
    return WorkerCard(worker_id="w0", role="agg", model="m", block_size=16, subject=subject,
                      abort_subject=f"{subject}.abort", capacity=STREAMS,
                      max_model_len=4096)  # fmt: skip


def _worker(url: str, subject: str, ready, go, replies: list[tuple[str, bytes]]) -> None:  # type: ignore[no-untyped-def]
    """The child: listen on `subject`, say so, then publish `replies` when told."""

    async def run() -> None:
        nc = await connect(url, "bench-reply-worker")
        await nc.subscribe(subject, cb=_ignore)
        await nc.flush()
        ready.set()
        await asyncio.get_running_loop().run_in_executor(None, go.wait)
        for to, data in replies:
            await nc.publish(to, data)
        await nc.flush()
        await nc.close()

    asyncio.run(run())


async def _ignore(_msg) -> None:  # type: ignore[no-untyped-def]
    return None


def replies_for(inbox: str, ids: list[str], messages: int, batch: int) -> list[tuple[str, bytes]]:
    """`messages` replies: single chunks to `<inbox>.<id>`, and steps' batches to the batch
    subject, in turn."""
    out: list[tuple[str, bytes]] = []
    to_batch = batch_subject(f"{inbox}.{ids[0]}")
    for k in range(messages):
        if k % 2 == 0:
            rid = ids[k % len(ids)]
            chunk = GenerateOutput(request_id=rid, token_ids=[k % 1000])
            out.append((f"{inbox}.{rid}", output_json(chunk)))
        else:
            step = [output_json(GenerateOutput(request_id=ids[(k + j) % len(ids)],
                                               token_ids=[j]))
                    for j in range(batch)]  # fmt: skip
            out.append((to_batch, b"[" + b",".join(step) + b"]"))
    return out


async def one_round(url: str, round_: int, mode: str, messages: int, batch: int) -> float:
    """CPU µs a reply message in this process, replies taken `mode`'s way."""
    hook = worker_client.read_loop_hook
    if mode == "callback":
        worker_client.read_loop_hook = lambda _nc: False  # type: ignore[assignment]
    try:
        client = worker_client.WorkerClient(url, f"bench{round_}", LoadTracker(),
                                            load_metrics=False)  # fmt: skip
        await client.start()
    finally:
        worker_client.read_loop_hook = hook
    target = card(round_)
    context = multiprocessing.get_context("spawn")
    ready, go = context.Event(), context.Event()
    ids = [f"{round_:02x}{k:04x}" for k in range(STREAMS)]
    expected = sum(1 if k % 2 == 0 else batch for k in range(messages))
    replies = replies_for(client._prefix, ids, messages, batch)
    child = context.Process(target=_worker, args=(url, target.subject, ready, go, replies))
    child.start()
    try:
        while not ready.is_set():
            await asyncio.sleep(0.01)
        streams = [await client.open(target, GenerateRequest(
            request_id=rid, token_ids=[1, 2, 3], sampling=SamplingParams(max_tokens=8)))
            for rid in ids]  # fmt: skip
        taken = 0
        gc.collect()  # the previous round's garbage is not this one's
        cpu0 = time.process_time()
        go.set()
        deadline = time.monotonic() + 120
        while taken < expected:
            for stream in streams:
                while not stream.queue.empty():
                    stream.queue.get_nowait()
                    taken += 1
            if time.monotonic() > deadline:
                raise RuntimeError(f"{mode}: {taken} of {expected} chunks in 120 s")
            await asyncio.sleep(0.001)
        cpu = time.process_time() - cpu0
        for stream in streams:
            stream.finished = True  # no abort to send
            stream.close()
    finally:
        child.join(30)
        await client.stop()
    return cpu / messages * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=8, help="chunks in a step's batch")
    args = parser.parse_args()
    logging.getLogger("frontend.worker_client").setLevel(logging.ERROR)  # callback's warning
    cpu: dict[str, list[float]] = {"read_loop": [], "callback": []}
    with tempfile.TemporaryDirectory(prefix="bench-reply-") as tmp:
        nats_server, url = start_nats(Path(tmp))
        try:
            for r in range(args.rounds):
                order = ["read_loop", "callback"] if r % 2 == 0 else ["callback", "read_loop"]
                for mode in order:
                    cpu[mode].append(await one_round(url, r, mode, args.messages, args.batch))
                print(f"round {r}: read loop {cpu['read_loop'][-1]:.1f} µs a reply message, "
                      f"callback {cpu['callback'][-1]:.1f} µs")  # fmt: skip
        finally:
            nats_server.stop()
    ratios = [a / b for a, b in zip(cpu["read_loop"], cpu["callback"], strict=True)]
    print("per round read loop / callback: " + " ".join(f"x{x:.2f}" for x in ratios))
    print(f"reply_delivery read_loop_us={statistics.median(cpu['read_loop']):.1f} "
          f"callback_us={statistics.median(cpu['callback']):.1f} "
          f"read_loop_over_callback={statistics.median(ratios):.2f}")


if __name__ == "__main__":
    asyncio.run(main())
