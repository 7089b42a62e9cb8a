"""Messages taken from nats-py's read loop (frontend/nats_read_loop.py), over a real
nats-server: the taken subscription's messages reach the taker with their subject, payload and
headers, the connection's other subscriptions reach their callbacks as before; the worker
client's replies taken so (one a request, a worker step's batch, NATS's "no responders")
reach their streams."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import orjson
import pytest
from worker_cards import worker_card

from contract.bus import connect
from contract.messages import GenerateOutput, GenerateRequest, SamplingParams, batch_subject
from frontend.nats_read_loop import no_responders, read_loop_hook, take_in_read_loop
from frontend.router import LoadTracker
from frontend.worker_client import NotListening, WorkerClient


async def until(done: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not done():
            await asyncio.sleep(0.01)


async def test_one_subscription_taken_the_others_by_callback(nats_url: str) -> None:
    nc = await connect(nats_url, "read-loop-test")
    try:
        assert read_loop_hook(nc)
        taken: list[tuple[bytes, bytes, bytes | None]] = []
        by_callback: list[tuple[str, bytes]] = []
        sub = await nc.subscribe("rl.taken.>")
        take_in_read_loop(nc, sub._id, lambda *message: taken.append(message))

        async def callback(msg) -> None:  # type: ignore[no-untyped-def]
            by_callback.append((msg.subject, msg.data))

        await nc.subscribe("rl.other", cb=callback)
        await nc.publish("rl.taken.a", b"one")
        await nc.publish("rl.taken.b", b"two", headers={"Trace": "7"})
        await nc.publish("rl.other", b"three")
        await until(lambda: len(taken) == 2 and len(by_callback) == 1)
        assert [(subject, data) for subject, data, _ in taken] == [
            (b"rl.taken.a", b"one"), (b"rl.taken.b", b"two"),
        ]  # fmt: skip
        assert not taken[0][2] and b"Trace: 7" in (taken[1][2] or b"")
        assert not no_responders(taken[1][2])
        assert by_callback == [("rl.other", b"three")]
    finally:
        await nc.close()


def request(request_id: str) -> GenerateRequest:
    return GenerateRequest(request_id=request_id, token_ids=[1, 2, 3],
                           sampling=SamplingParams(max_tokens=2))  # fmt: skip


@pytest.mark.parametrize("in_read_loop", [True, False], ids=["read_loop", "callback"])
async def test_worker_client_replies_reach_their_streams(
    nats_url: str, in_read_loop: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reply of its own and a step's batch of two requests, from a worker on another
    connection; then a request to a subject nobody listens on: NotListening at once. Taken
    from the read loop, and by the subscription's callback (a nats-py without the hook)."""
    if not in_read_loop:
        monkeypatch.setattr("frontend.worker_client.read_loop_hook", lambda _nc: False)
    client = WorkerClient(nats_url, "read-loop-deploy", LoadTracker(), load_metrics=False)
    await client.start()
    worker = await connect(nats_url, "read-loop-worker")
    card = worker_card("w0", subject="rl.w0.gen", abort_subject="rl.w0.abort")
    asked: list[tuple[str, str]] = []

    async def on_request(msg) -> None:  # type: ignore[no-untyped-def]
        asked.append((GenerateRequest.model_validate_json(msg.data).request_id, msg.reply))

    try:
        await worker.subscribe(card.subject, cb=on_request)
        await worker.flush()
        loop = asyncio.get_running_loop()
        streams = [await client.open(card, request(rid)) for rid in ("aa01", "bb02")]
        await until(lambda: len(asked) == 2)
        first = GenerateOutput(request_id="aa01", token_ids=[7])
        await worker.publish(asked[0][1], first.model_dump_json().encode())
        step = [GenerateOutput(request_id="aa01", token_ids=[8], finish_reason="length"),
                GenerateOutput(request_id="bb02", token_ids=[9], finish_reason="length")]
        await worker.publish(batch_subject(asked[0][1]),
                             orjson.dumps([o.model_dump(mode="json") for o in step]))
        await worker.flush()
        got = [await streams[0].next(loop.time() + 5) for _ in range(2)]
        assert [o.token_ids for o in got] == [[7], [8]] and got[1].finish_reason == "length"
        assert (await streams[1].next(loop.time() + 5)).token_ids == [9]
        for stream in streams:
            stream.close()

        nobody = worker_card("w9", subject="rl.w9.gen", abort_subject="rl.w9.abort")
        lost = await client.open(nobody, request("cc03"))
        with pytest.raises(NotListening):
            await lost.next(loop.time() + 5)
        lost.close()
    finally:
        await worker.close()
        await client.stop()
