"""Router load accounting across the frontend processes of one deployment, over NATS: the
fallback where the shared memory table (`frontend.load_table`) cannot be mapped.

Each frontend process counts the requests it routed and has not finished, per worker
(`LoadTracker.in_flight`, plus the KV router's prompt blocks). With several processes sharing
the port (`frontend.workers`), each also needs the others' counts, or N processes would each
send their next request to the same "idle" worker. So each process publishes its whole
current count (not deltas) on one NATS subject that every process subscribes to plainly:

- coalesced: a change schedules one publish `FLUSH_S` later, so the cost is bounded by
  1/FLUSH_S messages per second per process, whatever the request rate;
- absolute: a lost or reordered message is repaired by the next one (`seq` orders them);
- a heartbeat every `HEARTBEAT_S` re-sends it; a process not heard from for `EXPIRE_S` (it
  crashed: its requests died with it) is dropped; a stopping one says goodbye (empty state).

The workers' own `LoadMetrics` still see everything, late; this covers the gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from contract.bus import connect, frontend_load_subject
from frontend.router import LoadTracker

logger = logging.getLogger(__name__)

FLUSH_S = 0.002
_NONE = (0, 0)  # a peer's counts on a worker it does not name
HEARTBEAT_S = 1.0
EXPIRE_S = 3.0


@dataclass
class PeerLoad:
    """What one other frontend process last said it has in flight."""

    seq: int
    heard: float  # monotonic
    workers: dict[str, tuple[int, int]] = field(default_factory=dict)  # requests, blocks


def encode_load(
    frontend_id: str, seq: int, workers: dict[str, tuple[int, int]], bye: bool = False
) -> bytes:
    return orjson.dumps({"id": frontend_id, "seq": seq, "workers": workers, "bye": bye})


class PeerLoads:
    """The other processes' counts per worker, into the tracker (no I/O: unit-tested): their
    in-flight requests summed, their routed prompt blocks as the largest peer's (each
    process deduplicates only its own blocks: a sum counted a shared system prompt once per
    process; as `frontend.load_table.LoadTable.peer_blocks`).

    With N processes each one hears N - 1 peers, every few milliseconds each: a message
    updates the request sums by its own peer's difference and the blocks of the workers it
    names, not every worker again."""

    def __init__(self, tracker: LoadTracker, own_id: str) -> None:
        self.tracker = tracker
        self.own_id = own_id
        self.peers: dict[str, PeerLoad] = {}
        self._requests: dict[str, int] = {}  # worker -> the peers' in-flight requests
        self._blocks: dict[str, int] = {}  # worker -> their routed prompt blocks
        tracker.peer_requests = self._requests
        tracker.peer_blocks = self._blocks

    def apply(self, data: bytes, now: float) -> bool:
        """Apply one message; False when it is ours, stale or malformed."""
        try:
            message = orjson.loads(data)
            frontend_id = str(message["id"])
            seq = int(message["seq"])
            workers = {
                str(w): (int(counts[0]), int(counts[1]))
                for w, counts in dict(message["workers"]).items()
            }
            bye = bool(message.get("bye", False))
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            logger.warning("ignoring a malformed frontend load message: %s", exc)
            return False
        if frontend_id == self.own_id:
            return False
        peer = self.peers.get(frontend_id)
        if peer is not None and seq <= peer.seq:
            return False
        named = workers.keys()
        if peer is not None:
            self._count(peer.workers, -1)
            named = named | peer.workers.keys()
        if bye:
            self.peers.pop(frontend_id, None)
        else:
            self.peers[frontend_id] = PeerLoad(seq, now, workers)
            self._count(workers, 1)
        self._largest_blocks(named)
        return True

    def expire(self, now: float) -> None:
        gone = [fid for fid, peer in self.peers.items() if now - peer.heard > EXPIRE_S]
        for frontend_id in gone:
            logger.info("frontend process %s silent for %.0f s: its load dropped",
                        frontend_id, EXPIRE_S)  # fmt: skip
            workers = self.peers.pop(frontend_id).workers
            self._count(workers, -1)
            self._largest_blocks(workers.keys())

    def _count(self, workers: dict[str, tuple[int, int]], sign: int) -> None:
        """Add (sign 1) or take away (-1) one peer's requests; workers at zero leave the sums."""
        table = self._requests
        for worker_id, (requests, _blocks) in workers.items():
            left = table.get(worker_id, 0) + sign * requests
            if left:
                table[worker_id] = left
            else:
                table.pop(worker_id, None)

    def _largest_blocks(self, worker_ids: Iterable[str]) -> None:
        """The largest peer's routed blocks on each of `worker_ids`; none leaves the table."""
        peers = self.peers.values()
        for worker_id in worker_ids:
            largest = max((p.workers.get(worker_id, _NONE)[1] for p in peers), default=0)
            if largest:
                self._blocks[worker_id] = largest
            else:
                self._blocks.pop(worker_id, None)


