"""The fast KvRouter decides as the reference one did (issue 14: choose's cost halved).

`reference_kv_router.py` is main's router before the rewrite (d8bb23d), kept verbatim; the
rules changed on purpose since are applied to it here, so what is compared is the rewrite
itself: prefill progress runs through every prompt queued on a worker, not the oldest only
(fourth round: `_pending_prefill_through_the_queue`); pending prefill within the estimate's
slack counts as equal in the tie band, and the request-count condition holds only for
workers whose caches draw hits (fifth round: `_pick_with_pending_slack`). Both routers get
the same random trace: requests over a few shared prefixes (and identical prompts, so that
costs tie), first outputs, finishes (some before the first output), KV events storing and
removing blocks, workers' load reports, other frontend processes' counts, workers leaving
and joining, re-routed request ids, requests forgotten as stale, mixed block sizes and
workers without KV events.
Every choice, every candidate's cost terms and the accounting read by others (own blocks,
pending prefill, hit demand) must match.

A later change that alters a decision rule on purpose applies that rule to the reference
here the same way (a small function replacing the reference's method, said in its name), so
that every other rule stays checked; a redesign of the router retires this test and the
reference together.
"""

from __future__ import annotations

import importlib.util
import math
import random
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from contract.block_hash import block_hashes
from contract.config import KvRouterConfig
from contract.discovery import WorkerCard
from contract.messages import GenerateRequest, LoadMetrics
from frontend.kv_index import KvIndex
from frontend.kv_router import KvRouter
from frontend.router import LoadTracker


