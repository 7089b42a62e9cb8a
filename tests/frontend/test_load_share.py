"""The load-sharing protocol of several frontend processes (`frontend.load_share`).

Units for `PeerLoads` (ordering, goodbye, expiry, malformed input), then two `LoadShare`s
over the session's real nats-server, as two frontend processes would use it.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from worker_cards import worker_card

from contract.bus import connect, frontend_load_subject, load_metrics_subject
from contract.config import LOAD_READING_ROUTERS
from contract.discovery import WorkerCard
from contract.messages import LoadMetrics
from contract.plan import FRONTEND_PROCESS_ENV
from frontend import load_share
from frontend.load_share import LoadShare, PeerLoads, encode_load
from frontend.router import LeastLoadedRouter, LoadTracker, make_router


def card(worker_id: str) -> WorkerCard:
    return worker_card(worker_id)


def test_peer_requests_are_summed_and_blocks_are_the_largest_peers() -> None:
    """Blocks: each process deduplicates only its own (a shared prompt in two processes'
    requests is one prompt on the worker), as the shared memory table reads them."""
    tracker = LoadTracker()
    peers = PeerLoads(tracker, own_id="me")
    assert peers.apply(encode_load("a", 1, {"w0": (2, 10), "w1": (1, 4)}), now=0.0)
    assert peers.apply(encode_load("b", 1, {"w0": (3, 6)}), now=0.0)
    assert tracker.peer_requests == {"w0": 5, "w1": 1}
    assert tracker.peer_blocks == {"w0": 10, "w1": 4}
    tracker.started("w1")
    assert tracker.requests_on("w1") == 2  # ours plus the peer's
    assert tracker.load(card("w1")) == 2 / 4


def test_counts_kept_by_differences_equal_a_fresh_count() -> None:
    """Random messages from four peers (stale ones, goodbyes, silence among them): the
    running sums always equal the sum of what each live peer last said (requests), and the
    blocks the largest of it."""
    rng = random.Random(5)
    tracker = LoadTracker()
    peers = PeerLoads(tracker, own_id="me")
    seqs = dict.fromkeys("abcd", 0)
    expired = 0
    for step in range(2000):
        peer = rng.choice("abcd")
        seqs[peer] += 1
        seq = seqs[peer] - (3 if rng.random() < 0.1 else 0)  # now and then a stale one
        workers = {f"w{i}": (rng.randrange(4), rng.randrange(20))
                   for i in rng.sample(range(6), rng.randrange(4))}  # fmt: skip
        peers.apply(encode_load(peer, seq, workers, bye=rng.random() < 0.05), now=step * 0.01)
        if step % 50 == 49:  # those not heard in the last two steps go
            before = len(peers.peers)
            peers.expire(step * 0.01 + load_share.EXPIRE_S - 0.015)
            expired += before - len(peers.peers)
        requests: dict[str, int] = {}
        blocks: dict[str, int] = {}
        for said in peers.peers.values():
            for worker_id, (count, nblocks) in said.workers.items():
                requests[worker_id] = requests.get(worker_id, 0) + count
                blocks[worker_id] = max(blocks.get(worker_id, 0), nblocks)
        assert tracker.peer_requests == {w: n for w, n in requests.items() if n}
        assert tracker.peer_blocks == {w: n for w, n in blocks.items() if n}
    assert expired


def test_messages_are_absolute_and_ordered() -> None:
    tracker = LoadTracker()
    peers = PeerLoads(tracker, own_id="me")
    peers.apply(encode_load("a", 5, {"w0": (4, 0)}), now=0.0)
    assert not peers.apply(encode_load("a", 4, {"w0": (9, 0)}), now=0.0)  # late: ignored
    assert tracker.peer_requests == {"w0": 4}
    peers.apply(encode_load("a", 6, {}), now=0.0)  # all finished: the worker's count goes
    assert tracker.peer_requests == {}
    assert not peers.apply(encode_load("me", 9, {"w0": (7, 0)}), now=0.0)  # our own echo
    assert tracker.peer_requests == {}


def test_goodbye_and_silence_drop_a_peer() -> None:
    tracker = LoadTracker()
    peers = PeerLoads(tracker, own_id="me")
    peers.apply(encode_load("a", 1, {"w0": (1, 1)}), now=0.0)
    peers.apply(encode_load("b", 1, {"w0": (2, 2)}), now=0.0)
    peers.apply(encode_load("a", 2, {}, bye=True), now=0.0)
    assert tracker.peer_requests == {"w0": 2}
    peers.expire(now=load_share.EXPIRE_S / 2)
    assert tracker.peer_requests == {"w0": 2}
    peers.expire(now=load_share.EXPIRE_S + 0.1)  # b crashed: its requests died with it
    assert tracker.peer_requests == {} and peers.peers == {}


@pytest.mark.parametrize(
    "data", [b"not json", b'{"id": "a"}', b'{"id": "a", "seq": 1, "workers": {"w": [1]}}']
)
def test_malformed_messages_are_ignored(data: bytes) -> None:
    tracker = LoadTracker()
    peers = PeerLoads(tracker, own_id="me")
    assert not peers.apply(data, now=0.0)
    assert tracker.peer_requests == {}


async def _until(condition, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def test_two_processes_see_each_others_requests_over_nats(nats_url: str) -> None:
    async def run() -> None:
        trackers = [LoadTracker(), LoadTracker()]
        blocks = [{"w0": 12}, {"w1": 3}]
        shares = [
            LoadShare(nats_url, "ls-test", trackers[i], blocks[i].get, frontend_id=f"p{i}")
            for i in range(2)
        ]
        for share in shares:
            await share.start()
        try:
            # process 0 routes two requests to w0, process 1 one to w1
            trackers[0].started("w0")
            trackers[0].started("w0")
            trackers[1].started("w1")
            await _until(lambda: trackers[1].peer_requests == {"w0": 2})
            await _until(lambda: trackers[0].peer_requests == {"w1": 1})
            assert trackers[1].peer_blocks == {"w0": 12} and trackers[0].peer_blocks == {"w1": 3}
            # each one's least-loaded choice now avoids the worker the other one loaded
            cards = [card("w0"), card("w1"), card("w2")]
            assert trackers[1].requests_on("w0") == 2 and trackers[0].requests_on("w1") == 1
            assert LeastLoadedRouter(trackers[1]).choose(cards, None).worker_id == "w2"
            trackers[0].finished("w0")
            await _until(lambda: trackers[1].peer_requests == {"w0": 1})
        finally:
            await shares[0].stop()
        await _until(lambda: trackers[1].peer_requests == {})  # its goodbye
        await shares[1].stop()

    asyncio.run(run())


class _UnreadTracker(LoadTracker):
    """A tracker whose load must not be read."""

    def load(self, card: WorkerCard) -> float:
        raise AssertionError("read the load")


@pytest.mark.parametrize("mode", ["round_robin", "random", "least_loaded"])
def test_load_reading_routers_are_the_ones_that_read_the_tracker(mode: str) -> None:
    router = make_router(mode, _UnreadTracker())
    cards = [card(f"w{i}") for i in range(3)]
    reads = False
    try:
        router.choose(cards, None)
    except AssertionError:
        reads = True
    assert reads is (mode in LOAD_READING_ROUTERS)


async def test_load_blind_router_processes_neither_share_nor_parse_load(
    make_frontend, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two frontend processes (`frontend.workers: 2`): with least_loaded each applies the
    other's counts and the workers' load reports; with round robin, which reads neither,
    a process subscribes to neither (their parsing grew with the deployment's rate)."""
    monkeypatch.setenv(FRONTEND_PROCESS_ENV, "0/2")
    blind = await make_frontend(router="round_robin")
    reading = await make_frontend(router="least_loaded")
    blind_state, reading_state = blind.app.state.frontend, reading.app.state.frontend
    assert blind_state.load_share is None and reading_state.load_share is not None
    nc = await connect(nats_url, "test-peer")
    try:
        for harness in (blind, reading):
            name = harness.config.name
            peer = encode_load("peer-process", 1, {"w0": (3, 0)})
            await nc.publish(frontend_load_subject(name), peer)
            report = LoadMetrics(worker_id="w0", active_sequences=5, waiting_sequences=1)
            await nc.publish(load_metrics_subject(name), report.model_dump_json().encode())
        await nc.flush()
        tracker = reading_state.tracker
        await _until(lambda: tracker.peer_requests == {"w0": 3} and "w0" in tracker.metrics)
        # the same messages went to the round-robin process first, on the same connection
        assert blind_state.tracker.peer_requests == {}
        assert blind_state.tracker.metrics == {}
    finally:
        await nc.close()