class LoadShare:
    """Publishes this process's in-flight counts and applies the other processes' ones."""

    def __init__(
        self,
        nats_url: str,
        deployment: str,
        tracker: LoadTracker,
        blocks_of: Callable[[str], int] | None = None,
        frontend_id: str | None = None,
    ) -> None:
        self.frontend_id = frontend_id or uuid.uuid4().hex[:12]
        self._url = nats_url
        self._subject = frontend_load_subject(deployment)
        self._tracker = tracker
        self._blocks_of = blocks_of
        self.peers = PeerLoads(tracker, self.frontend_id)
        self._nc: NatsClient | None = None
        self._seq = 0
        self._flush_due = False
        self._last_sent: dict[str, tuple[int, int]] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._sending: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._nc = await connect(self._url, f"hpcserve-frontend-load-{self.frontend_id}")
        await self._nc.subscribe(self._subject, cb=self._on_message)
        await self._nc.flush()
        self._tracker.on_change = self.changed
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat_forever())
        self._send()  # peers learn of us at once

    async def stop(self) -> None:
        self._tracker.on_change = None
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        if self._nc is None:
            return
        with contextlib.suppress(Exception):
            self._seq += 1
            goodbye = encode_load(self.frontend_id, self._seq, {}, bye=True)
            await self._nc.publish(self._subject, goodbye)
            async with asyncio.timeout(2):
                await self._nc.drain()

    def own_counts(self) -> dict[str, tuple[int, int]]:
        blocks_of = self._blocks_of
        return {
            worker_id: (count, blocks_of(worker_id) if blocks_of is not None else 0)
            for worker_id, count in self._tracker.in_flight.items()
        }

    def changed(self, worker_id: str) -> None:
        """LoadTracker hook: publish the new counts soon (one message for a burst; it sends
        every worker's count, so which one changed does not matter)."""
        if not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_later(FLUSH_S, self._send)

    def _send(self, heartbeat: bool = False) -> None:
        """Publish our counts; a change that came back to what we last said sends nothing
        (a request that started and finished within one flush), a heartbeat always sends."""
        self._flush_due = False
        if self._nc is None or self._nc.is_closed:
            return
        counts = self.own_counts()
        if counts == self._last_sent and not heartbeat:
            return
        self._last_sent = counts
        self._seq += 1
        payload = encode_load(self.frontend_id, self._seq, counts)
        task = asyncio.get_running_loop().create_task(self._publish(payload))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _publish(self, payload: bytes) -> None:
        try:
            assert self._nc is not None
            await self._nc.publish(self._subject, payload)
        except Exception as exc:  # the next change or heartbeat repairs it
            logger.debug("frontend load not published: %s", exc)

    async def _on_message(self, msg: Msg) -> None:
        self.peers.apply(msg.data, time.monotonic())

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            self.peers.expire(time.monotonic())
            self._send(heartbeat=True)
