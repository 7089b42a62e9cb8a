"""KV-aware routing: send a request where its prompt prefix is already cached, unless busy.

Per candidate worker:

    cost = overlap_score_weight × prefill_blocks + active_blocks

- `prefill_blocks`: the request's prompt blocks minus the leading blocks the worker already
  caches (from the `KvIndex`): the prefill work the worker would still do;
- `active_blocks`: KV blocks held by running sequences: the larger of what the worker last
  reported (`LoadMetrics.active_blocks`, which also sees other frontends' requests but lags)
  and this router's own in-flight accounting (prompt blocks of requests it routed that have
  not finished, always current). The larger one, not the sum: the report includes ours;
  and a report that predates some of our finished requests is reduced by their blocks, so a
  stale report does not repel the next turn of a conversation from the worker that has it.

Temperature 0 picks the cheapest worker (ties at random); temperature > 0 samples with
softmax(-(cost - min cost) / temperature). Prompt block hashes come from `contract.block_hash`
at the configured block size; a worker with another block size would be mis-scored, so it is
refused for KV routing (logged once as an error) instead of being silently mis-routed.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from contract.block_hash import block_hashes
from contract.config import KvRouterConfig
from contract.discovery import WorkerCard
from frontend import errors
from frontend.kv_index import KvIndex
from frontend.router import LoadTracker

logger = logging.getLogger(__name__)


@dataclass
class WorkerScore:
    """How one candidate scored for one request (exposed for tests and benchmarks)."""

    worker_id: str
    overlap_blocks: int
    prefill_blocks: int
    active_blocks: int
    cost: float


@dataclass
class _InFlight:
    worker_id: str
    blocks: int
    since: float


class KvRouter:
    """The `Router` for `frontend.router: kv`; also a WorkerDirectory listener."""

    def __init__(
        self,
        config: KvRouterConfig,
        index: KvIndex,
        tracker: LoadTracker,
        *,
        seed: int | None = None,
        forget_after_s: float = 3600.0,
    ) -> None:
        self.config = config
        self.index = index
        self.tracker = tracker
        self._random = random.Random(seed)
        self._forget_after_s = forget_after_s
        self._refused: set[str] = set()
        self._in_flight: dict[str, _InFlight] = {}
        self._own_blocks: dict[str, int] = {}
        # worker -> (the report current when our requests finished, blocks they released)
        self._released: dict[str, tuple[object, int]] = {}
        self.last_scores: list[WorkerScore] = []
        tracker.finish_listeners.append(self.request_finished)

    # ----- registration --------------------------------------------------------------------
    def accepts(self, card: WorkerCard) -> bool:
        """False (and one error log) for a worker whose block size differs from ours."""
        if card.block_size == self.config.block_size:
            self._refused.discard(card.worker_id)
            return True
        if card.worker_id not in self._refused:
            self._refused.add(card.worker_id)
            logger.error(
                "worker %s refused for KV routing: its block_size %d differs from "
                "frontend.kv_router.block_size %d (set engine.block_size and "
                "frontend.kv_router.block_size to the same value)",
                card.worker_id, card.block_size, self.config.block_size,
            )  # fmt: skip
        return False

    def on_workers_changed(self, workers: Mapping[str, WorkerCard]) -> None:
        for card in workers.values():
            self.accepts(card)
        self._refused &= set(workers)
        for request_id, entry in list(self._in_flight.items()):
            if entry.worker_id not in workers:
                self._drop(request_id)
        for worker_id in list(self._released):
            if worker_id not in workers:
                del self._released[worker_id]

    # ----- in-flight accounting ------------------------------------------------------------
    def request_finished(self, request_id: str) -> None:
        self._drop(request_id)

    def _drop(self, request_id: str) -> None:
        entry = self._in_flight.pop(request_id, None)
        if entry is not None:
            report = self.tracker.metrics.get(entry.worker_id)
            seen, released = self._released.get(entry.worker_id, (None, 0))
            released = released + entry.blocks if seen is report else entry.blocks
            self._released[entry.worker_id] = (report, released)
            left = self._own_blocks.get(entry.worker_id, 0) - entry.blocks
            if left > 0:
                self._own_blocks[entry.worker_id] = left
            else:
                self._own_blocks.pop(entry.worker_id, None)

    def _forget_stale(self, now: float) -> None:
        """Requests routed but never sent (e.g. rejected as too long) must not count forever."""
        stale = [rid for rid, e in self._in_flight.items() if now - e.since > self._forget_after_s]
        for request_id in stale:
            self._drop(request_id)

    def own_blocks(self, worker_id: str) -> int:
        return self._own_blocks.get(worker_id, 0)

    def _reported_active(self, worker_id: str) -> int:
        report = self.tracker.metrics.get(worker_id)
        if report is None:
            return 0
        seen, released = self._released.get(worker_id, (None, 0))
        if seen is report:  # the report predates these finishes: it still counts them
            return max(0, report.active_blocks - released)
        return report.active_blocks

    # ----- choosing ------------------------------------------------------------------------
    def scores(
        self, candidates: Sequence[WorkerCard], token_ids: Sequence[int]
    ) -> list[WorkerScore]:
        hashes = block_hashes(token_ids, self.config.block_size)
        total_blocks = -(-len(token_ids) // self.config.block_size)
        overlaps = self.index.overlaps(hashes, [card.worker_id for card in candidates])
        weight = self.config.overlap_score_weight
        result = []
        for card in candidates:
            overlap = overlaps.get(card.worker_id, 0)
            prefill = total_blocks - overlap
            routed = self.own_blocks(card.worker_id) + self.tracker.peer_blocks.get(
                card.worker_id, 0
            )  # this process's and the other frontend processes' (frontend.load_share)
            active = max(self._reported_active(card.worker_id), routed)
            result.append(
                WorkerScore(card.worker_id, overlap, prefill, active, weight * prefill + active)
            )
        return result

    def choose(self, candidates: Sequence[WorkerCard], request: Any) -> WorkerCard:
        eligible = [card for card in candidates if self.accepts(card)]
        if not eligible:
            raise errors.no_worker(
                "no worker can be KV-routed: every registered worker's block size differs "
                f"from frontend.kv_router.block_size {self.config.block_size}"
            )
        token_ids: Sequence[int] = request.token_ids
        scores = self.scores(eligible, token_ids)
        self.last_scores = scores
        pick = self._pick(scores)
        card = next(c for c in eligible if c.worker_id == pick.worker_id)
        now = time.monotonic()
        self._forget_stale(now)
        request_id = getattr(request, "request_id", None)
        if request_id is not None:
            self._drop(request_id)
            blocks = -(-len(token_ids) // self.config.block_size)
            self._in_flight[request_id] = _InFlight(card.worker_id, blocks, now)
            self._own_blocks[card.worker_id] = self._own_blocks.get(card.worker_id, 0) + blocks
        logger.debug(
            "kv route %s → %s (overlap %d blocks, cost %.1f)",
            request_id, card.worker_id, pick.overlap_blocks, pick.cost,
        )  # fmt: skip
        return card

    def _pick(self, scores: list[WorkerScore]) -> WorkerScore:
        lowest = min(score.cost for score in scores)
        temperature = self.config.router_temperature
        if temperature <= 0:
            tied = [score for score in scores if score.cost == lowest]
            return tied[0] if len(tied) == 1 else self._random.choice(tied)
        weights = [math.exp(-(score.cost - lowest) / temperature) for score in scores]
        return self._random.choices(scores, weights=weights, k=1)[0]
