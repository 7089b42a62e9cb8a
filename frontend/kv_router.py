"""KV-aware routing: send a request where its prompt prefix is cached, weighed against load.

The cost model is Dynamo 1.6's (lowest wins), in KV blocks of the worker's own block size,
with one addition (`uncached_weight`):

    uncached = max(prompt_blocks - overlap_credit x cached_blocks, 0)
    prefill  = pending_prefill + uncached_weight x uncached
    decode   = active_blocks + new_blocks
    cost     = prefill_load_scale x prefill + decode

- `cached_blocks`: the leading prompt blocks the worker caches: from its KV events
  (`KvIndex`), or, for a worker that publishes none, from the prompts routed to it
  (`RoutedPrefixIndex`, approximate); prompts of our in-flight requests there count too
  (their KV events are still on the way, or the engine is computing them right now), and
  with several frontend processes those of the others' (`share_routing`: a sample of their
  block hashes in the shared load table, up to 15 blocks short);
- `pending_prefill`: uncached prompt blocks of requests we routed there that have not sent
  their first output yet (this frontend sees exactly when each prefill ends), less what the
  worker has computed of them since it started on them (`prefill_progress`): its rate is
  learned from its first outputs (`PrefillRate`), and it starts on its next prompt when it
  gets one idle or sends a first output (engines take prompts first come, first served);
  with several frontend processes every process's pending blocks, less the progress since
  the worker last started on a prompt as any of them saw it;
- `active_blocks`: the worker's KV footprint, deduplicated: shared prefix blocks count once,
  as in the engine. The larger of its last `LoadMetrics.active_blocks` (which sees other
  frontends' requests but lags; reduced by the blocks of our requests that finished since)
  and our own in-flight prompts' distinct blocks;
- `new_blocks`: the prompt blocks the worker does not already hold for a running request.

Why these defaults win without tuning (measured through HTTP, benchmarks/bench_router.py):
the old `overlap x prefill + active` counted a shared prefix once per running request, so a
worker serving a hot system prompt looked busy and the prompt was recomputed everywhere.
Deduplicating fixes that; `uncached_weight` 2 makes a hit that waits behind one fresh
prefill beat recomputing the prefix elsewhere (the recompute also delays the next requests
there and duplicates the prefix in a cache smaller than the working set); and
`prefill_load_scale` 4 lets prefill work, which is what time to first token is made of,
outweigh KV footprint, which mainly costs memory (Dynamo's 1 ties the two, and ties go the
wrong way half the time).

Ties, and `tie_band` (4): temperature 0 picks the cheapest worker, but every worker whose cost
is within `tie_band` x the request's own prompt blocks of the cheapest, whose prefill term is
no larger than the cheapest's (its pending part up to `pending_tolerance` x the prompt's
blocks less), and which, if its cache draws hits, runs at most one request more than the
cheapest counts as tied, and the tied worker with the least prefill ahead (within the same
tolerance) takes the request (time to first token is made of it), among equals the one whose
cache drew the fewest of the latest 64 cache hits, then the one routed to least recently.
Why (measured, issue 14):
with prompts sharing nothing, the costs differ only by pending prefill and decode footprint.
Pending prefill counted a prompt whole until its first output (before `prefill_progress`), so
"one prefill pending" looked the same on a worker that just got it and on one nearly done; the
decode term then decided, and in a closed loop it always picked the worker whose other request
had just finished, i.e. the one whose remaining request had just started its prefill. New
requests queued behind fresh prefills and the kv router lost to round robin (TTFT p50 x0.74;
least_loaded, which also prefers the emptier worker, x0.90). A decode footprint difference of a
few requests like this one says nothing about when its prefill starts; how long ago each worker
last got work does (its queue has had that long to drain), and taking turns spreads arrivals
evenly as round robin does. The two other conditions keep what the cost knows: a cached prefix
lowers the prefill term, so it is never traded for taking turns; and a prefill holds up every
request running where it lands, which the deduplicated footprint hides on a worker serving many
hits of one system prompt (without the request-count condition misses landed on such hot
workers and their hits' TTFT doubled). Why 4: through HTTP on prompts sharing nothing, 1.5
still lost about half the rounds (x0.85-1.0 of round robin), 4 and 100 won (x1.13-1.15 over two
rounds); 4 keeps the decode footprint deciding when it differs by more than four of the
request's prompts (short prompts, long outputs). `tie_band` 0 is the old rule (footprint
decides; exact ties go to the least prefill, then the least recently routed). Why the least
prefill first (second round): with `prefill_progress` a worker nearly through its prefill can
be the cheapest by its smaller footprint while a tied worker whose requests are all decoding
has none ahead; least-recently-routed sent the new prompt to wait behind the first. Why the
hit demand (third round): a prompt cached nowhere ties on every idle worker, and every hit
arriving where it lands waits for its whole prefill; taking turns sent it to hot workers as
often as to cold ones (in-process replays of system_prompts: 31-35 of 126 hits waited more
than 300 ms, 14-15 of them for their own prompt's first prefill; with the demand 29-31 over
five runs each; no change on prompts sharing nothing, where no worker has hits). Why the
tolerance and the count only where hits wait (fifth round): on prompts sharing nothing in
lockstep through HTTP, the frontend's timelines (benchmarks/router_timeline.py) showed the
pending estimate off by ~0.2 s of prefill either way (a prompt started on an idle worker pays
latencies a queued one does not; workers' prefills vary): kv departed from taking turns in
31-42 of 160 choices, as often for the worse as for the better, and the count kept out
workers whose extra requests only decoded, about to finish. Now it takes turns like round
robin (148-153 of 160 choices) and departs where the estimates differ by more (7-12
choices, whose prefills ahead ended 0.6-1.0 s sooner on average than the turn's); a worker
with nothing pending is no estimate and still beats one within the slack (paced prompts
lost 2% of mean TTFT without that). Where no cache is involved (no candidate holds any
of the prompt, no worker's cache draws hits: `turns_without_hits`), the summed cost still
moved choices off the turns: a worker whose extra requests only decoded and whose estimate
was a little above another's looked one prompt dearer; each term is now bounded on its own
(pending prefill within a prompt of the least, decode blocks within the band), and turns
decide among those, nothing pending first (sixth round: over 96 simulated-time replays of
the lockstep closed loop the summed cost lost up to 8% of mean TTFT to round robin, each a
handful of departures from turns; per term, kv's mean is within 2% of round robin's in each).
Turns follow the routing order, not the clock, whose readings can be equal (simulated,
coarse); with several frontend processes, the order of all their choices (`share_turns`). A
temperature above 0 samples with softmax(-(cost - min cost) / temperature) instead.

Prompts are hashed at each candidate's block size (its card), so no setting has to match the
engine's. A worker that finished requests but published no KV event within
`events_grace_s` is warned about once; until it publishes, it is scored from the prompts
routed to it. At debug level every decision is logged with each candidate's terms (requests
on it, cached blocks, prefill, pending, reported and routed blocks, cost, time since it was
last routed to).

The request path is kept cheap (issue 14, fourth round: `choose` plus the finish at
concurrency 1 over 8 workers cost 0.45-0.47x of the per-candidate version, with the same
decisions: benchmarks/bench_kv_choose.py, tests/frontend/test_kv_router_replay.py): the prompt
is hashed once per block size, the KV index walked once per block size for all workers
(`KvIndex.prefix_depths`), every candidate scored in one loop over per-worker sums of our
requests that starting, prefilling and finishing keep up to date (`_OnWorker`: one lookup per
candidate), and `WorkerScore`s are built only for tests, benchmarks and the debug log.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from contract.block_hash import block_hashes, media_block_extras
from contract.config import KvRouterConfig
from contract.discovery import WorkerCard
from contract.messages import MediaRef
from frontend.kv_index import KvIndex, RoutedPrefixIndex
from frontend.router import LoadTracker

logger = logging.getLogger(__name__)

# how many of the latest cache hits (on any worker) measure which workers' caches draw the
# most requests: ~8 a worker at 8 workers, few enough to follow a shift in what users ask
_RECENT_HITS = 64


class TurnBook(Protocol):
    """When each worker was last routed to (a dict in one process; `SharedTurns` across
    the frontend processes of a deployment)."""

    def get(self, worker_id: str, default: int, /) -> int: ...

    def __setitem__(self, worker_id: str, stamp: int, /) -> None: ...


class PeerRouting(Protocol):
    """The deployment's other frontend processes' routing, as the KV router reads and writes
    it (`frontend.load_table.SharedRouting`): their pending prefill blocks per worker, when
    each worker started on its current prefill (one clock, time.monotonic, for all), and
    their in-flight prompts' prefixes, before the workers' KV events report them."""

    def routed(self, worker_id: str, hashes: list[int]) -> None: ...

    def released(self, worker_id: str, hashes: list[int]) -> None: ...

    def pending_changed(self, worker_id: str, blocks: int) -> None: ...

    def prefill_started(self, worker_id: str, at: float) -> None: ...

    def peer_pending_since(self, worker_id: str) -> tuple[int, float]:
        """Their pending blocks there, and when it last started on a prompt (0.0: unseen)."""
        ...

    def peer_loads(self, worker_id: str) -> tuple[int, float, int]:
        """`peer_pending_since`, and their largest routed prompt blocks there (the tracker's
        `peer_blocks`), in one read: the cost model reads all three for every candidate."""
        ...

    def prefix_depths(
        self, hashes: list[int], known: Mapping[str, int] | None = None
    ) -> dict[str, int]:
        """Worker -> how deep their in-flight prompts share this prefix there; a worker
        `known` to hold the whole prompt need not be looked for."""
        ...


@dataclass
class WorkerScore:
    """How one candidate scored for one request (exposed for tests and benchmarks)."""

    worker_id: str
    overlap_blocks: int
    prefill_blocks: float  # the prefill term, before prefill_load_scale
    active_blocks: int  # the decode term: footprint + new blocks
    cost: float


class _InFlight:
    """One of our requests on a worker, from routing to its finish."""

    __slots__ = ("blocks", "hashes", "prefill", "since", "worker_id")

    def __init__(
        self, worker_id: str, hashes: list[int], blocks: int, prefill: int, since: float
    ) -> None:
        self.worker_id = worker_id
        self.hashes = hashes  # the prompt's full-block hashes (at the worker's block size)
        self.blocks = blocks  # all the prompt's blocks, the partial last one included
        self.prefill = prefill  # blocks still to compute when routed; 0 once it first output
        self.since = since  # when it was routed


class _OnWorker:
    """Our in-flight requests on one worker, summed as they start, prefill and finish
    (one lookup per candidate to score; kept, empty, while the worker has none)."""

    __slots__ = ("footprint", "partial", "pending", "queue")

    def __init__(self) -> None:
        self.footprint: Counter[int] = Counter()  # their prompts' full-block hashes
        self.partial = 0  # their prompts' partial last blocks
        self.pending = 0  # prefill blocks not computed yet
        self.queue: deque[_InFlight] = deque()  # oldest first (prefilled ones are skipped)


class _Terms:
    """The cost terms of one choice, one list entry per candidate in the candidates' order
    (plain lists: a WorkerScore per candidate cost more than the scoring itself, and only
    tests, benchmarks and the debug log read them: `scores` builds them)."""

    __slots__ = (
        "actives", "candidates", "costs", "min_block_size", "overlaps", "pendings", "prefills"
    )  # fmt: skip

    def __init__(
        self,
        candidates: Sequence[WorkerCard],
        overlaps: list[int],
        prefills: list[float],
        pendings: list[float],
        actives: list[int],
        costs: list[float],
        min_block_size: int,
    ) -> None:
        self.candidates = candidates
        self.overlaps = overlaps  # cached prefix blocks
        self.prefills = prefills  # the prefill term, before prefill_load_scale
        self.pendings = pendings  # its estimated part: our prefills queued there
        self.actives = actives  # the decode term: footprint + new blocks
        self.costs = costs
        self.min_block_size = min_block_size

    def scores(self) -> list[WorkerScore]:
        terms = zip(
            self.candidates, self.overlaps, self.prefills, self.actives, self.costs, strict=True
        )
        return [
            WorkerScore(card.worker_id, overlap, prefill, active, cost)
            for card, overlap, prefill, active, cost in terms
        ]


_NOTHING_RELEASED: tuple[object, int] = (None, 0)


class PrefillRate:
    """How fast one worker computes prompt blocks, learned from its first outputs: each
    sample is a request's prefill blocks over the time from when the worker could start
    on them (routed, or the previous prefill there ended) to its first output. Blocks and
    seconds are decayed sums (not a mean of ratios), so long prefills, whose timing the
    fixed latencies barely touch, weigh most."""

    __slots__ = ("blocks", "seconds")

    DECAY = 0.9  # each sample keeps this much of the ones before it

    def __init__(self) -> None:
        self.blocks = 0.0
        self.seconds = 0.0

    def add(self, blocks: int, seconds: float) -> None:
        if blocks <= 0 or seconds <= 0:
            return
        self.blocks = self.blocks * self.DECAY + blocks
        self.seconds = self.seconds * self.DECAY + seconds

    @property
    def per_second(self) -> float:
        """Blocks per second; 0 until the first sample (no progress is assumed then)."""
        return self.blocks / self.seconds if self.seconds > 0 else 0.0


class KvRouter:
    """The `Router` for `frontend.router: kv`; also a WorkerDirectory listener."""

    def __init__(
        self,
        config: KvRouterConfig,
        index: KvIndex,
        tracker: LoadTracker,
        *,
        publishes: Callable[[str], bool] | None = None,
        seed: int | None = None,
        forget_after_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`publishes(worker_id)`: whether the worker ever reported a cached block (the
        KV index feed knows); None: every worker is taken to publish."""
        self.config = config
        self.index = index
        self.routed = RoutedPrefixIndex(config.approx_ttl_s)
        self.tracker = tracker
        self._publishes = publishes
        self._random = random.Random(seed)
        self._forget_after_s = forget_after_s
        self._clock = clock
        self._in_flight: dict[str, _InFlight] = {}
        self._on_worker: dict[str, _OnWorker] = {}
        # worker -> when it started on its pending prefills (the first routed onto an idle
        # worker, or the last first output there), and how fast it computes them
        self._prefill_start: dict[str, float] = {}
        self._prefill_rate: dict[str, PrefillRate] = {}
        # worker -> (the report current when our requests finished, blocks they released)
        self._released: dict[str, tuple[object, int]] = {}
        self._silent_since: dict[str, float] = {}  # first finish seen without any KV event
        self._warned: set[str] = set()
        self._warned_block_size: set[str] = set()
        # worker -> when we last routed to it (the debug log's idle time)
        self._last_routed: dict[str, float] = {}
        # worker -> the stamp of our last choice of it: our choices' numbers, so turns follow
        # the routing order (clock readings can be equal: a simulated clock, a coarse one);
        # with several frontend processes the deployment's turns instead (`share_turns`)
        self._turn: TurnBook = {}
        self._turn_stamp: Callable[[], int] = itertools.count(1).__next__
        # the workers the latest _RECENT_HITS requests with a cache hit went to, and how
        # many of them each got (its cache's demand)
        self._recent_hits: deque[str] = deque()
        self._hit_demand: Counter[str] = Counter()
        self._last_terms: _Terms | None = None
        self._peers: PeerRouting | None = None  # the other frontend processes (share_routing)
        tracker.finish_listeners.append(self.request_finished)
        tracker.prefill_listeners.append(self.request_prefilled)

    # ----- registration --------------------------------------------------------------------
    def on_workers_changed(self, workers: Mapping[str, WorkerCard]) -> None:
        for request_id, entry in list(self._in_flight.items()):
            if entry.worker_id not in workers:
                self._drop(request_id)
        for worker_id in self.routed.workers:
            if worker_id not in workers:
                self.routed.drop_worker(worker_id)
        for worker_id in list(self._hit_demand):
            if worker_id not in workers:
                del self._hit_demand[worker_id]
        self._recent_hits = deque(w for w in self._recent_hits if w in workers)
        tables = (
            self._released, self._silent_since, self._prefill_start, self._prefill_rate,
            self._on_worker,
        )  # fmt: skip
        for table in tables:
            for worker_id in list(table):
                if worker_id not in workers:
                    del table[worker_id]
        self._warned &= set(workers)
        size = self.config.block_size
        for card in workers.values():
            if (
                size is not None
                and card.block_size != size
                and card.worker_id not in (self._warned_block_size)
            ):
                self._warned_block_size.add(card.worker_id)
                logger.warning(
                    "frontend.kv_router.block_size %d is ignored for worker %s: prompts are "
                    "hashed at the worker's own block size %d (drop the setting)",
                    size, card.worker_id, card.block_size,
                )  # fmt: skip

    # ----- in-flight accounting ------------------------------------------------------------
    def request_prefilled(self, request_id: str) -> None:
        """Its prompt is computed: no more pending prefill on its worker, which starts on
        the next one now (the engine schedules prompts first come, first served); how long
        this one took since the worker could start on it is a sample of the worker's rate."""
        entry = self._in_flight.get(request_id)
        if entry is None or not entry.prefill:
            return
        worker_id = entry.worker_id
        now = self._clock()
        began = max(entry.since, self._prefill_start.get(worker_id, entry.since))
        rate = self._prefill_rate.get(worker_id)
        if rate is None:
            rate = self._prefill_rate[worker_id] = PrefillRate()
        rate.add(entry.prefill, now - began)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "kv prefilled %s on %s: %d blocks in %.3f s (%.3f s since routed); "
                "rate %.0f blocks/s",
                request_id, worker_id, entry.prefill, now - began, now - entry.since,
                rate.per_second,
            )  # fmt: skip
        on = self._on_worker[worker_id]
        on.pending -= entry.prefill
        entry.prefill = 0
        self._prefill_start[worker_id] = now
        peers = self._peers
        if peers is not None:
            peers.pending_changed(worker_id, on.pending)
            peers.prefill_started(worker_id, now)

    def request_finished(self, request_id: str) -> None:
        entry = self._in_flight.pop(request_id, None)
        if entry is not None:
            if entry.hashes:
                self._note_silence(entry.worker_id)
            self._release(entry)

    def _drop(self, request_id: str) -> None:
        entry = self._in_flight.pop(request_id, None)
        if entry is not None:
            self._release(entry)

    def _release(self, entry: _InFlight) -> None:
        """Take a request that left `_in_flight` out of its worker's sums."""
        worker_id = entry.worker_id
        on = self._on_worker[worker_id]
        partial = entry.blocks - len(entry.hashes)
        freed = partial  # blocks only this request held: its partial one, and ...
        footprint = on.footprint
        for h in entry.hashes:
            left = footprint.get(h, 0) - 1
            if left > 0:
                footprint[h] = left
            else:  # ... the full ones no other of our requests there holds
                footprint.pop(h, None)
                freed += 1
        report = self.tracker.metrics.get(worker_id)
        seen, released = self._released.get(worker_id, _NOTHING_RELEASED)
        self._released[worker_id] = (report, released + freed if seen is report else freed)
        on.partial -= partial
        peers = self._peers
        if peers is not None:
            peers.released(worker_id, entry.hashes)
        if entry.prefill:  # ended before its first output
            on.pending -= entry.prefill
            if entry is self._prefill_head(on):  # the worker moves on now
                now = self._prefill_start[worker_id] = self._clock()
                if peers is not None:
                    peers.prefill_started(worker_id, now)
            entry.prefill = 0
            if peers is not None:
                peers.pending_changed(worker_id, on.pending)

    def _forget_stale(self, now: float) -> None:
        """Requests routed but never sent (e.g. rejected as too long) must not count forever."""
        if not self._in_flight:
            return
        oldest = next(iter(self._in_flight.values()))  # in routing order: oldest first
        if now - oldest.since <= self._forget_after_s:
            return
        stale = []
        for request_id, entry in self._in_flight.items():
            if now - entry.since <= self._forget_after_s:
                break
            stale.append(request_id)
        for request_id in stale:
            self._drop(request_id)

    def own_blocks(self, worker_id: str) -> int:
        """The distinct KV blocks our in-flight requests' prompts hold on `worker_id`."""
        on = self._on_worker.get(worker_id)
        return len(on.footprint) + on.partial if on is not None else 0

    def pending_prefill(self, worker_id: str) -> float:
        """Prefill blocks our requests still wait for on `worker_id`: those routed there
        without a first output yet, less what the worker has computed of them since it
        started on them at its measured rate. Counting each prompt whole until its first
        output made a worker that had nearly finished a prefill look as busy as one that
        had just got it (issue 14: no-prefix load lost to round robin). The progress runs
        through every prompt queued there, to the last block: engines chunk prefill, so the
        next prompt's blocks start in the last steps of one (issue 14, fourth round: capped
        at the oldest prompt, two prompts routed together looked busier than one just
        begun, and requests arriving together paired up on one worker for good); an overdue
        prefill is not done until a first output says so."""
        on = self._on_worker.get(worker_id)
        if self._peers is not None:
            others, start = self._peers.peer_pending_since(worker_id)
            return self._deployment_pending(worker_id, on, others, start, self._clock())
        if on is None or not on.pending:
            return 0
        prefilling = self._prefill_head(on) is not None
        start = self._prefill_start.get(worker_id) if prefilling else None
        return self._less_progress(worker_id, on.pending, start, self._clock())

    def _deployment_pending(
        self, worker_id: str, on: _OnWorker | None, others: int, start: float, now: float
    ) -> float:
        """`pending_prefill` with several frontend processes: every process's pending
        blocks there (`others`: the other processes'), less the worker's progress since it
        last started on a prompt as any process saw it (`start`: a first output, or a prompt
        routed to it with nothing pending), at the rate this process learned."""
        pending = others + on.pending if on is not None else others
        if pending <= 0:
            return 0
        return self._less_progress(
            worker_id, pending, start or self._prefill_start.get(worker_id, now), now
        )

    def _less_progress(
        self, worker_id: str, pending: float, start: float | None, now: float
    ) -> float:
        """`pending` blocks less what the worker has computed since `start` at the rate this
        process learned, never below one block: an overdue prefill is not done until a first
        output says so."""
        rate = self._prefill_rate.get(worker_id)
        if rate is None or start is None or not self.config.prefill_progress:
            return pending
        done = rate.per_second * (now - start if now > start else 0.0)
        return pending - min(done, pending - 1.0)

    @staticmethod
    def _prefill_head(on: _OnWorker) -> _InFlight | None:
        """The oldest of our requests still prefilling on a worker (the one it works on)."""
        queue = on.queue
        while queue and not queue[0].prefill:  # prefilled or gone: the next one's turn
            queue.popleft()
        return queue[0] if queue else None

    def _reported_active(self, worker_id: str) -> int:
        report = self.tracker.metrics.get(worker_id)
        if report is None:
            return 0
        seen, released = self._released.get(worker_id, (None, 0))
        if seen is report:  # the report predates these finishes: it still counts them
            return max(0, report.active_blocks - released)
        return report.active_blocks

    # ----- workers without KV events -------------------------------------------------------
    def publishes(self, worker_id: str) -> bool:
        return self._publishes is None or self._publishes(worker_id)

    def _note_silence(self, worker_id: str) -> None:
        """A request with full blocks finished on `worker_id`: it should have stored some."""
        if self.publishes(worker_id):
            self._silent_since.pop(worker_id, None)
            return
        now = self._clock()
        since = self._silent_since.setdefault(worker_id, now)
        if now - since >= self.config.events_grace_s and worker_id not in self._warned:
            self._warned.add(worker_id)
            logger.warning(
                "worker %s has published no KV event %.0f s after serving requests: is its "
                "engine's KV event publishing off? Routing it by the prompts sent to it "
                "(approximate) instead",
                worker_id, now - since,
            )  # fmt: skip

    # ----- choosing ------------------------------------------------------------------------
    @property
    def last_scores(self) -> list[WorkerScore]:
        """How each candidate of the last `choose` scored (tests, benchmarks)."""
        return self._last_terms.scores() if self._last_terms is not None else []

    def scores(
        self,
        candidates: Sequence[WorkerCard],
        token_ids: Sequence[int],
        media: Sequence[MediaRef] = (),
        by_size: dict[int, list[int]] | None = None,
    ) -> list[WorkerScore]:
        """Each candidate's cost terms for a prompt, without routing it. `media`: the
        request's images (their blocks hash the image too: a different image is no prefix
        hit, the same one is). `by_size`: filled with the prompt's hashes at each candidate
        block size (for the caller to reuse)."""
        if by_size is None:
            by_size = {}
        return self._terms(candidates, token_ids, media, by_size).scores()

    def _terms(
        self,
        candidates: Sequence[WorkerCard],
        token_ids: Sequence[int],
        media: Sequence[MediaRef],
        by_size: dict[int, list[int]],
    ) -> _Terms:
        """The cost model of the module docstring, every candidate in one loop (on the
        request path: a few dict lookups per candidate, and a call only where our requests
        have prefill pending)."""
        config = self.config
        credit, scale, weight = config.overlap_credit, config.load_scale, config.uncached_weight
        on_worker = self._on_worker
        metrics, releases = self.tracker.metrics, self._released
        peer_blocks = self.tracker.peer_blocks
        tokens = len(token_ids)
        publishes = self._publishes
        peers = self._peers
        now = self._clock() if peers is not None else 0.0
        peer_depths: dict[str, int] = {}  # worker -> the prefix other processes routed there
        cached: dict[str, int] = {}  # worker -> its cached prefix in blocks, from KV events
        cached_size = 0  # the block size `cached` is for (of workers that publish them)
        overlaps: list[int] = []
        prefills: list[float] = []
        pendings: list[float] = []
        actives: list[int] = []
        costs: list[float] = []
        size_now, total, hashes = 0, 0, []
        ask_peers = False  # their in-flight prefixes at this block size: not read yet
        for card in candidates:
            worker_id, size = card.worker_id, card.block_size
            if size != size_now:  # the prompt at this block size (hashed once per size)
                size_now, total = size, -(-tokens // size)
                hashes = by_size.get(size)
                if hashes is None:
                    hashes = by_size[size] = prompt_hashes(token_ids, size, media)
                ask_peers = peers is not None
            if size != cached_size or (publishes is not None and not publishes(worker_id)):
                cached, cached_size = self._cached_prefixes(worker_id, size, hashes)
            if ask_peers:  # after the index: where it has the whole prompt, none can add
                assert peers is not None
                peer_depths = peers.prefix_depths(hashes, cached)
                ask_peers = False
            overlap = cached.get(worker_id, 0)
            if peer_depths:  # routed there by another process, its KV events still to come
                overlap = max(overlap, peer_depths.get(worker_id, 0))
            own = 0  # our in-flight prompts' distinct blocks there
            new = total  # the prompt's blocks it does not hold for a running request yet
            on = on_worker.get(worker_id)
            if on is not None:
                footprint = on.footprint
                own = len(footprint) + on.partial
                if footprint:
                    new -= sum(map(footprint.__contains__, hashes))
                    if overlap < len(hashes):  # our prompts' events still on the way
                        depth = 0
                        for h in hashes:
                            if h not in footprint:
                                break
                            depth += 1
                        overlap = max(overlap, depth)
            uncached = total - credit * overlap
            prefill = weight * uncached if uncached > 0 else 0.0
            pending = 0.0
            if peers is not None:  # every process's prompts there, and their routed blocks
                others, start, peer_routed = peers.peer_loads(worker_id)
                pending = self._deployment_pending(worker_id, on, others, start, now)
                prefill += pending
                routed = own + peer_routed
            else:
                if on is not None and on.pending:
                    pending = self.pending_prefill(worker_id)
                    prefill += pending
                # this process's routed blocks and the other frontend processes' (load_share)
                routed = own + peer_blocks.get(worker_id, 0)
            report = metrics.get(worker_id)
            if report is not None:
                reported = report.active_blocks
                seen, released = releases.get(worker_id, _NOTHING_RELEASED)
                if seen is report:  # the report predates these finishes: it still counts them
                    reported = reported - released if reported > released else 0
                if reported > routed:  # the larger of the two footprints
                    routed = reported
            active = routed + new
            overlaps.append(overlap)
            prefills.append(prefill)
            pendings.append(pending)
            actives.append(active)
            costs.append(scale * prefill + active)
        return _Terms(candidates, overlaps, prefills, pendings, actives, costs, min(by_size))

    def _cached_prefixes(
        self, worker_id: str, size: int, hashes: list[int]
    ) -> tuple[dict[str, int], int]:
        """The prompt's cached prefix on each worker holding its first block, at this block
        size: from the KV events (one walk of the index for all workers of that size), or for
        a worker that publishes none, from the prompts routed to it (`cached_size` 0: this
        walk serves that worker only)."""
        if self.publishes(worker_id):
            return self.index.prefix_depths(hashes), size
        return self.routed.prefix_depths(hashes), 0

    def choose(self, candidates: Sequence[WorkerCard], request: Any) -> WorkerCard:
        token_ids: Sequence[int] = request.token_ids
        media: Sequence[MediaRef] = getattr(request, "media", ())
        by_size: dict[int, list[int]] = {}
        terms = self._last_terms = self._terms(candidates, token_ids, media, by_size)
        picked = self._pick(terms, -(-len(token_ids) // terms.min_block_size))
        card = candidates[picked]
        worker_id = card.worker_id
        overlap = terms.overlaps[picked]
        now = self._clock()
        self._forget_stale(now)
        hashes = by_size[card.block_size]
        if self._publishes is not None and not self._publishes(worker_id):  # else: its events
            self.routed.routed(worker_id, hashes, now)
        request_id = getattr(request, "request_id", None)
        if request_id is not None:
            self._start(request_id, worker_id, hashes, -(-len(token_ids) // card.block_size),
                        overlap, now)  # fmt: skip
        if overlap:
            self._note_hit(worker_id)
        if logger.isEnabledFor(logging.DEBUG):  # what each candidate looked like, for tuning
            self._log_choice(request, terms, picked, now)
        self._last_routed[worker_id] = now
        self._turn[worker_id] = self._turn_stamp()
        return card

    def share_routing(self, peers: PeerRouting) -> None:
        """Route with the deployment's other frontend processes' pending prefill and
        in-flight prompts, and publish ours to them (`frontend.load_table.SharedRouting`)."""
        self._peers = peers
        for worker_id, on in self._on_worker.items():
            peers.pending_changed(worker_id, on.pending)
        for entry in self._in_flight.values():
            peers.routed(entry.worker_id, entry.hashes)

    def share_turns(self, turns: TurnBook, stamp: Callable[[], int]) -> None:
        """Take turns with the deployment's other frontend processes: `turns` holds when any
        of them last routed to each worker, on the clock `stamp` reads
        (`frontend.load_table.SharedTurns`)."""
        self._turn = turns
        self._turn_stamp = stamp

    def _start(
        self, request_id: str, worker_id: str, hashes: list[int], blocks: int, overlap: int,
        now: float,
    ) -> None:  # fmt: skip
        """Count a request routed to `worker_id` in its footprint and pending prefill."""
        if request_id in self._in_flight:
            self._drop(request_id)
        prefill = max(blocks - overlap, 1)
        on = self._on_worker.get(worker_id)
        if on is None:
            on = self._on_worker[worker_id] = _OnWorker()
        peers = self._peers
        if not on.pending:  # it starts on this prompt now
            self._prefill_start[worker_id] = now
            on.queue.clear()
            if peers is not None and not peers.peer_pending_since(worker_id)[0]:  # nothing
                peers.prefill_started(worker_id, now)
        entry = _InFlight(worker_id, hashes, blocks, prefill, now)
        self._in_flight[request_id] = entry
        on.queue.append(entry)
        on.footprint.update(hashes)
        on.partial += blocks - len(hashes)
        on.pending += prefill
        if peers is not None:
            peers.pending_changed(worker_id, on.pending)
            peers.routed(worker_id, hashes)

    def _log_choice(self, request: Any, terms: _Terms, picked: int, now: float) -> None:
        scores = terms.scores()
        pick = scores[picked]
        logger.debug(
            "kv route %s (client %s) → %s (overlap %d blocks, cost %.1f); candidates: %s",
            getattr(request, "request_id", None), getattr(request, "client_id", None),
            pick.worker_id, pick.overlap_blocks, pick.cost,
            " ".join(
                f"{s.worker_id}[n={self.tracker.requests_on(s.worker_id)} "
                f"hit={s.overlap_blocks} demand={self.hit_demand(s.worker_id)} "
                f"prefill={s.prefill_blocks:.0f} "
                f"pending={self.pending_prefill(s.worker_id):.0f} "
                f"reported={self._reported_active(s.worker_id)} "
                f"routed={self.own_blocks(s.worker_id)} decode={s.active_blocks} "
                f"cost={s.cost:.0f} idle={now - self._last_routed.get(s.worker_id, now):.2f}s]"
                for s in scores
            ),
        )  # fmt: skip

    def _note_hit(self, worker_id: str) -> None:
        self._recent_hits.append(worker_id)
        self._hit_demand[worker_id] += 1
        if len(self._recent_hits) > _RECENT_HITS:
            oldest = self._recent_hits.popleft()
            self._hit_demand[oldest] -= 1
            if not self._hit_demand[oldest]:
                del self._hit_demand[oldest]

    def hit_demand(self, worker_id: str) -> int:
        """How many of the latest cache hits went to `worker_id`: how many requests its
        cached prefixes draw, each of which waits for any prefill it starts meanwhile."""
        return self._hit_demand.get(worker_id, 0)

    def _pick(self, terms: _Terms, prompt_blocks: int) -> int:
        """The index of the chosen candidate."""
        costs, prefills = terms.costs, terms.prefills
        lowest = min(costs)
        best = costs.index(lowest)  # the first cheapest, in the candidates' order
        temperature = self.config.router_temperature
        if temperature > 0:
            weights = [math.exp(-(cost - lowest) / temperature) for cost in costs]
            return self._random.choices(range(len(costs)), weights=weights, k=1)[0]
        if (
            self.config.turns_without_hits
            and self.config.tie_band > 0
            and not self._hit_demand
            and not any(terms.overlaps)
        ):
            return self._take_turns(terms, prompt_blocks, best)
        limit = lowest + self.config.tie_band * prompt_blocks
        # the pending prefill is an estimate (issue 14, fifth round: through HTTP it was off
        # by ~0.2 s of prefill either way): differences within the slack do not count
        slack = self.config.pending_tolerance * prompt_blocks
        pendings = terms.pendings

        def least_possible(i: int) -> float:
            return prefills[i] - min(pendings[i], slack)

        best_prefill = prefills[best]
        tied = [
            i for i, cost in enumerate(costs)
            if cost <= limit and least_possible(i) <= best_prefill
        ]  # fmt: skip
        if len(tied) == 1:  # the cheapest alone
            return best
        # a prefill holds up every request running where it lands: at most one more than
        # at the cheapest where the worker's cache draws hits (a hot worker's many hits
        # share few blocks, but all wait); a worker drawing none has no hits for it to hold
        # up (its requests' own prefills are in its prefill term already)
        # each count read once: with several frontend processes they are live readings of
        # the shared load table, and a second reading could drop every worker, the cheapest too
        candidates, last, demand = terms.candidates, self._turn, self._hit_demand
        on = {i: self.tracker.requests_on(candidates[i].worker_id) for i in tied}
        most = on[best] + 1
        tied = [
            i for i in tied if on[i] <= most or not demand.get(candidates[i].worker_id)
        ]  # fmt: skip
        if len(tied) == 1:
            return tied[0]
        # the least prefill ahead (time to first token is made of it; estimates within the
        # slack of each other are equal, but nothing pending is known exactly and beats
        # them), then the least demand for its cache (the hits that would wait for this
        # prefill), then the least recently routed: its earlier requests have had the
        # longest to prefill
        least = min(prefills[i] for i in tied)
        clear = [i for i in tied if not pendings[i] and prefills[i] == least]
        tied = clear or [i for i in tied if least_possible(i) <= least]

        def tie_break(i: int) -> tuple[int, int, str]:
            worker_id = candidates[i].worker_id
            return demand.get(worker_id, 0), last.get(worker_id, -1), worker_id

        return min(tied, key=tie_break)

    def _take_turns(self, terms: _Terms, prompt_blocks: int, best: int) -> int:
        """The choice where no cache is involved (no candidate holds any of the prompt, no
        worker's cache draws hits): the least recently routed worker among those whose
        pending prefill is within one prompt of the least (the tie band over the prefill's
        weight) and whose decode blocks are within the tie band of the least, one with
        nothing pending first. The two terms are bounded each on its own, not by their
        sum: there a worker whose extra requests only decode and whose pending prefill is a
        little above another's looked one prompt dearer and lost its turn, as did pending
        estimates a little apart, and each such departure from turns moved the closed loop
        off round robin's (issue 14, sixth round: replays in simulated time lost up to 8 %
        of mean TTFT to a handful of them); nothing pending is known exactly and still
        beats an estimate."""
        config = self.config
        pendings, actives, candidates = terms.pendings, terms.actives, terms.candidates
        band = config.tie_band * prompt_blocks  # in cost: prefill blocks weigh load_scale
        scale = config.load_scale
        most_pending = min(pendings) + (band / scale if scale > 0 else math.inf)
        most_active = min(actives) + band
        pool = [
            i for i, (pending, active) in enumerate(zip(pendings, actives, strict=True))
            if pending <= most_pending and active <= most_active
        ]  # fmt: skip
        if not pool:  # the least pending and the least decode are far apart: the cost decides
            return best
        pool = [i for i in pool if not pendings[i]] or pool
        last = self._turn

        def turn(i: int) -> tuple[int, str]:
            worker_id = candidates[i].worker_id
            return last.get(worker_id, -1), worker_id

        return min(pool, key=turn)


def prompt_hashes(
    token_ids: Sequence[int], block_size: int, media: Sequence[MediaRef] = ()
) -> list[int]:
    """The full-block hashes of a prompt as its worker's engine computes them: blocks with
    image positions hash the image's content too (`contract.block_hash`)."""
    if not media:
        return block_hashes(token_ids, block_size)
    extras = media_block_extras(
        ((ref.offset, ref.length, ref.content_hash) for ref in media), block_size
    )
    return block_hashes(token_ids, block_size, extras)