def _reference() -> ModuleType:
    path = Path(__file__).with_name("reference_kv_router.py")
    spec = importlib.util.spec_from_file_location("reference_kv_router", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


REFERENCE = _reference()


def _pending_prefill_through_the_queue(self: Any, worker_id: str) -> float:
    """The reference's `pending_prefill` with issue 14's fourth-round rule: the progress
    is capped at the worker's last pending block, not at the oldest prompt's."""
    pending = self._pending.get(worker_id, 0)
    if not pending:
        return 0
    rate = self._prefill_rate.get(worker_id)
    if rate is None or not self.config.prefill_progress:
        return pending
    head = self._prefill_head(worker_id)
    done = rate.per_second * max(self._clock() - self._prefill_start[worker_id], 0.0)
    return pending - min(done, pending - 1.0) if head is not None else pending


REFERENCE.KvRouter.pending_prefill = _pending_prefill_through_the_queue


def _pick_with_pending_slack(self: Any, scores: list[Any], prompt_blocks: int) -> Any:
    """The reference's `_pick` with issue 14's fifth-round rules: a worker's pending prefill
    counts up to `pending_tolerance` x the prompt's blocks less (an estimate) in the band and
    among the least prefill, unless a worker with none pending has the least, and the
    request-count condition applies to workers with hit demand only."""
    best = min(scores, key=lambda s: s.cost)
    lowest = best.cost
    temperature = self.config.router_temperature
    if temperature > 0:
        weights = [math.exp(-(score.cost - lowest) / temperature) for score in scores]
        return self._random.choices(scores, weights=weights, k=1)[0]
    slack = self.config.pending_tolerance * prompt_blocks
    requests_on, demand, last = self.tracker.requests_on, self._hit_demand, self._last_routed

    def least_possible(s: Any) -> float:
        return s.prefill_blocks - min(self.pending_prefill(s.worker_id), slack)

    most = requests_on(best.worker_id) + 1
    tied = [
        s for s in scores
        if s.cost <= lowest + self.config.tie_band * prompt_blocks
        and least_possible(s) <= best.prefill_blocks
        and (requests_on(s.worker_id) <= most or not demand.get(s.worker_id))
    ]  # fmt: skip
    least = min(s.prefill_blocks for s in tied)
    clear = [
        s for s in tied if not self.pending_prefill(s.worker_id) and s.prefill_blocks == least
    ]  # fmt: skip
    return min(
        clear or [s for s in tied if least_possible(s) <= least],
        key=lambda s: (demand.get(s.worker_id, 0), last.get(s.worker_id, -math.inf), s.worker_id),
    )


def _pick_taking_turns_without_hits(self: Any, scores: list[Any], prompt_blocks: int) -> Any:
    """`_pick_with_pending_slack` with issue 14's sixth-round rule: where no candidate
    caches any of the prompt and no worker's cache draws hits, the least recently routed of
    the workers whose pending prefill is within tie_band x prompt blocks / load scale of
    the least and whose decode blocks are within tie_band x prompt blocks of the least,
    one with nothing pending first."""
    config = self.config
    if (
        config.router_temperature > 0
        or not config.turns_without_hits
        or config.tie_band <= 0
        or self._hit_demand
        or any(s.overlap_blocks for s in scores)
    ):
        return _pick_with_pending_slack(self, scores, prompt_blocks)
    pending = {s.worker_id: self.pending_prefill(s.worker_id) for s in scores}
    band = config.tie_band * prompt_blocks
    scale = config.load_scale
    most_pending = min(pending.values()) + (band / scale if scale > 0 else math.inf)
    most_active = min(s.active_blocks for s in scores) + band
    pool = [
        s for s in scores if pending[s.worker_id] <= most_pending and s.active_blocks <= most_active
    ]  # fmt: skip
    if not pool:
        return min(scores, key=lambda s: s.cost)
    pool = [s for s in pool if not pending[s.worker_id]] or pool
    last = self._last_routed
    return min(pool, key=lambda s: (last.get(s.worker_id, -math.inf), s.worker_id))


REFERENCE.KvRouter._pick = _pick_taking_turns_without_hits
_reference_choose = REFERENCE.KvRouter.choose


def _choose_in_routing_order(self: Any, candidates: Any, request: Any) -> Any:
    """The reference's `choose` with issue 14's sixth-round rule: turns follow the routing
    order (`_last_routed` holds the choice's number, not the clock's reading, which this
    trace repeats)."""
    card = _reference_choose(self, candidates, request)
    self._choices = getattr(self, "_choices", 0) + 1
    self._last_routed[card.worker_id] = self._choices
    return card


REFERENCE.KvRouter.choose = _choose_in_routing_order


def card(worker_id: str, block_size: int) -> WorkerCard:
    return WorkerCard(
        worker_id=worker_id, role="agg", model="m", block_size=block_size, subject="s",
        abort_subject="a", capacity=8, max_model_len=1 << 16,
    )  # fmt: skip


class Side:
    """One router with its own index, tracker and the workers that publish KV events."""

    def __init__(self, router_class: Any, config: KvRouterConfig, clock: Any) -> None:
        self.index, self.tracker = KvIndex(), LoadTracker()
        self.published: set[str] = set()
        self.router = router_class(
            config, self.index, self.tracker, publishes=self.published.__contains__,
            seed=3, forget_after_s=50.0, clock=clock,
        )  # fmt: skip


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def replay(seed: int, config: KvRouterConfig, steps: int = 1500) -> int:
    """Run one random trace through both routers; returns how many choices were checked."""
    rng = random.Random(seed)
    clock = Clock()
    sides = [Side(REFERENCE.KvRouter, config, clock), Side(KvRouter, config, clock)]
    sizes = {f"w{i}": (32 if i == 5 else 16) for i in range(7)}
    live = set(list(sizes)[:6])
    for side in sides:
        side.published.update(w for w in sizes if w != "w4")  # w4: no KV events
        side.router.on_workers_changed({w: card(w, sizes[w]) for w in sorted(live)})
    prefixes = [[rng.randrange(32000) for _ in range(rng.choice((16, 40, 96)))] for _ in range(5)]
    in_flight: dict[str, tuple[str, list[int]]] = {}  # request id -> (worker, tokens)
    routed: list[tuple[str, list[int]]] = []
    choices = 0
    for step in range(steps):
        action = rng.random()
        if action < 0.40 and live:  # route a request
            if rng.random() < 0.3:  # an identical prompt again: ties
                tokens = list(rng.choice(prefixes))
            else:
                suffix = [rng.randrange(32000) for _ in range(rng.randrange(0, 40))]
                tokens = rng.choice(prefixes) + suffix
            if in_flight and rng.random() < 0.05:
                request_id = rng.choice(list(in_flight))  # routed again (e.g. migrated)
            else:
                request_id = f"r{step}"
            cards = [card(w, sizes[w]) for w in sorted(live) if rng.random() < 0.9]
            cards = cards or [card(w, sizes[w]) for w in sorted(live)]
            request = GenerateRequest(request_id=request_id, token_ids=tokens)
            picks = [side.router.choose(cards, request).worker_id for side in sides]
            assert picks[0] == picks[1], f"step {step}: {picks}"
            reference_scores, scores = (side.router.last_scores for side in sides)
            assert [vars(s) for s in reference_scores] == [vars(s) for s in scores]
            choices += 1
            if request_id in in_flight:
                for side in sides:
                    side.tracker.finished(in_flight[request_id][0])  # the old attempt's count
            for side in sides:
                side.tracker.started(picks[0])
            in_flight[request_id] = (picks[0], tokens)
            routed.append((picks[0], tokens))
        elif action < 0.55 and in_flight:  # a first output
            request_id = rng.choice(list(in_flight))
            for side in sides:
                side.tracker.prefilled(request_id)
        elif action < 0.70 and in_flight:  # a finish (sometimes before its first output)
            request_id = rng.choice(list(in_flight))
            worker_id, _ = in_flight.pop(request_id)
            for side in sides:
                side.tracker.finished(worker_id, request_id)
        elif action < 0.80 and routed:  # the engine's KV events: a prompt stored
            worker_id, tokens = rng.choice(routed[-20:])
            hashes = block_hashes(tokens, sizes[worker_id])[: rng.randrange(len(tokens) // 16 + 1)]
            for side in sides:
                if worker_id != "w4":
                    side.index.store(worker_id, hashes)
        elif action < 0.85 and routed:  # ... and evicted
            worker_id, tokens = rng.choice(routed)
            hashes = block_hashes(tokens, sizes[worker_id])[rng.randrange(len(tokens) // 16 + 1) :]
            for side in sides:
                side.index.remove(worker_id, hashes)
        elif action < 0.92:  # a load report, or another frontend process's counts
            worker_id = rng.choice(list(sizes))
            blocks, requests = rng.randrange(0, 60), rng.randrange(0, 3)
            kind = rng.random()
            for side in sides:
                if kind < 0.6:
                    side.tracker.update(LoadMetrics(worker_id=worker_id, active_blocks=blocks))
                elif kind < 0.8:
                    side.tracker.peer_blocks[worker_id] = blocks
                    side.tracker.peer_requests[worker_id] = requests
                else:
                    side.tracker.peer_blocks.pop(worker_id, None)
                    side.tracker.peer_requests.pop(worker_id, None)
        elif action < 0.93:  # a worker leaves or joins
            worker_id = rng.choice(list(sizes))
            live ^= {worker_id}
            for side in sides:
                side.router.on_workers_changed({w: card(w, sizes[w]) for w in sorted(live)})
            for request_id in [r for r, (w, _) in in_flight.items() if w not in live]:
                del in_flight[request_id]
        clock.now += rng.choice((0.0, 0.0, 0.001, 0.05, 0.3, 2.0, 60.0 if step % 97 == 0 else 1.0))
        for worker_id in sizes:
            reference, fast = (side.router for side in sides)
            assert reference.own_blocks(worker_id) == fast.own_blocks(worker_id)
            assert reference.pending_prefill(worker_id) == fast.pending_prefill(worker_id)
            assert reference.hit_demand(worker_id) == fast.hit_demand(worker_id)
    return choices


CONFIGS = {
    "defaults": KvRouterConfig(),
    "tie_band 0": KvRouterConfig(tie_band=0),
    "exact pending": KvRouterConfig(pending_tolerance=0),
    "cost rules without hits": KvRouterConfig(turns_without_hits=False),
    "no prefill progress": KvRouterConfig(prefill_progress=False),
    "credit and weights": KvRouterConfig(
        overlap_credit=0.5, uncached_weight=1.5, prefill_load_scale=1.0
    ),
    "temperature": KvRouterConfig(router_temperature=4.0),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_the_fast_router_chooses_as_the_reference_did(name: str) -> None:
    for seed in range(4):
        assert replay(seed, CONFIGS[name]) > 400
