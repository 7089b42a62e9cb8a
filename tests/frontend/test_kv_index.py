"""KvIndex and KvIndexFeed: events in → overlaps out; removal; worker loss; seq gaps."""

from __future__ import annotations

import asyncio
import random

import pytest
from worker_cards import worker_card

from contract.block_hash import block_hashes
from contract.discovery import WorkerCard
from contract.messages import KvEventBatch, KvRemoved, KvSnapshot, KvStored
from frontend.kv_index import KvIndex, KvIndexFeed

PROMPT = list(range(100, 164))  # 4 blocks of 16
H = block_hashes(PROMPT, 16)


def stored(hashes: list[int], parent: int | None = None) -> KvStored:
    return KvStored(parent_hash=parent, block_hashes=list(hashes))


def batch(worker: str, seq: int, *events) -> KvEventBatch:
    return KvEventBatch(worker_id=worker, seq=seq, events=list(events))


def card(worker_id: str, block_size: int = 16) -> WorkerCard:
    return worker_card(
        worker_id, block_size=block_size, subject="s", abort_subject="a", capacity=8,
        simulated=True,
    )  # fmt: skip


def test_overlap_per_worker_from_events() -> None:
    index = KvIndex()
    index.apply("a", [stored(H[:4])])
    index.apply("b", [stored(H[:2])])
    assert index.overlaps(H, ["a", "b", "c"]) == {"a": 4, "b": 2, "c": 0}


def test_prefix_stops_at_first_missing_block() -> None:
    index = KvIndex()
    index.store("a", [H[0], H[1], H[3]])  # H[2] missing: H[3] must not count
    index.store("b", [H[1], H[2]])  # no first block: nothing counts
    assert index.overlaps(H, ["a", "b"]) == {"a": 2, "b": 0}
    assert index.overlaps([], ["a"]) == {"a": 0}


def test_removed_blocks_stop_counting() -> None:
    index = KvIndex()
    index.apply("a", [stored(H)])
    index.apply("a", [KvRemoved(block_hashes=[H[1]])])
    assert index.overlaps(H, ["a"]) == {"a": 1}
    index.apply("a", [KvRemoved(block_hashes=[H[0], 12345])])
    assert index.overlaps(H, ["a"]) == {"a": 0}
    assert index.blocks_of("a") == {H[2], H[3]}


def test_drop_worker_keeps_the_others() -> None:
    index = KvIndex()
    index.store("a", H)
    index.store("b", H[:3])
    index.drop_worker("a")
    assert index.overlaps(H, ["a", "b"]) == {"a": 0, "b": 3}
    assert index.workers == ["b"]


class FakeWorkers:
    """Snapshot answers for the feed, as the workers' kv_snapshot subject would give."""

    def __init__(self) -> None:
        self.caches: dict[str, tuple[int, list[int]]] = {}
        self.asked: list[str] = []

    async def fetch(self, worker_id: str) -> KvSnapshot:
        self.asked.append(worker_id)
        await asyncio.sleep(0)
        seq, hashes = self.caches.get(worker_id, (0, []))
        return KvSnapshot(worker_id=worker_id, seq=seq, block_hashes=hashes)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_feed_applies_in_order_and_snapshots_joiners() -> None:
    workers = FakeWorkers()
    workers.caches["a"] = (3, H[:1])
    feed = KvIndexFeed(KvIndex(), workers.fetch)
    feed.on_workers_changed({"a": card("a")})
    await settle()
    assert workers.asked == ["a"] and feed.index.overlaps(H, ["a"]) == {"a": 1}
    feed.handle_batch(batch("a", 4, stored(H[1:3], H[0])))
    feed.handle_batch(batch("a", 5, KvRemoved(block_hashes=[H[2]])))
    assert feed.index.overlaps(H, ["a"]) == {"a": 2}
    assert workers.asked == ["a"] and feed.num_gaps == 0


class Received:
    """A NATS message as nats-py hands it to a subscription's callback (its `data`)."""

    def __init__(self, data: bytes) -> None:
        self.data = data


