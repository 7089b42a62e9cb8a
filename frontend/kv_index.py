"""The frontend's view of which worker caches which KV block, fed by the workers' KV events.

`KvIndex` is the data: each worker's set of chained block hashes (plus, for the blocks of
prefixes that several workers hold, block hash → its holders). Because a hash stands for its
whole prefix, flat sets are enough: a request's overlap with a worker is the number of its
leading block hashes that worker holds.

`KvIndexFeed` keeps the index true: it applies `KvEventBatch`es from NATS in per-worker
`seq` order, two event-loop turns after they arrive (a worker's reply that came with them
resumes its request's handler first: the events are off the reply's path); a gap (lost or
reordered batch), a worker it has not synced yet, a worker that joins, a frontend (re)start
and a periodic timer all trigger a reconcile: the worker is asked for a `KvSnapshot` (its
full set of cached hashes as of a seq), the index replaces that worker's blocks with it and
replays the batches that arrived meanwhile. A worker that leaves
the `WorkerDirectory` (lease lapse) loses all its blocks at once. The feed also remembers
which workers ever published a block (`published`): the router warns about the others.

`RoutedPrefixIndex` is the fallback for workers that publish no KV events: the blocks of the
prompts the router sent them, each forgotten `ttl_s` after it was last routed (Dynamo's
approximate mode): the engine's real cache is unknown, so a guess that ages out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import compress, repeat, takewhile
from operator import contains

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from contract.bus import connect, kv_events_subject, kv_snapshot_subject
from contract.discovery import WorkerCard
from contract.messages import (
    KvBatchOps,
    KvEvent,
    KvEventBatch,
    KvRemoved,
    KvSnapshot,
    KvStored,
    parse_kv_event_batch,
)
from frontend.nats_read_loop import read_loop_hook, take_in_read_loop

logger = logging.getLogger(__name__)

SnapshotFetcher = Callable[[str], Awaitable[KvSnapshot]]


class KvIndex:
    """Worker → the set of block hashes it holds, plus the holders of the blocks of prefixes
    that several workers hold; no I/O, so it is cheap to test and to query.

    Every frontend process applies every worker's events (the whole deployment's rate, not
    its own share), so a batch's stores and removes are one C-level set operation each
    (`set.update`, `set.difference_update`), never a Python loop per hash; a worker that
    leaves is one `dict.pop`. A query asks each worker's set whether it holds the prompt's
    first block, then each holder how far it goes: fine for a few holders, but a long
    prefix on many workers (a system prompt) would cost holders × blocks lookups. So the
    blocks of a prefix found on `SHARE_FROM` or more workers get an entry in `_shared`
    (block hash → every worker holding it, exactly: kept true by each event that touches
    one, a C-level `isdisjoint` check otherwise), and the walk goes through those with one
    lookup per block, as a hash → holders map would."""

    SHARE_FROM = 4  # workers holding the same blocks of a prompt from which those get entries
    SHARED_LIMIT = 1 << 15  # entries; past it the map is cleared and fills again by queries

    def __init__(self) -> None:
        self._blocks: dict[str, set[int]] = {}
        self._shared: dict[int, frozenset[str]] = {}  # hash -> all its holders (some hashes)
        self._shared_hashes: set[int] = set()  # its keys: a set's `isdisjoint` is faster

    def num_held(self) -> int:
        """Blocks the workers hold, a block counted once per worker holding it (what /health
        and the metrics report: one `len` per worker, where `num_blocks` is a union)."""
        return sum(map(len, self._blocks.values()))

    def num_blocks(self) -> int:
        """Distinct block hashes held by any worker: the union of the workers' sets (tens of
        ms at 64 workers of 8,000 blocks), for tests and tools, not a status polled on the
        event loop (`num_held`)."""
        sets = list(self._blocks.values())
        return len(sets[0].union(*sets[1:])) if sets else 0

    def store(self, worker_id: str, hashes: Iterable[int]) -> None:
        self.apply_ops(worker_id, ((True, hashes),))

    def remove(self, worker_id: str, hashes: Iterable[int]) -> None:
        self.apply_ops(worker_id, ((False, hashes),))

    def apply(self, worker_id: str, events: Iterable[KvEvent]) -> None:
        for event in events:
            if isinstance(event, KvStored):
                self.store(worker_id, event.block_hashes)
            elif isinstance(event, KvRemoved):
                self.remove(worker_id, event.block_hashes)

    def apply_ops(self, worker_id: str, ops: Iterable[tuple[bool, Iterable[int]]]) -> None:
        """`apply` for events as `KvBatchOps` pairs (stored?, hashes)."""
        mine = self._blocks.get(worker_id)
        shared = self._shared_hashes
        for stored, hashes in ops:
            if shared and not isinstance(hashes, list | tuple | set | frozenset):
                hashes = list(hashes)  # read twice
            if not stored:
                if mine is None:
                    continue
                mine.difference_update(hashes)
            elif mine is None:
                mine = self._blocks[worker_id] = set(hashes)
            else:
                mine.update(hashes)
            if shared and not shared.isdisjoint(hashes):  # rare: a shared block
                self._reshare(worker_id, shared.intersection(hashes), stored)

    def _reshare(self, worker_id: str, hashes: Iterable[int], holds: bool) -> None:
        """`worker_id` now holds (or no longer holds) these `_shared` blocks. Blocks with
        the same holders keep one frozenset (the walk's `is` test)."""
        shared, me = self._shared, frozenset((worker_id,))
        changed: dict[frozenset[str], frozenset[str]] = {}  # old holders -> new
        for h in hashes:
            old = shared[h]
            new = changed.get(old)
            if new is None:
                new = changed[old] = old | me if holds else old - me
            shared[h] = new

    def replace(self, worker_id: str, hashes: Iterable[int]) -> None:
        """Make `hashes` exactly the worker's blocks (a snapshot)."""
        self.drop_worker(worker_id)
        self.store(worker_id, hashes)

    def drop_worker(self, worker_id: str) -> None:
        mine = self._blocks.pop(worker_id, None)
        if mine is not None and self._shared:
            self._reshare(worker_id, self._shared_hashes & mine, False)

    def blocks_of(self, worker_id: str) -> set[int]:
        return set(self._blocks.get(worker_id, ()))

    @property
    def workers(self) -> list[str]:
        return list(self._blocks)

    def overlaps(self, hashes: Sequence[int], candidates: Collection[str]) -> dict[str, int]:
        """For each candidate, how many leading blocks of `hashes` it holds (0 if none)."""
        depths = self.prefix_depths(hashes)
        return {worker_id: depths.get(worker_id, 0) for worker_id in candidates}

    def prefix_depths(self, hashes: Sequence[int]) -> dict[str, int]:
        """Every worker holding the first of `hashes` → how many leading ones it holds (the
        router's view: no candidate list to build). A worker holding none is absent.

        Through `_shared` while the blocks have entries there (as a hash → holders map:
        the workers still on, narrowed per block), then each worker still on asks its own
        set for the rest. Blocks that `SHARE_FROM` or more workers turn out to hold get
        entries for the next prompt that starts with them."""
        if not hashes:
            return {}
        shared, blocks = self._shared, self._blocks
        depths: dict[str, int] = {}
        active = shared.get(hashes[0])
        depth, start = 1, 0  # start: the first block without a `_shared` entry
        if active is None:  # each worker's set
            holding = list(map(contains, blocks.values(), repeat(hashes[0])))
            if True not in holding:
                return depths  # cached nowhere: the most common case
            names = list(compress(blocks, holding))
            if len(names) == 1:  # on one worker: its set alone
                held = blocks[names[0]]
                if held.issuperset(hashes):
                    return {names[0]: len(hashes)}
                return {names[0]: len(list(takewhile(held.__contains__, hashes)))}
            active = frozenset(names)
        else:  # each block's holders while it has an entry
            for depth in range(1, len(hashes) + 1):
                if not active or depth == len(hashes):
                    break
                holders = shared.get(hashes[depth])
                if holders is None:
                    start = depth
                    break
                if holders is active or active <= holders:  # all of them go on
                    continue
                still = active & holders
                depths.update(dict.fromkeys(active - still, depth))
                active = still
        if not active:
            return depths
        # the workers still on, from `depth` on: each one's own set
        sets = list(map(blocks.__getitem__, active))
        if depth == len(hashes) or not any(map(contains, sets, repeat(hashes[depth]))):
            depths.update(dict.fromkeys(active, depth))  # all of them stop here
            return depths
        rest = hashes[depth:]
        for worker_id, held in zip(active, sets, strict=True):
            if held.issuperset(rest):
                depths[worker_id] = len(hashes)
            else:
                depths[worker_id] = depth + len(list(takewhile(held.__contains__, rest)))
        if len(active) >= self.SHARE_FROM:
            self._share(hashes, start, sorted(depths[w] for w in active)[-self.SHARE_FROM])
        return depths

    def _share(self, hashes: Sequence[int], start: int, stop: int) -> None:
        """Give `hashes[start:stop]` (blocks that several workers hold) `_shared` entries: each
        one's holders, every worker's set asked (once per block, not once per query)."""
        shared = self._shared
        if len(shared) + stop - start > self.SHARED_LIMIT:
            shared.clear()  # the prefixes of past queries: refilled by the next ones
            self._shared_hashes.clear()
            start = 0
        names, sets = list(self._blocks), list(self._blocks.values())
        same: dict[frozenset[str], frozenset[str]] = {}  # one object for the same holders
        for h in hashes[start:stop]:
            if h not in shared:
                holders = frozenset(compress(names, map(contains, sets, repeat(h))))
                shared[h] = same.setdefault(holders, holders)
                self._shared_hashes.add(h)


class RoutedPrefixIndex(KvIndex):
    """A `KvIndex` of the prompts routed to each worker, each block kept `ttl_s` after it
    was last routed there: an approximation of the worker's cache when it reports none."""

    def __init__(self, ttl_s: float = 120.0) -> None:
        super().__init__()
        self.ttl_s = ttl_s
        self._touched: OrderedDict[tuple[str, int], float] = OrderedDict()  # oldest first

    def routed(self, worker_id: str, hashes: Iterable[int], now: float) -> None:
        """`worker_id` got a prompt with these block hashes at `now`."""
        hashes = list(hashes)
        self.store(worker_id, hashes)
        for h in hashes:
            key = (worker_id, h)
            self._touched[key] = now
            self._touched.move_to_end(key)
        self.expire(now)

    def expire(self, now: float) -> None:
        """Forget the blocks last routed more than `ttl_s` before `now`."""
        while self._touched:
            (worker_id, h), at = next(iter(self._touched.items()))
            if now - at <= self.ttl_s:
                return
            del self._touched[(worker_id, h)]
            self.remove(worker_id, (h,))

    def drop_worker(self, worker_id: str) -> None:
        super().drop_worker(worker_id)
        for key in [key for key in self._touched if key[0] == worker_id]:
            del self._touched[key]


@dataclass
class _WorkerSync:
    """Where one worker's event stream stands."""

    last_seq: int | None = None  # None: never synced
    pending: bool = False  # a snapshot request is in flight
    buffer: list[KvBatchOps] = field(default_factory=list)  # batches seen meanwhile


class KvIndexFeed:
    """Feeds a `KvIndex` from NATS events and snapshots; a WorkerDirectory listener."""

    def __init__(
        self,
        index: KvIndex,
        fetch_snapshot: SnapshotFetcher | None = None,
        *,
        nats_url: str | None = None,
        deployment: str = "hpcserve",
        reconcile_interval_s: float = 30.0,
        snapshot_timeout_s: float = 5.0,
    ) -> None:
        self.index = index
        self._fetch = fetch_snapshot or self._fetch_over_nats
        self._nats_url = nats_url
        self._deployment = deployment
        self._reconcile_interval_s = reconcile_interval_s
        self._snapshot_timeout_s = snapshot_timeout_s
        self._nc: NatsClient | None = None
        self._sync: dict[str, _WorkerSync] = {}
        self._workers: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._reconciler: asyncio.Task[None] | None = None
        self._arrived: list[bytes] = []  # batches received, applied two loop turns later
        self.num_gaps = 0
        self.num_snapshots = 0
        self.published: set[str] = set()  # workers that ever reported a cached block

    # ----- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Subscribe to the deployment's KV events and start the periodic reconcile."""
        if self._nats_url is not None:
            self._nc = nc = await connect(self._nats_url, "hpcserve-frontend-kv-index")
            subject = kv_events_subject(self._deployment)
            if read_loop_hook(nc):
                take_in_read_loop(nc, (await nc.subscribe(subject))._id, self._take)
            else:  # a nats-py without the hook: its subscription task hands them over
                logger.warning("KV index: nats-py's _process_msg changed; events by callback")
                await nc.subscribe(subject, cb=self._on_events)
            await nc.flush()
        self._reconciler = asyncio.create_task(self._reconcile_forever(), name="kv-reconcile")

    async def stop(self) -> None:
        tasks = [*self._tasks, *([self._reconciler] if self._reconciler else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()

    # ----- directory -----------------------------------------------------------------------
    def on_workers_changed(self, workers: Mapping[str, WorkerCard]) -> None:
        """Drop the blocks of workers that left; snapshot the ones that joined."""
        current = set(workers)
        for gone in self._workers - current:
            self.index.drop_worker(gone)
            self._sync.pop(gone, None)
            self.published.discard(gone)
            logger.info("KV index: dropped worker %s", gone)
        joined = current - self._workers
        self._workers = current
        for worker_id in sorted(joined):
            self.request_snapshot(worker_id)

    # ----- events --------------------------------------------------------------------------
    async def _on_events(self, msg: Msg) -> None:
        """Keep the batch; parse and apply it (and any that follow meanwhile) two loop turns
        later. A worker publishes a step's KV events after its replies, but they reach this
        process on another connection, often in the same read: nats-py hands the reply to
        its subscription's task, which wakes the request's handler a turn later, and the
        events' task would run in between (30-40 µs for a new prompt's blocks)."""
        if not self._arrived:
            asyncio.get_running_loop().call_soon(self._apply_next_turn)
        self._arrived.append(msg.data)

    def _take(self, _subject: bytes, data: bytes, _headers: bytes | None) -> None:
        """`_on_events` for a batch taken from nats-py's read loop (`take_in_read_loop`): a
        turn earlier than its subscription task would have had it, so one turn more."""
        if not self._arrived:
            asyncio.get_running_loop().call_soon(self._wait_a_turn)
        self._arrived.append(data)

    def _wait_a_turn(self) -> None:
        asyncio.get_running_loop().call_soon(self._apply_next_turn)

    def _apply_next_turn(self) -> None:
        asyncio.get_running_loop().call_soon(self._apply_arrived)

    def _apply_arrived(self) -> None:
        arrived, self._arrived = self._arrived, []
        for data in arrived:
            try:
                batch = parse_kv_event_batch(data)  # KvEventBatch's schema, parsed fast
            except ValueError as exc:
                logger.warning("ignoring malformed KV event batch: %s", exc)
                continue
            self.handle_batch(batch)

    def handle_batch(self, batch: KvEventBatch | KvBatchOps) -> None:
        """Apply in seq order; on a gap or an unsynced worker, reconcile by snapshot."""
        if isinstance(batch, KvEventBatch):
            batch = KvBatchOps.of(batch)
        worker_id, seq, events = batch
        sync = self._sync.get(worker_id)  # a worker's entry goes when the worker leaves
        if sync is None:
            if worker_id not in self._workers:
                return  # unknown or gone: its join (snapshot) will cover it
            sync = self._sync[worker_id] = _WorkerSync()
        if events and worker_id not in self.published:
            self.published.add(worker_id)
        last = sync.last_seq
        if sync.pending:
            sync.buffer.append(batch)
        elif last is not None and seq == last + 1:  # the usual case
            self.index.apply_ops(worker_id, events)
            sync.last_seq = seq
        elif seq == 1:  # first batch of a (re)started worker: nothing before it counts
            self.index.replace(worker_id, ())
            self.index.apply_ops(worker_id, events)
            sync.last_seq = 1
        elif last is not None and seq <= last:
            logger.debug("KV index: stale batch %d from %s ignored", seq, worker_id)
        else:
            self.num_gaps += 1
            logger.warning(
                "KV index: %s sent batch %d after %s; reconciling by snapshot",
                worker_id, seq, last,
            )  # fmt: skip
            sync.buffer.append(batch)
            self.request_snapshot(worker_id)

    # ----- snapshots -----------------------------------------------------------------------
    def request_snapshot(self, worker_id: str) -> None:
        """Ask `worker_id` for its cached hashes (once at a time); events buffer meanwhile."""
        sync = self._sync.setdefault(worker_id, _WorkerSync())
        if sync.pending:
            return
        sync.pending = True
        task = asyncio.get_running_loop().create_task(self._snapshot(worker_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _snapshot(self, worker_id: str) -> None:
        try:
            snapshot = await self._fetch(worker_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.warning("KV snapshot of %s failed (%s); next reconcile retries", worker_id, exc)
            self._snapshot_failed(worker_id)
            return
        self.apply_snapshot(snapshot)

    def apply_snapshot(self, snapshot: KvSnapshot) -> None:
        """Replace the worker's blocks, then replay the batches newer than the snapshot."""
        worker_id = snapshot.worker_id
        sync = self._sync.get(worker_id)
        if sync is None or worker_id not in self._workers:
            return  # left while we asked
        self.num_snapshots += 1
        if snapshot.block_hashes:
            self.published.add(worker_id)
        self.index.replace(worker_id, snapshot.block_hashes)
        sync.last_seq = snapshot.seq
        buffered, sync.buffer, sync.pending = sorted(sync.buffer, key=_seq), [], False
        for batch in buffered:
            if batch.seq > sync.last_seq:
                if batch.seq != sync.last_seq + 1:
                    logger.warning("KV index: %s still has a gap after its snapshot", worker_id)
                self.index.apply_ops(worker_id, batch.events)
                sync.last_seq = batch.seq
        logger.debug(
            "KV index: %s synced at seq %d (%d blocks)",
            worker_id, sync.last_seq, len(snapshot.block_hashes),
        )  # fmt: skip

    def _snapshot_failed(self, worker_id: str) -> None:
        """Best effort until the next try: apply what arrived, in order."""
        sync = self._sync.get(worker_id)
        if sync is None:
            return
        buffered, sync.buffer, sync.pending = sorted(sync.buffer, key=_seq), [], False
        for batch in buffered:
            self.index.apply_ops(worker_id, batch.events)
            sync.last_seq = batch.seq

    async def _fetch_over_nats(self, worker_id: str) -> KvSnapshot:
        if self._nc is None:
            raise ConnectionError("the KV index is not connected to NATS")
        subject = kv_snapshot_subject(self._deployment, worker_id)
        reply = await self._nc.request(subject, b"", timeout=self._snapshot_timeout_s)
        return KvSnapshot.model_validate_json(reply.data)

    async def _reconcile_forever(self) -> None:
        while True:
            await asyncio.sleep(self._reconcile_interval_s)
            for worker_id in sorted(self._workers):
                self.request_snapshot(worker_id)


def _seq(batch: KvBatchOps) -> int:
    return batch.seq
