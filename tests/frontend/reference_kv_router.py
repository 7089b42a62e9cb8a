"""FROZEN REFERENCE, not used by the package: `frontend/kv_router.py` as of main d8bb23d
(each candidate scored through method calls and a WorkerScore; its module docstring, which
explains the rules, is left out here). tests/frontend/test_kv_router_replay.py checks that the
faster KvRouter makes the same choices on random traces. Do not edit: it is the behaviour the
fast code must keep."""

from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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


@dataclass
class WorkerScore:
    """How one candidate scored for one request (exposed for tests and benchmarks)."""

    worker_id: str
    overlap_blocks: int
    prefill_blocks: float  # the prefill term, before prefill_load_scale
    active_blocks: int  # the decode term: footprint + new blocks
    cost: float


@dataclass
class _InFlight:
    worker_id: str
    hashes: list[int]  # the prompt's full-block hashes (at the worker's block size)
    blocks: int  # all the prompt's blocks, the partial last one included
    prefill: int  # blocks still to compute when routed; 0 once the first output came
    since: float  # when it was routed


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
        self._footprint: dict[str, Counter[int]] = {}  # worker -> our prompts' block hashes
        self._partial: dict[str, int] = {}  # worker -> our prompts' partial last blocks
        self._pending: dict[str, int] = {}  # worker -> prefill blocks not computed yet
        # worker -> when it started on its pending prefills (the first routed onto an idle
        # worker, or the last first output there), and how fast it computes them
        self._prefill_start: dict[str, float] = {}
        # worker -> our requests routed there, oldest first (those prefilled are skipped)
        self._prefill_queue: dict[str, deque[_InFlight]] = {}
        self._prefill_rate: dict[str, PrefillRate] = {}
        # worker -> (the report current when our requests finished, blocks they released)
        self._released: dict[str, tuple[object, int]] = {}
        self._silent_since: dict[str, float] = {}  # first finish seen without any KV event
        self._warned: set[str] = set()
        self._warned_block_size: set[str] = set()
        self._last_routed: dict[str, float] = {}  # worker -> when we last routed to it
        # the workers the latest _RECENT_HITS requests with a cache hit went to, and how
        # many of them each got (its cache's demand)
        self._recent_hits: deque[str] = deque()
        self._hit_demand: Counter[str] = Counter()
        self.last_scores: list[WorkerScore] = []
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
            self._prefill_queue,
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
        rate = self._prefill_rate.setdefault(worker_id, PrefillRate())
        rate.add(entry.prefill, now - began)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "kv prefilled %s on %s: %d blocks in %.3f s (%.3f s since routed); "
                "rate %.0f blocks/s",
                request_id, worker_id, entry.prefill, now - began, now - entry.since,
                rate.per_second,
            )  # fmt: skip
        self._add(self._pending, worker_id, -entry.prefill)
        entry.prefill = 0
        self._prefill_start[worker_id] = now

    def request_finished(self, request_id: str) -> None:
        entry = self._in_flight.get(request_id)
        if entry is not None and entry.hashes:
            self._note_silence(entry.worker_id)
        self._drop(request_id)

    def _drop(self, request_id: str) -> None:
        entry = self._in_flight.pop(request_id, None)
        if entry is None:
            return
        worker_id = entry.worker_id
        report = self.tracker.metrics.get(worker_id)
        seen, released = self._released.get(worker_id, (None, 0))
        footprint = self._footprint.get(worker_id, Counter())
        freed = sum(1 for h in set(entry.hashes) if footprint.get(h, 0) == 1)
        freed += entry.blocks - len(entry.hashes)
        released = released + freed if seen is report else freed
        self._released[worker_id] = (report, released)
        _subtract(self._footprint, worker_id, entry.hashes)
        self._add(self._partial, worker_id, -(entry.blocks - len(entry.hashes)))
        if entry.prefill:  # ended before its first output
            self._add(self._pending, worker_id, -entry.prefill)
            if entry is self._prefill_head(worker_id):  # the worker moves on now
                self._prefill_start[worker_id] = self._clock()
            entry.prefill = 0

    @staticmethod
    def _add(table: dict[str, int], worker_id: str, amount: int) -> None:
        left = table.get(worker_id, 0) + amount
        if left > 0:
            table[worker_id] = left
        else:
            table.pop(worker_id, None)

    def _forget_stale(self, now: float) -> None:
        """Requests routed but never sent (e.g. rejected as too long) must not count forever."""
        stale = []
        for request_id, entry in self._in_flight.items():  # in routing order: oldest first
            if now - entry.since <= self._forget_after_s:
                break
            stale.append(request_id)
        for request_id in stale:
            self._drop(request_id)

    def own_blocks(self, worker_id: str) -> int:
        """The distinct KV blocks our in-flight requests' prompts hold on `worker_id`."""
        return len(self._footprint.get(worker_id, ())) + self._partial.get(worker_id, 0)

    def pending_prefill(self, worker_id: str) -> float:
        """Prefill blocks our requests still wait for on `worker_id`: those routed there
        without a first output yet, less what the worker has computed of them since it
        started on them at its measured rate. Counting each prompt whole until its first
        output made a worker that had nearly finished a prefill look as busy as one that
        had just got it (issue 14: no-prefix load lost to round robin). The progress runs
        through the oldest prompt only, to its last block: an overdue prefill is not done
        until its first output says so, and the prompts after it have not started."""
        pending = self._pending.get(worker_id, 0)
        if not pending:
            return 0
        rate = self._prefill_rate.get(worker_id)
        if rate is None or not self.config.prefill_progress:
            return pending
        head = self._prefill_head(worker_id)
        done = rate.per_second * max(self._clock() - self._prefill_start[worker_id], 0.0)
        return pending - min(done, head.prefill - 1.0) if head is not None else pending

    def _prefill_head(self, worker_id: str) -> _InFlight | None:
        """The oldest of our requests still prefilling on `worker_id` (the one it works on)."""
        queue = self._prefill_queue.get(worker_id)
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
    def scores(
        self,
        candidates: Sequence[WorkerCard],
        token_ids: Sequence[int],
        media: Sequence[MediaRef] = (),
        by_size: dict[int, list[int]] | None = None,
    ) -> list[WorkerScore]:
        """`media`: the request's images (their blocks hash the image too: a different
        image is no prefix hit, the same one is). `by_size`: filled with the prompt's
        hashes at each candidate block size (for the caller to reuse)."""
        credit, scale = self.config.overlap_credit, self.config.load_scale
        uncached_weight = self.config.uncached_weight
        if by_size is None:
            by_size = {}
        overlaps = self._overlaps(candidates, token_ids, media, by_size)
        peer_blocks = self.tracker.peer_blocks
        result = []
        for card in candidates:
            worker_id = card.worker_id
            hashes = by_size[card.block_size]
            total = -(-len(token_ids) // card.block_size)
            overlap = overlaps[worker_id]
            footprint = self._footprint.get(worker_id)
            new = total - sum(map(footprint.__contains__, hashes)) if footprint else total
            uncached = max(total - credit * overlap, 0.0)
            prefill = self.pending_prefill(worker_id) + uncached_weight * uncached
            # this process's routed blocks and the other frontend processes' (load_share)
            routed = self.own_blocks(worker_id) + peer_blocks.get(worker_id, 0)
            active = max(self._reported_active(worker_id), routed) + new
            cost = scale * prefill + active
            result.append(WorkerScore(worker_id, overlap, prefill, active, cost))
        return result

    def _overlaps(
        self,
        candidates: Sequence[WorkerCard],
        token_ids: Sequence[int],
        media: Sequence[MediaRef],
        by_size: dict[int, list[int]],
    ) -> dict[str, int]:
        """Each candidate's cached prefix of the prompt, in blocks: one walk of the index
        per block size for all candidates that publish KV events (one walk per candidate
        cost ~4 us each at 8 workers, on the c=1 path), the routed-prompt index for the
        others; a prefix our in-flight requests put there counts even before its events."""
        groups: dict[tuple[int, bool], list[str]] = {}
        sizes: dict[str, int] = {}
        for card in candidates:
            size = sizes[card.worker_id] = card.block_size
            if size not in by_size:
                by_size[size] = prompt_hashes(token_ids, size, media)
            groups.setdefault((size, self.publishes(card.worker_id)), []).append(card.worker_id)
        result: dict[str, int] = {}
        for (size, publishes), worker_ids in groups.items():
            index = self.index if publishes else self.routed
            result.update(index.overlaps(by_size[size], worker_ids))
        for worker_id, cached in result.items():
            in_flight = self._footprint.get(worker_id)
            if not in_flight:
                continue
            hashes = by_size[sizes[worker_id]]
            if cached < len(hashes):  # events still on the way, or not yet stored
                depth = 0
                for h in hashes:
                    if h not in in_flight:
                        break
                    depth += 1
                result[worker_id] = max(cached, depth)
        return result

    def choose(self, candidates: Sequence[WorkerCard], request: Any) -> WorkerCard:
        token_ids: Sequence[int] = request.token_ids
        media: Sequence[MediaRef] = getattr(request, "media", ())
        by_size: dict[int, list[int]] = {}
        scores = self.scores(candidates, token_ids, media, by_size)
        self.last_scores = scores
        size = min(card.block_size for card in candidates)
        pick = self._pick(scores, -(-len(token_ids) // size))
        card = next(c for c in candidates if c.worker_id == pick.worker_id)
        now = self._clock()
        self._forget_stale(now)
        hashes = by_size[card.block_size]
        if not self.publishes(card.worker_id):  # scored from its events otherwise
            self.routed.routed(card.worker_id, hashes, now)
        request_id = getattr(request, "request_id", None)
        if request_id is not None:
            self._drop(request_id)
            worker_id = card.worker_id
            blocks = -(-len(token_ids) // card.block_size)
            prefill = max(blocks - pick.overlap_blocks, 1)
            if not self._pending.get(worker_id):
                self._prefill_start[worker_id] = now
                self._prefill_queue.pop(worker_id, None)
            entry = _InFlight(worker_id, hashes, blocks, prefill, now)
            self._in_flight[request_id] = entry
            self._prefill_queue.setdefault(worker_id, deque()).append(entry)
            self._footprint.setdefault(worker_id, Counter()).update(hashes)
            self._add(self._partial, worker_id, blocks - len(hashes))
            self._add(self._pending, worker_id, prefill)
        if pick.overlap_blocks:
            self._note_hit(card.worker_id)
        if logger.isEnabledFor(logging.DEBUG):  # what each candidate looked like, for tuning
            logger.debug(
                "kv route %s (client %s) → %s (overlap %d blocks, cost %.1f); candidates: %s",
                request_id, getattr(request, "client_id", None), card.worker_id,
                pick.overlap_blocks, pick.cost,
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
        self._last_routed[card.worker_id] = now
        return card

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

    def _pick(self, scores: list[WorkerScore], prompt_blocks: int) -> WorkerScore:
        best = min(scores, key=lambda s: s.cost)
        lowest = best.cost
        temperature = self.config.router_temperature
        if temperature <= 0:
            band = self.config.tie_band * prompt_blocks
            # a prefill holds up every request running where it lands: at most one more
            # than at the cheapest (a hot worker's many hits share few blocks, but all wait)
            most = self.tracker.requests_on(best.worker_id) + 1
            tied = [
                s for s in scores
                if s.cost <= lowest + band and s.prefill_blocks <= best.prefill_blocks
                and self.tracker.requests_on(s.worker_id) <= most
            ]  # fmt: skip
            if len(tied) == 1:
                return tied[0]
            # the least prefill ahead (time to first token is made of it), then the least
            # demand for its cache (the hits that would wait for this prefill), then the
            # least recently routed: its earlier requests have had the longest to prefill
            last, demand = self._last_routed, self._hit_demand
            return min(
                tied,
                key=lambda s: (
                    s.prefill_blocks, demand.get(s.worker_id, 0),
                    last.get(s.worker_id, -math.inf), s.worker_id,
                ),
            )  # fmt: skip
        weights = [math.exp(-(score.cost - lowest) / temperature) for score in scores]
        return self._random.choices(scores, weights=weights, k=1)[0]


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


def _subtract(table: dict[str, Counter[int]], worker_id: str, hashes: Sequence[int]) -> None:
    counter = table.get(worker_id)
    if counter is None:
        return
    for h in hashes:
        left = counter.get(h, 0) - 1
        if left > 0:
            counter[h] = left
        else:
            counter.pop(h, None)
    if not counter:
        del table[worker_id]