async def feed_of_worker_a() -> KvIndexFeed:
    """A feed that knows worker `a` and has synced it (an empty snapshot)."""
    feed = KvIndexFeed(KvIndex(), FakeWorkers().fetch)
    feed.on_workers_changed({"a": card("a")})
    await settle()
    return feed


async def applied_to_worker_a(feed: KvIndexFeed) -> None:
    """Let the loop turn until the feed has applied a batch of `a`'s (a few turns)."""
    for _ in range(100):
        if feed.index.blocks_of("a"):
            return
        await asyncio.sleep(0)


async def test_events_arriving_with_a_reply_wait_for_its_handler() -> None:
    """A reply and a KV batch that arrive together: nats-py's subscription tasks run in the
    same loop turn, the reply's wakes its request's handler for the next turn. The handler
    runs before the batch is applied; the batch is applied after (and stays in seq order,
    malformed ones skipped)."""
    feed = await feed_of_worker_a()
    reply: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    seen: list[int] = []

    async def handler() -> None:  # a request's handler, woken by its reply
        await reply
        seen.append(len(feed.index.blocks_of("a")))

    waiting = asyncio.create_task(handler())
    await asyncio.sleep(0)  # the handler waits for its reply
    reply.set_result(None)  # the reply's subscription task, then the events' in the same turn
    await feed._on_events(Received(batch("a", 1, stored(H[:2])).model_dump_json().encode()))
    await feed._on_events(Received(b"{not a batch"))
    await feed._on_events(Received(batch("a", 2, stored(H[2:], H[1])).model_dump_json().encode()))
    await waiting
    await applied_to_worker_a(feed)
    assert seen == [0]
    assert feed.index.overlaps(H, ["a"]) == {"a": 4} and feed.num_gaps == 0


@pytest.mark.parametrize("by_task", [False, True], ids=["reply_in_read_loop", "reply_by_task"])
async def test_events_taken_in_the_read_loop_wait_for_the_handler_too(by_task: bool) -> None:
    """The batch handed over from nats-py's read loop (`_take`, a turn before a subscription
    task would have had it) is applied after the handler its reply woke, in seq order."""
    feed = await feed_of_worker_a()
    reply: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    seen: list[int] = []

    async def handler() -> None:  # a request's handler, woken by its reply
        await reply
        seen.append(len(feed.index.blocks_of("a")))

    async def reply_subscription() -> None:  # nats-py's task for a reply's subscription
        reply.set_result(None)

    waiting = asyncio.create_task(handler())
    await asyncio.sleep(0)  # the handler waits for its reply
    # the events' connection read first, then the reply's in the same loop turn: the batches
    # go to the feed at once, and the reply to its stream from the read loop too (the worker
    # client's `_take_reply`) or, where nats-py lacks the hook, to its subscription's task
    # (which runs a turn later): the handler runs before the batches are applied either way
    feed._take(b"", batch("a", 1, stored(H[:2])).model_dump_json().encode(), None)
    feed._take(b"", batch("a", 2, stored(H[2:], H[1])).model_dump_json().encode(), None)
    if by_task:
        asyncio.get_running_loop().create_task(reply_subscription())
    else:
        reply.set_result(None)
    await waiting
    await applied_to_worker_a(feed)
    assert seen == [0]
    assert feed.index.overlaps(H, ["a"]) == {"a": 4} and feed.num_gaps == 0


async def test_worker_loss_drops_its_blocks() -> None:
    workers = FakeWorkers()
    feed = KvIndexFeed(KvIndex(), workers.fetch)
    feed.on_workers_changed({"a": card("a"), "b": card("b")})
    await settle()
    feed.handle_batch(batch("a", 1, stored(H)))
    feed.handle_batch(batch("b", 1, stored(H[:2])))
    feed.on_workers_changed({"b": card("b")})  # a's lease lapsed
    assert feed.index.overlaps(H, ["a", "b"]) == {"a": 0, "b": 2}
    feed.handle_batch(batch("a", 2, stored([999])))  # a straggler from the dead worker
    assert "a" not in feed.index.workers


