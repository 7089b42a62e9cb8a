"""The KV router with several frontend processes: the others' in-flight counts are read live
from the shared load table, so they may change between two reads within one choice.

Found by the scale-out sweep on the device (branch scale2): kv at 6 processes answered HTTP 500
"internal error: min() iterable argument is empty". `KvRouter._pick` read the cheapest
worker's count once and every tied worker's again in its filter; when other processes routed
to those workers in between, the filter could drop every candidate, the cheapest included.
It now reads each count once per choice.
"""

from __future__ import annotations

from worker_cards import worker_card

from contract.config import KvRouterConfig
from contract.messages import GenerateRequest
from frontend.kv_index import KvIndex
from frontend.kv_router import KvRouter
from frontend.router import LoadTracker


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class RoutedMeanwhile(dict[str, int]):
    """The other processes' counts, as the load table gives them: at each read two more
    requests have been routed to the worker read (a busy deployment of several processes)."""

    def __init__(self) -> None:
        super().__init__()
        self.routed = 0

    def get(self, worker_id: str, default: int = 0) -> int:  # type: ignore[override]
        self.routed += 2
        return self.routed


def test_a_choice_survives_counts_that_change_while_it_reads_them() -> None:
    clock = Clock()
    tracker = LoadTracker()
    router = KvRouter(KvRouterConfig(), KvIndex(), tracker, seed=7, clock=clock)
    cards = [worker_card(w, block_size=16, subject="s", abort_subject="a", capacity=8)
             for w in ("a", "b")]  # fmt: skip
    clock.now = 1.0
    for card, first in zip(cards, (5000, 1000), strict=True):  # hits on each: both draw demand
        for i in range(2):
            rid = f"{card.worker_id}{i}"
            router.choose([card], GenerateRequest(request_id=rid, token_ids=[*range(first,
                                                  first + 128)]))  # fmt: skip
            router.request_prefilled(rid)
            tracker.started(card.worker_id)
    clock.now = 3.0
    tracker.peer_requests = RoutedMeanwhile()
    fresh = GenerateRequest(request_id="new", token_ids=[*range(40000, 40128)])
    assert router.choose(cards, fresh).worker_id in ("a", "b")
