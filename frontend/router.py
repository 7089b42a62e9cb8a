"""Which worker serves a request: one `Router` interface, several policies.

The frontend counts its own in-flight requests per worker (always current) and keeps the
latest `LoadMetrics` each worker publishes (which also sees other frontends' load). The
KV-aware router (`frontend.kv_router`) implements the same `choose` and reads the same state.
"""

from __future__ import annotations

import itertools
import random
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from contract.discovery import WorkerCard
from contract.messages import LoadMetrics


class Router(Protocol):
    """Picks one of `candidates` (never empty) for `request` (a `GenerateRequest`)."""

    def choose(self, candidates: Sequence[WorkerCard], request: Any) -> WorkerCard: ...


class LoadTracker:
    """In-flight counts kept by this frontend process, those the deployment's other frontend
    processes share (`peer_requests`, `peer_blocks`: read from their shared memory table,
    `frontend.load_table`, or summed from NATS, `frontend.load_share`), and the workers' last
    published LoadMetrics."""

    def __init__(self) -> None:
        self.in_flight: defaultdict[str, int] = defaultdict(int)
        self.metrics: dict[str, LoadMetrics] = {}
        self.finish_listeners: list[Callable[[str], None]] = []  # get the request id
        self.prefill_listeners: list[Callable[[str], None]] = []  # first output arrived
        # worker -> the other processes' in-flight requests, their routed prompt blocks (kv)
        self.peer_requests: Mapping[str, int] = {}
        self.peer_blocks: Mapping[str, int] = {}
        self.on_change: Callable[[str], None] | None = None  # our count on a worker changed

    def started(self, worker_id: str) -> None:
        self.in_flight[worker_id] += 1
        if self.on_change is not None:
            self.on_change(worker_id)

    def finished(self, worker_id: str, request_id: str | None = None) -> None:
        count = self.in_flight.get(worker_id, 0) - 1
        if count > 0:
            self.in_flight[worker_id] = count
        else:
            self.in_flight.pop(worker_id, None)
        if request_id is not None:
            for listener in self.finish_listeners:
                listener(request_id)
        if self.on_change is not None:  # after the listeners: the kv router's blocks went
            self.on_change(worker_id)

    def requests_on(self, worker_id: str) -> int:
        """In-flight requests on a worker routed by every frontend process of the deployment."""
        return self.in_flight.get(worker_id, 0) + self.peer_requests.get(worker_id, 0)

    def prefilled(self, request_id: str) -> None:
        """The worker sent `request_id`'s first output: its prompt is computed and cached."""
        for listener in self.prefill_listeners:
            listener(request_id)

    def update(self, metrics: LoadMetrics) -> None:
        self.metrics[metrics.worker_id] = metrics

    def forget(self, worker_id: str) -> None:
        self.metrics.pop(worker_id, None)

    def load(self, card: WorkerCard) -> float:
        """Sequences on the worker relative to its capacity; the frontends' count is a floor."""
        own = self.requests_on(card.worker_id)
        reported = self.metrics.get(card.worker_id)
        busy = own
        if reported is not None:
            busy = max(own, reported.active_sequences) + reported.waiting_sequences
        return busy / max(card.capacity, 1)


class RoundRobinRouter:
    """Cycles through the workers in worker_id order, so the order is stable as they join.
    `rotation`: the tickets it draws, one per choice; its own count by default, the
    deployment's shared one when several frontend processes route (`frontend.rotation`)."""

    def __init__(self, rotation: Iterator[int] | None = None) -> None:
        self._counter = rotation if rotation is not None else itertools.count()

    def choose(self, candidates: Sequence[WorkerCard], request: Any) -> WorkerCard:
        ordered = sorted(candidates, key=lambda card: card.worker_id)
        return ordered[next(self._counter) % len(ordered)]


class RandomRouter:
    def __init__(self, seed: int | None = None) -> None:
        self._random = random.Random(seed)

    def choose(self, candidates: Sequence[WorkerCard], request: Any) -> WorkerCard:
        return self._random.choice(list(candidates))


class LeastLoadedRouter:
    """The worker with the lowest load; ties go round robin so equal workers share work."""

    def __init__(self, tracker: LoadTracker) -> None:
        self._tracker = tracker
        self._counter = itertools.count()

    def choose(self, candidates: Sequence[WorkerCard], request: Any) -> WorkerCard:
        ordered = sorted(candidates, key=lambda card: card.worker_id)
        loads = [self._tracker.load(card) for card in ordered]
        lowest = min(loads)
        tied = [card for card, load in zip(ordered, loads, strict=True) if load == lowest]
        return tied[next(self._counter) % len(tied)]


def make_router(mode: str, tracker: LoadTracker, rotation: Iterator[int] | None = None) -> Router:
    """The router `mode` names; `rotation`: round robin's tickets (see RoundRobinRouter).
    Random needs nothing shared: independent uniform choices are as random in N processes
    as in one."""
    if mode == "round_robin":
        return RoundRobinRouter(rotation)
    if mode == "random":
        return RandomRouter()
    if mode == "least_loaded":
        return LeastLoadedRouter(tracker)
    raise ValueError(f"frontend.router: unknown router {mode!r}")