async def test_seq_gap_rebuilds_from_snapshot() -> None:
    workers = FakeWorkers()
    feed = KvIndexFeed(KvIndex(), workers.fetch)
    feed.on_workers_changed({"a": card("a")})
    await settle()
    feed.handle_batch(batch("a", 1, stored(H[:1])))
    # batch 2 (stored H[1], H[2]; removed H[0]) is lost; the worker now caches H[1..3]
    workers.caches["a"] = (3, H[1:4])
    feed.handle_batch(batch("a", 4, KvRemoved(block_hashes=[H[3]])))
    assert feed.num_gaps == 1
    await settle()
    assert workers.asked == ["a", "a"]
    assert feed.index.blocks_of("a") == {H[1], H[2]}  # snapshot, then batch 4 replayed
    feed.handle_batch(batch("a", 5, stored([H[0]])))
    assert feed.index.overlaps(H, ["a"]) == {"a": 3}


async def test_unsynced_worker_and_restart() -> None:
    workers = FakeWorkers()
    feed = KvIndexFeed(KvIndex(), workers.fetch)
    feed.on_workers_changed({"a": card("a")})
    await settle()
    feed.handle_batch(batch("a", 1, stored(H)))
    feed.handle_batch(batch("a", 2, stored([1, 2])))
    # the worker restarted under the same id: its seq starts again at 1, old blocks are gone
    feed.handle_batch(batch("a", 1, stored(H[:1])))
    assert feed.index.blocks_of("a") == {H[0]}
    feed.handle_batch(batch("a", 1, stored(H[:1])))  # a duplicate is ignored, not a gap
    assert feed.num_gaps == 0


async def test_periodic_reconcile_asks_every_worker() -> None:
    workers = FakeWorkers()
    feed = KvIndexFeed(KvIndex(), workers.fetch, reconcile_interval_s=0.05)
    await feed.start()
    try:
        feed.on_workers_changed({"a": card("a"), "b": card("b")})
        async with asyncio.timeout(10):  # reconciles every 0.05 s: poll for the second round
            while min(workers.asked.count("a"), workers.asked.count("b")) < 2:
                await asyncio.sleep(0.01)
    finally:
        await feed.stop()
    assert workers.asked.count("a") >= 2 and workers.asked.count("b") >= 2


def test_index_matches_a_plain_model_under_random_changes() -> None:
    """Stores, removes, replaces and drops of three workers over a small hash space (so that
    workers share hashes, store what they hold and remove what they do not): the index's
    holders, sizes and prefix depths equal a dict of sets kept beside it, after every step."""
    import random

    rng = random.Random(14)
    index = KvIndex()
    model: dict[str, set[int]] = {}
    workers = ["a", "b", "c"]
    for step in range(3000):
        worker = rng.choice(workers)
        hashes = [rng.randrange(40) for _ in range(rng.randrange(0, 8))]
        action = rng.random()
        if action < 0.5:
            index.store(worker, hashes if step % 2 else iter(hashes))  # lists and iterables
            model.setdefault(worker, set()).update(hashes)
        elif action < 0.85:
            index.remove(worker, hashes)
            if worker in model:
                model[worker].difference_update(hashes)
        elif action < 0.95:
            index.replace(worker, hashes)
            model[worker] = set(hashes)
        else:
            index.drop_worker(worker)
            model.pop(worker, None)
        held = {h for blocks in model.values() for h in blocks}
        assert index.num_blocks() == len(held), step
        for w in workers:
            assert index.blocks_of(w) == model.get(w, set()), step
        probe = [rng.randrange(40) for _ in range(6)]
        expected = {}
        for w, blocks in model.items():
            depth = 0
            while depth < len(probe) and probe[depth] in blocks:
                depth += 1
            if depth:
                expected[w] = depth
        assert index.prefix_depths(probe) == expected, step


@pytest.mark.parametrize(("share_from", "shared_limit"), [(4, 1 << 15), (2, 1 << 15), (2, 12)])
def test_prefix_depths_match_a_brute_force_walk(share_from: int, shared_limit: int) -> None:
    """Eight workers storing and evicting runs of a few prompts that share prefixes (so that
    many workers hold the same blocks and the index gives them `_shared` entries), evicting
    single blocks from the middle too (holes), replaced by snapshots and dropped: after
    every step, each query's depths equal a walk of plain per-worker sets written here."""
    rng = random.Random(share_from * 100 + shared_limit)
    index = KvIndex()
    index.SHARE_FROM, index.SHARED_LIMIT = share_from, shared_limit
    trunk = [rng.getrandbits(64) for _ in range(12)]
    prompts = [
        trunk[: rng.randrange(2, 13)] + [rng.getrandbits(64) for _ in range(rng.randrange(0, 6))]
        for _ in range(6)
    ]
    model: dict[str, set[int]] = {}
    workers = [f"w{i}" for i in range(8)]

    def run() -> list[int]:
        prompt = rng.choice(prompts)
        start = rng.randrange(len(prompt))
        return prompt[start : rng.randrange(start, len(prompt)) + 1]

    for step in range(4000):
        worker = rng.choice(workers)
        action = rng.random()
        if action < 0.45:
            hashes = run()
            index.store(worker, hashes if step % 2 else iter(hashes))
            model.setdefault(worker, set()).update(hashes)
        elif action < 0.75:
            hashes = run() if action < 0.65 else [rng.choice(rng.choice(prompts))]
            index.remove(worker, hashes)
            if worker in model:
                model[worker].difference_update(hashes)
        elif action < 0.85:
            hashes = run()
            index.apply_ops(worker, [(False, hashes[1:]), (True, hashes[:1])])
            model.setdefault(worker, set()).difference_update(hashes[1:])
            model[worker].update(hashes[:1])
        elif action < 0.95:
            hashes = run()
            index.replace(worker, hashes)
            model[worker] = set(hashes)
        else:
            index.drop_worker(worker)
            model.pop(worker, None)
        for _ in range(3):
            probe = rng.choice(prompts)[: rng.randrange(0, 18)]
            if rng.random() < 0.3:
                probe = [*probe, rng.getrandbits(64)]
            expected = {}
            for w, held in model.items():
                depth = 0
                while depth < len(probe) and probe[depth] in held:
                    depth += 1
                if depth:
                    expected[w] = depth
            assert index.prefix_depths(probe) == expected, step
            assert index.overlaps(probe, workers) == {w: expected.get(w, 0) for w in workers}
        assert index.num_blocks() == len(set().union(*model.values())), step
        assert index.num_held() == sum(map(len, model.values())), step
        assert {w: index.blocks_of(w) for w in workers} == {w: model.get(w, set()) for w in workers}
    assert index._shared, "the queries never gave shared blocks entries: the test tests less"


@pytest.mark.integration
async def test_feed_over_real_nats_takes_batches_in_the_read_loop(nats_url: str) -> None:
    """Through a real nats-server: the feed's connection still gets its snapshot reply (a
    request on it), and the event batches reach the index without nats-py's per-message
    path (its message count, kept there, sees the reply only)."""
    import uuid

    from contract.bus import connect, kv_events_subject, kv_snapshot_subject

    deployment = f"kvtake-{uuid.uuid4().hex[:8]}"
    worker = await connect(nats_url, "test-kv-worker")

    async def answer(msg) -> None:  # type: ignore[no-untyped-def]
        snapshot = KvSnapshot(worker_id="a", seq=2, block_hashes=H[:1])
        await worker.publish(msg.reply, snapshot.model_dump_json().encode())

    await worker.subscribe(kv_snapshot_subject(deployment, "a"), cb=answer)
    await worker.flush()
    feed = KvIndexFeed(KvIndex(), nats_url=nats_url, deployment=deployment)
    await feed.start()
    try:
        feed.on_workers_changed({"a": card("a")})
        async with asyncio.timeout(10):
            while feed.num_snapshots == 0:
                await asyncio.sleep(0.01)
        for seq, hashes in ((3, H[1:3]), (4, H[3:])):
            data = batch("a", seq, stored(hashes)).model_dump_json().encode()
            await worker.publish(kv_events_subject(deployment), data)
        await worker.flush()
        async with asyncio.timeout(10):
            while feed.index.overlaps(H, ["a"]) != {"a": 4}:
                await asyncio.sleep(0.01)
        assert feed.num_gaps == 0
        assert feed._nc is not None and feed._nc.stats["in_msgs"] == 1  # the snapshot reply
    finally:
        await feed.stop()
        await worker.close()
