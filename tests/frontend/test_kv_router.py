"""KvRouter: the cost model on hand-made states, in-flight accounting, temperature sampling,
per-worker block sizes, and the fallback for workers that publish no KV events.

Defaults: overlap_credit 1, uncached_weight 2, prefill_load_scale 4; PROMPT is 8 blocks, so
an idle worker without the prefix costs 4 x 2 x 8 + 8 new blocks = 72.
"""

from __future__ import annotations

import logging
from collections import Counter

import pytest
from worker_cards import worker_card

from contract.block_hash import block_hashes, media_block_extras
from contract.config import ConfigError, KvRouterConfig, load_config
from contract.discovery import WorkerCard
from contract.messages import (
    GenerateRequest,
    KvEventBatch,
    KvStored,
    LoadMetrics,
    MediaRef,
)
from frontend.kv_index import KvIndex, KvIndexFeed, RoutedPrefixIndex
from frontend.kv_router import KvRouter, prompt_hashes
from frontend.router import LoadTracker

PROMPT = list(range(1000, 1000 + 16 * 8))  # 8 blocks
HASHES = block_hashes(PROMPT, 16)
OTHER = list(range(5000, 5000 + 16 * 8))  # 8 blocks sharing nothing with PROMPT


def card(worker_id: str, block_size: int = 16) -> WorkerCard:
    return worker_card(worker_id, block_size=block_size, subject="s", abort_subject="a", capacity=8)


def req(rid: str, tokens: list[int] = PROMPT) -> GenerateRequest:
    return GenerateRequest(request_id=rid, token_ids=tokens)


def make(publishes=None, clock=None, **config) -> tuple[KvRouter, KvIndex, LoadTracker]:
    index, tracker = KvIndex(), LoadTracker()
    extra = {"clock": clock} if clock is not None else {}
    router = KvRouter(
        KvRouterConfig(**config), index, tracker, publishes=publishes, seed=7, **extra
    )
    return router, index, tracker


def busy(tracker: LoadTracker, worker_id: str, active_blocks: int) -> None:
    tracker.update(LoadMetrics(worker_id=worker_id, active_blocks=active_blocks))


def costs(router: KvRouter) -> dict[str, float]:
    return {s.worker_id: s.cost for s in router.last_scores}


def test_idle_workers_prefer_the_longest_cached_prefix() -> None:
    router, index, _ = make()
    index.store("a", HASHES[:3])
    index.store("b", HASHES[:6])
    assert router.choose([card("a"), card("b"), card("c")], req("r1")).worker_id == "b"
    # 4 x 2 x uncached + 8 new blocks
    assert costs(router) == {"a": 4 * 2 * 5 + 8, "b": 4 * 2 * 2 + 8, "c": 72}


def test_a_shared_prefix_counts_once_so_a_hot_prompt_stays_on_its_worker() -> None:
    """Five requests over one cached system prompt: the worker holds the prompt once, so
    it is not repelled as busy (the old model counted the prefix per request)."""
    router, index, _ = make()
    index.store("a", HASHES)
    cards = [card("a"), card("b")]
    for i in range(5):
        tokens = [*PROMPT[:112], *range(9000 + 16 * i, 9016 + 16 * i)]  # 7 shared + 1 own
        assert router.choose(cards, req(f"r{i}", tokens)).worker_id == "a"
    assert router.own_blocks("a") == 7 + 5  # distinct blocks, not 5 x 8
    assert router.pending_prefill("a") == 5  # one uncached block each


def test_a_hit_behind_one_fresh_prefill_beats_recomputing_elsewhere() -> None:
    router, index, _ = make()
    index.store("a", HASHES)
    router.choose([card("a")], req("fresh", OTHER))  # a now computes 8 uncached blocks
    assert router.pending_prefill("a") == 8
    assert router.choose([card("a"), card("b")], req("hit")).worker_id == "a"
    assert costs(router) == {"a": 4 * 8 + (8 + 8), "b": 72}
    # Dynamo's weight 1 (the request's own wait only) sends it to recompute on b
    dynamo, index2, _ = make(uncached_weight=1.0)
    index2.store("a", HASHES)
    dynamo.choose([card("a")], req("fresh", OTHER))
    assert dynamo.choose([card("a"), card("b")], req("hit")).worker_id == "b"


def test_a_busy_cache_holder_loses_to_an_idle_worker() -> None:
    router, index, _ = make()
    index.store("a", HASHES)
    for i in range(3):  # three fresh 8-block prefills pending on a: 4 x 24 + 32 = 128
        router.choose([card("a")], req(f"fresh{i}", [*range(20000 + 200 * i, 20128 + 200 * i)]))
    assert router.choose([card("a"), card("b")], req("r1")).worker_id == "b"


def test_pending_prefill_ends_with_the_first_output_and_footprint_with_the_finish() -> None:
    router, _, tracker = make()
    picked = router.choose([card("a")], req("r1")).worker_id
    assert (router.pending_prefill(picked), router.own_blocks(picked)) == (8, 8)
    tracker.prefilled("r1")  # what RequestStream does on the first output
    assert (router.pending_prefill(picked), router.own_blocks(picked)) == (0, 8)
    tracker.started(picked)
    tracker.finished(picked, "r1")  # what WorkerClient does when the stream ends
    assert (router.pending_prefill(picked), router.own_blocks(picked)) == (0, 0)


def test_an_in_flight_prompt_counts_as_cached_before_its_events_arrive() -> None:
    router, _, _ = make()
    cards = [card("a"), card("b")]
    first = router.choose(cards, req("r1")).worker_id
    for i in range(2, 6):  # the index is still empty: only our in-flight record knows
        assert router.choose(cards, req(f"r{i}")).worker_id == first


def test_reported_load_and_our_own_do_not_add_up() -> None:
    router, index, tracker = make()
    index.store("a", HASHES)
    router.choose([card("a")], req("r1"))
    busy(tracker, "a", 5)  # the report includes our 8 blocks: the larger one counts
    scores = {s.worker_id: s.active_blocks for s in router.scores([card("a")], OTHER)}
    assert scores["a"] == 8 + 8
    busy(tracker, "a", 30)  # another frontend's requests show in the report
    scores = {s.worker_id: s.active_blocks for s in router.scores([card("a")], OTHER)}
    assert scores["a"] == 30 + 8


def test_a_report_older_than_our_finishes_does_not_repel_the_next_turn() -> None:
    router, index, tracker = make()
    index.store("a", HASHES)
    cards = [card("a"), card("b")]
    assert router.choose(cards, req("r1")).worker_id == "a"
    busy(tracker, "a", 8)  # published while r1 ran, arrives before r1's finish
    tracker.started("a")
    tracker.finished("a", "r1")
    scores = {s.worker_id: s.active_blocks for s in router.scores(cards, PROMPT)}
    assert scores["a"] == 0 + 8  # the stale report's 8 blocks were ours and were released
    busy(tracker, "a", 3)  # a fresh report is taken as it is
    assert {s.worker_id: s.active_blocks for s in router.scores(cards, PROMPT)}["a"] == 3 + 8


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_ties_go_to_the_least_recently_routed_worker() -> None:
    """Equal workers take turns (not at random): the one routed to longest ago has had the
    longest to work off what it got."""
    clock = Clock()
    router, _, _ = make(clock=clock)
    cards = [card("a"), card("b"), card("c")]
    picks = []
    for i in range(9):
        clock.now += 1.0
        picks.append(router.choose(cards, req(f"r{i}", OTHER)).worker_id)
        router.request_finished(f"r{i}")
    assert picks == ["a", "b", "c"] * 3


def _one_prefilling_on_a_and_one_more_decoding_on_b(router: KvRouter, clock: Clock) -> None:
    """b: a request decoding and one routed at t=2 still prefilling; a: one routed at t=3
    still prefilling. Equal prefill work, b holds one more request's blocks."""
    fresh = [[*range(30000 + 1000 * i, 30128 + 1000 * i)] for i in range(3)]  # 8 blocks each
    clock.now = 1.0
    router.choose([card("b")], req("b-decoding", fresh[0]))
    router.request_prefilled("b-decoding")
    clock.now = 2.0
    router.choose([card("b")], req("b-prefilling", fresh[1]))
    clock.now = 3.0
    router.choose([card("a")], req("a-prefilling", fresh[2]))
    clock.now = 4.0


def test_decode_footprint_within_the_band_does_not_decide_how_long_ago_does() -> None:
    """The closed-loop trap of the no-prefix workload: every worker is mid-prefill and the
    one whose other request just finished holds fewer blocks. The old rule sent every new
    request there (behind a prefill that had just started); the tie band sends it to b,
    whose prefill started earlier."""
    clock = Clock()
    router, _, _ = make(clock=clock)
    _one_prefilling_on_a_and_one_more_decoding_on_b(router, clock)
    assert router.choose([card("a"), card("b")], req("new", OTHER)).worker_id == "b"
    scores = {s.worker_id: s for s in router.last_scores}
    assert scores["a"].prefill_blocks == scores["b"].prefill_blocks
    assert scores["b"].cost - scores["a"].cost == 8  # one request's footprint, in the band

    old, _, _ = make(clock=clock, tie_band=0.0)  # footprint decides: a
    _one_prefilling_on_a_and_one_more_decoding_on_b(old, clock)
    assert old.choose([card("a"), card("b")], req("new", OTHER)).worker_id == "a"


def test_a_footprint_beyond_the_band_still_decides() -> None:
    clock = Clock()
    router, _, tracker = make(clock=clock)
    _one_prefilling_on_a_and_one_more_decoding_on_b(router, clock)
    busy(tracker, "b", 16 + 33)  # another frontend's 33 blocks too: 8 + 33 > 4 x 8
    assert router.choose([card("a"), card("b")], req("new", OTHER)).worker_id == "a"


def test_a_worker_running_more_requests_does_not_tie() -> None:
    """A hot worker serving many hits of one prompt holds few distinct blocks, but a fresh
    prefill there holds up every one of them: it may tie only running at most one request
    more than the cheapest, however long ago it got work."""
    clock = Clock()
    router, _, tracker = make(clock=clock)
    clock.now = 1.0
    for i in range(3):  # three hits of one prompt on b: 8 distinct blocks, 3 requests
        router.choose([card("b")], req(f"b{i}"))
        router.request_prefilled(f"b{i}")
        tracker.started("b")
    clock.now = 2.0
    router.choose([card("a")], req("a-old", OTHER))
    router.request_finished("a-old")  # a: idle, but routed to after b
    clock.now = 3.0
    fresh = [*range(40000, 40128)]
    assert router.choose([card("a"), card("b")], req("new", fresh)).worker_id == "a"
    scores = {s.worker_id: s for s in router.last_scores}
    assert scores["b"].cost - scores["a"].cost == 8  # in the band: only the count decides


def test_the_band_never_trades_a_cache_hit_for_taking_turns() -> None:
    """A worker with more prefill work than the cheapest is never tied with it: a cache
    holder routed to a moment ago still gets the hit over an idle worker waiting its turn."""
    clock = Clock()
    router, index, _ = make(clock=clock, tie_band=100.0)
    index.store("a", HASHES[:2])  # a: 4 x 2 x 6 + 8 = 56; b: 72, within a wide band
    clock.now = 1.0
    router.choose([card("b")], req("b-old", OTHER))
    router.request_finished("b-old")
    clock.now = 2.0
    router.choose([card("a")], req("a-new", OTHER))
    router.request_finished("a-new")
    clock.now = 3.0
    assert router.choose([card("a"), card("b")], req("hit")).worker_id == "a"


def test_a_prompt_cached_nowhere_goes_where_fewest_hits_would_wait_for_it() -> None:
    """Idle workers tie on a new prompt; a's cache draws the hits (three of the latest),
    and every hit arriving while it computes the prompt would wait for it there. Taking
    turns sent it to a (routed to longest ago): issue 14, in-process replays of
    system_prompts, hits queued behind such a miss on a hot worker."""
    clock = Clock()
    router, index, _ = make(clock=clock)
    index.store("a", HASHES)
    clock.now = 1.0
    for i in range(3):
        assert router.choose([card("a"), card("b")], req(f"hit{i}")).worker_id == "a"
        router.request_prefilled(f"hit{i}")
        router.request_finished(f"hit{i}")
    clock.now = 2.0
    router.choose([card("b")], req("b-old", OTHER))
    router.request_finished("b-old")
    clock.now = 3.0
    assert router.choose([card("a"), card("b")], req("new", _fresh(5))).worker_id == "b"
    assert (router.hit_demand("a"), router.hit_demand("b")) == (3, 0)
    # only the latest hits count: what users ask shifts
    index.store("b", HASHES)
    for i in range(64):
        router.choose([card("b")], req(f"b{i}"))
        router.request_finished(f"b{i}")
    assert (router.hit_demand("a"), router.hit_demand("b")) == (0, 64)


# ----- pending prefill: progress at the measured rate ---------------------------------------
def _fresh(i: int, blocks: int = 8) -> list[int]:
    return [*range(60000 + 2000 * i, 60000 + 2000 * i + 16 * blocks)]


def test_a_worker_learns_its_prefill_rate_from_first_outputs() -> None:
    """Two 8-block prompts queued on a at t=0: the first output of the first at t=1 is a
    sample of 8 blocks/s; the second started then, so at t=1.5 half of it is left."""
    clock = Clock()
    router, _, _ = make(clock=clock)
    router.choose([card("a")], req("r1", _fresh(1)))
    router.choose([card("a")], req("r2", _fresh(2)))
    assert router.pending_prefill("a") == 16  # no sample yet: every prompt counts whole
    clock.now = 1.0
    router.request_prefilled("r1")
    assert router.pending_prefill("a") == 8  # r2 starts now
    clock.now = 1.5
    assert router.pending_prefill("a") == pytest.approx(4.0)
    router.choose([card("a")], req("r3", _fresh(3)))
    assert router.pending_prefill("a") == pytest.approx(4.0 + 8)
    clock.now = 5.0  # r2 overdue and r3 too: not done until a first output says so
    assert router.pending_prefill("a") == 1.0
    router.request_finished("r3")
    router.request_prefilled("r2")
    assert router.pending_prefill("a") == 0
    # the second sample counts from r1's first output (when a could start on r2): 8 in 4 s
    assert router._prefill_rate["a"].per_second == pytest.approx((8 * 0.9 + 8) / (0.9 + 4))


def test_a_prefill_nearly_done_is_less_work_than_one_just_begun() -> None:
    """The no-prefix trap: a holds a 16-block prefill it started 0.9 s ago at 16 blocks/s
    (1.6 left), b an 8-block one it got 0.1 s ago (6.4 left). Counted whole until the first
    output (the old rule, and prefill_progress false), a looked twice as busy. (Without any
    cache hit, estimates within a prompt of each other take turns: the cost rules here are
    those of prompts with hits.)"""
    for progress, expected in ((True, "a"), (False, "b")):
        clock = Clock()
        router, _, _ = make(clock=clock, prefill_progress=progress, turns_without_hits=False)
        for i, (worker_id, blocks) in enumerate((("a", 16), ("b", 8))):  # 16 blocks/s each
            clock.now += 1.0
            router.choose([card(worker_id)], req(f"{worker_id}0", _fresh(i, blocks)))
            clock.now += blocks / 16
            router.request_prefilled(f"{worker_id}0")
            router.request_finished(f"{worker_id}0")
        clock.now = 10.0
        router.choose([card("a")], req("a1", _fresh(10, 16)))
        clock.now = 10.8
        router.choose([card("b")], req("b1", _fresh(11, 8)))
        clock.now = 10.9
        picked = router.choose([card("a"), card("b")], req("new", OTHER)).worker_id
        assert picked == expected, progress
        pending = {s.worker_id: s.prefill_blocks - 2 * 8 for s in router.last_scores}
        if progress:
            assert pending == pytest.approx({"a": 1.6, "b": 6.4})
        else:
            assert pending == {"a": 16, "b": 8}


def test_progress_runs_through_every_prompt_queued() -> None:
    """Two requests whose streams ended together come back together. a got two 8-block
    prompts at t=0 (8 blocks/s: 1.6 left at t=1.8), b one at t=1.75 (7.6 left): the next
    goes to a. With the progress capped at the oldest prompt (until issue 14's fourth round)
    a looked busier (9) and every pair of arrivals stayed paired on one worker."""
    clock = Clock()
    router, _, _ = make(clock=clock)
    for worker_id in ("a", "b"):  # each learns 8 blocks/s
        router.choose([card(worker_id)], req(f"{worker_id}0", _fresh(0 if worker_id == "a" else 1)))
    clock.now = 1.0
    for worker_id in ("a", "b"):
        router.request_prefilled(f"{worker_id}0")
        router.request_finished(f"{worker_id}0")
    clock.now = 2.0
    router.choose([card("a")], req("a1", _fresh(2)))
    router.choose([card("a")], req("a2", _fresh(3)))
    clock.now = 3.75
    router.choose([card("b")], req("b1", _fresh(4)))
    clock.now = 3.8
    assert router.pending_prefill("a") == pytest.approx(1.6)
    assert router.pending_prefill("b") == pytest.approx(7.6)
    assert router.choose([card("b"), card("a")], req("new", _fresh(5))).worker_id == "a"


def _one_block_left_on_b_and_two_decoding_on_a(**config) -> tuple[KvRouter, LoadTracker]:
    """b (routed to at 1.0) has 1 block of its 8-block prefill left at 1.875; a runs two
    requests (routed to at 1.05 and 1.15), both past their prefill."""
    clock = Clock()
    router, _, tracker = make(clock=clock, **config)
    router.choose([card("b")], req("b0", _fresh(0)))
    clock.now = 1.0
    router.request_prefilled("b0")  # b: 8 blocks/s
    router.request_finished("b0")
    router.choose([card("b")], req("b1", _fresh(1)))
    tracker.started("b")
    for i, t in ((2, 1.05), (3, 1.15)):
        clock.now = t
        router.choose([card("a")], req(f"a{i}", _fresh(i)))
        tracker.started("a")
        clock.now = t + 0.05
        router.request_prefilled(f"a{i}")
    clock.now = 1.875
    return router, tracker


def test_ties_go_to_the_least_prefill_before_the_least_recently_routed() -> None:
    """b is cheapest (one prompt, 1 block of its prefill left) and routed to longest ago; a
    runs two decoding requests (more footprint) with no prefill ahead. They tie (within the
    band, a runs one request more): the new prompt goes to a, where it starts at once. b's 1
    block is within `pending_tolerance` (0.25 x 8 blocks) of nothing, but nothing pending is
    no estimate; with the tolerance 0 the same."""
    for config in ({}, {"pending_tolerance": 0}):
        router, _ = _one_block_left_on_b_and_two_decoding_on_a(**config)
        assert router.choose([card("a"), card("b")], req("new", OTHER)).worker_id == "a"
        scores = {s.worker_id: s for s in router.last_scores}
        assert scores["b"].prefill_blocks == pytest.approx(1 + 16)  # 7 of b1's 8 blocks done
        assert scores["a"].prefill_blocks == 16
        assert scores["b"].cost < scores["a"].cost <= scores["b"].cost + 4 * 8


def _two_prefills_under_way(**config) -> KvRouter:
    """b computes 4 blocks/s, a 16 (learned from one 8-block prompt each); at 3.875 b's
    next prompt (routed at 3.0) has 4.5 blocks left, a's (routed at 3.2) 1 block."""
    clock = Clock()
    router, _, _ = make(clock=clock, **config)
    router.choose([card("b")], req("b0", _fresh(0)))
    clock.now = 2.0
    router.choose([card("a")], req("a0", _fresh(1)))
    router.request_prefilled("b0")
    router.request_finished("b0")
    clock.now = 2.5
    router.request_prefilled("a0")
    router.request_finished("a0")
    clock.now = 3.0
    router.choose([card("b")], req("b1", _fresh(2)))
    clock.now = 3.2
    router.choose([card("a")], req("a1", _fresh(3)))
    clock.now = 3.875
    assert router.pending_prefill("b") == pytest.approx(4.5)
    assert router.pending_prefill("a") == pytest.approx(1.0)
    return router


def test_pending_prefill_within_the_estimates_slack_takes_turns() -> None:
    """Both workers have a prefill under way; a 32-block prompt's slack (0.25 x 32 = 8
    blocks) covers the 3.5 blocks between the two estimates, which through HTTP were off by
    ~0.2 s of prefill either way (issue 14, fifth round): b, routed to least recently, takes
    it; taken as exact (`pending_tolerance` 0), a's smaller estimate wins. (The rules of
    prompts with hits: without any, turns decide within a whole prompt, below.)"""
    prompt = _fresh(4, blocks=32)
    router = _two_prefills_under_way(turns_without_hits=False)
    assert router.choose([card("a"), card("b")], req("new", prompt)).worker_id == "b"
    router = _two_prefills_under_way(pending_tolerance=0, turns_without_hits=False)
    assert router.choose([card("a"), card("b")], req("new", prompt)).worker_id == "a"


def test_without_hits_pending_estimates_within_a_prompt_take_turns() -> None:
    """No cache holds any of the prompt and none draws hits: a's estimate (1 block) and
    b's (4.5) are within one 8-block prompt (the tie band, 4 x 8 blocks of cost, over the
    prefill's weight 4) of each other, so b, routed to least recently, takes it; with the
    cost rules (`turns_without_hits` false) a's estimate is less by more than the slack
    (0.25 x 8 blocks) and a takes it."""
    prompt = _fresh(4, blocks=8)
    router = _two_prefills_under_way()
    assert router.choose([card("a"), card("b")], req("new", prompt)).worker_id == "b"
    router = _two_prefills_under_way(turns_without_hits=False)
    assert router.choose([card("a"), card("b")], req("new", prompt)).worker_id == "a"


def test_without_hits_pending_beyond_a_prompt_loses_its_turn() -> None:
    """The same state with a 2-block prompt: b's 4.5 blocks pending are more than one such
    prompt above a's 1, so a takes it although b's turn came first."""
    router = _two_prefills_under_way()
    prompt = _fresh(4, blocks=2)
    assert router.choose([card("a"), card("b")], req("new", prompt)).worker_id == "a"


def test_without_hits_nothing_pending_beats_the_turn() -> None:
    """b was routed to least recently but has 1 block of prefill left; a runs two
    requests that only decode: nothing pending is known exactly and takes the prompt."""
    router, _ = _one_block_left_on_b_and_two_decoding_on_a()
    assert router.choose([card("a"), card("b")], req("new", OTHER)).worker_id == "a"


def test_without_hits_a_decode_footprint_beyond_the_band_loses_its_turn() -> None:
    """Nothing pending anywhere; b, routed to least recently, reports 4 x 8 + 1 blocks more
    than a (beyond the tie band of the 8-block prompt): a takes it; at 4 x 8 more, b's
    turn."""
    for extra, expected in ((4 * 8 + 1, "a"), (4 * 8, "b")):
        clock = Clock()
        router, _, tracker = make(clock=clock)
        router.choose([card("b")], req("b0", _fresh(0)))
        router.request_finished("b0")
        clock.now = 1.0
        router.choose([card("a")], req("a0", _fresh(1)))
        router.request_finished("a0")
        busy(tracker, "a", 8)
        busy(tracker, "b", 8 + extra)
        clock.now = 2.0
        assert router.choose([card("a"), card("b")], req("new", OTHER)).worker_id == expected


def test_turns_follow_the_routing_order_when_the_clock_repeats() -> None:
    """b then a were routed to at the same clock reading (a simulated clock, a coarse
    one): b's turn comes first, not the first name (issue 14, sixth round: in replays the
    name order stacked prompts on w0 at t=0)."""
    clock = Clock()
    router, _, _ = make(clock=clock)
    for i, worker_id in enumerate(("b", "a")):
        router.choose([card(worker_id)], req(f"{worker_id}0", _fresh(i)))
        router.request_finished(f"{worker_id}0")
    assert router.choose([card("a"), card("b")], req("new", OTHER)).worker_id == "b"
    assert router.choose([card("a"), card("b")], req("next", _fresh(3))).worker_id == "a"


def test_a_hit_anywhere_keeps_the_cost_rules() -> None:
    """The same two prefills under way as above, but b's cache drew a hit lately: the
    turns rule stands aside and a's smaller estimate (beyond the slack) decides."""
    router = _two_prefills_under_way()
    router._note_hit("b")  # as a request with a cached prefix routed there does
    prompt = _fresh(4, blocks=8)
    assert router.choose([card("a"), card("b")], req("new", prompt)).worker_id == "a"


def test_a_worker_running_more_requests_ties_when_its_cache_draws_no_hits() -> None:
    """Prompts sharing nothing (no hits anywhere): b runs three requests past their prefill
    (they only decode), a runs none but was routed to after b. No hit on b waits for a
    prefill there, so the request count does not keep b out of the band; routed to least
    recently, b takes the prompt (in lockstep, b's requests are about to finish while a
    fresh prompt elsewhere still has its whole prefill ahead)."""
    clock = Clock()
    router, _, tracker = make(clock=clock)
    clock.now = 1.0
    for i in range(3):
        router.choose([card("b")], req(f"b{i}", _fresh(i, blocks=2)))
        router.request_prefilled(f"b{i}")
        tracker.started("b")
    clock.now = 2.0
    router.choose([card("a")], req("a-old", _fresh(3, blocks=2)))
    router.request_finished("a-old")
    clock.now = 3.0
    assert router.hit_demand("b") == 0
    assert router.choose([card("a"), card("b")], req("new", _fresh(4))).worker_id == "b"


def test_a_request_ending_before_its_first_output_lets_the_next_start() -> None:
    clock = Clock()
    router, _, tracker = make(clock=clock)
    router.choose([card("a")], req("r0", _fresh(0)))
    clock.now = 1.0
    router.request_prefilled("r0")  # 8 blocks/s
    router.choose([card("a")], req("r1", _fresh(1)))
    router.choose([card("a")], req("r2", _fresh(2)))
    clock.now = 1.5
    tracker.started("a")
    tracker.finished("a", "r1")  # aborted mid-prefill: a moves on to r2 now
    assert router.pending_prefill("a") == 8
    clock.now = 2.0
    assert router.pending_prefill("a") == pytest.approx(4.0)


def test_temperature_samples_softmax_of_negative_cost() -> None:
    router, index, _ = make(router_temperature=8.0)
    index.store("a", HASHES[:2])  # cost a = 4 x 12 + 8 = 56, b = 72: p(a) = 1/(1 + e^-2)
    cards = [card("a"), card("b")]
    picks: Counter[str] = Counter()
    for i in range(4000):
        picks[router.choose(cards, req(f"r{i}")).worker_id] += 1
        router.request_finished(f"r{i}")
    assert picks["a"] / 4000 == pytest.approx(0.881, abs=0.025)


def test_each_worker_is_scored_at_its_own_block_size(caplog: pytest.LogCaptureFixture) -> None:
    router, index, _ = make(block_size=16)  # deprecated setting: warned about, not obeyed
    index.store("big", block_hashes(PROMPT, 32))  # 4 blocks of 32, all cached
    with caplog.at_level(logging.WARNING, logger="frontend.kv_router"):
        router.on_workers_changed({"big": card("big", 32), "small": card("small")})
        router.on_workers_changed({"big": card("big", 32), "small": card("small")})
    assert router.choose([card("big", 32), card("small")], req("r1")).worker_id == "big"
    scores = {s.worker_id: s.overlap_blocks for s in router.last_scores}
    assert scores == {"big": 4, "small": 0}
    warnings = [r for r in caplog.records if "is ignored for worker big" in r.getMessage()]
    assert len(warnings) == 1


def test_workers_leaving_release_their_in_flight_blocks() -> None:
    router, _, _ = make()
    picked = router.choose([card("a")], req("r1")).worker_id
    assert router.own_blocks(picked) == 8
    router.on_workers_changed({})
    assert (router.own_blocks(picked), router.pending_prefill(picked)) == (0, 0)


def test_config_fields_overrides_and_the_deprecated_weight() -> None:
    config = load_config(
        overrides=[
            "frontend.router=kv",
            "frontend.kv_router.prefill_load_scale=2.5",
            "frontend.kv_router.router_temperature=0.5",
            "frontend.kv_router.uncached_weight=1",
        ],
        environ={"HPCSERVE__FRONTEND__KV_ROUTER__RECONCILE_INTERVAL_S": "7"},
    )
    kv = config.frontend.kv_router
    assert (kv.load_scale, kv.router_temperature, kv.uncached_weight) == (2.5, 0.5, 1.0)
    assert kv.reconcile_interval_s == 7 and kv.block_size is None
    assert KvRouterConfig(overlap_score_weight=8).load_scale == 8
    assert KvRouterConfig().load_scale == 4
    assert KvRouterConfig().tie_band == 4
    assert KvRouterConfig().prefill_progress is True
    with pytest.raises(ConfigError, match=r"frontend\.kv_router\.tie_band"):
        load_config(overrides=["frontend.kv_router.tie_band=-1"], environ={})


# ----- workers without KV events ----------------------------------------------------------
def test_routed_prefix_index_forgets_after_its_ttl() -> None:
    index = RoutedPrefixIndex(ttl_s=120)
    index.routed("a", HASHES, now=0.0)
    index.routed("b", HASHES[:4], now=100.0)
    assert index.overlaps(HASHES, ["a", "b"]) == {"a": 8, "b": 4}
    index.routed("a", HASHES[:2], now=110.0)  # routed again: these two stay longer
    index.expire(now=125.0)
    assert index.overlaps(HASHES, ["a", "b"]) == {"a": 2, "b": 4}
    index.expire(now=300.0)
    assert index.num_blocks() == 0


def test_a_silent_worker_is_routed_by_its_routed_prompts() -> None:
    router, index, tracker = make(publishes=lambda worker_id: False)
    cards = [card("a"), card("b")]
    first = router.choose(cards, req("r1")).worker_id
    tracker.started(first)
    tracker.finished(first, "r1")  # gone from in-flight: only the routed index remembers
    assert index.num_blocks() == 0
    for i in range(2, 6):
        assert router.choose(cards, req(f"r{i}")).worker_id == first
        router.request_finished(f"r{i}")


def test_a_publishing_worker_is_scored_from_its_events_only() -> None:
    router, index, _ = make(publishes=lambda worker_id: worker_id == "a")
    router.routed.routed("a", HASHES, now=0.0)  # a guess that a's events contradict
    index.store("b", HASHES)  # b publishes nothing, but this index is not b's source
    router.choose([card("a"), card("b")], req("r1", OTHER))
    assert {s.worker_id: s.overlap_blocks for s in router.scores([card("a")], PROMPT)} == {"a": 0}


def test_a_worker_that_publishes_nothing_is_warned_about_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    published: set[str] = set()
    router, _, tracker = make(
        publishes=published.__contains__, clock=lambda: now[0], events_grace_s=10
    )
    with caplog.at_level(logging.WARNING, logger="frontend.kv_router"):
        for i in range(6):
            now[0] = 4.0 * i
            picked = router.choose([card("quiet")], req(f"r{i}")).worker_id
            tracker.started(picked)
            tracker.finished(picked, f"r{i}")
    warnings = [r for r in caplog.records if "published no KV event" in r.getMessage()]
    assert len(warnings) == 1 and "quiet" in warnings[0].getMessage()
    caplog.clear()
    published.add("loud")
    with caplog.at_level(logging.WARNING, logger="frontend.kv_router"):
        for i in range(6):
            now[0] = 100.0 + 4.0 * i
            router.choose([card("loud")], req(f"l{i}"))
            tracker.finished("loud", f"l{i}")
    assert not [r for r in caplog.records if "published no KV event" in r.getMessage()]


def test_the_feed_knows_which_workers_published() -> None:
    feed = KvIndexFeed(KvIndex(), fetch_snapshot=None)
    feed._workers = {"a", "b"}  # as on_workers_changed leaves it, without the snapshots
    feed.handle_batch(KvEventBatch(worker_id="a", seq=1, events=[]))
    assert feed.published == set()
    stored = KvStored(parent_hash=None, block_hashes=[HASHES[0]])
    feed.handle_batch(KvEventBatch(worker_id="a", seq=2, events=[stored]))
    assert feed.published == {"a"}


# ----- images ------------------------------------------------------------------------------
def image_request(rid: str, image_hash: int) -> GenerateRequest:
    """PROMPT with an image's 40 placeholder tokens (id 7) at 20..59 (blocks 1..3)."""
    tokens = [*PROMPT[:20], *[7] * 40, *PROMPT[60:]]
    ref = MediaRef(
        kind="image", offset=20, length=40, content_hash=image_hash, subject="s",
        media_id="m", nbytes=1,
    )  # fmt: skip
    return GenerateRequest(request_id=rid, token_ids=tokens, media=[ref])


def test_image_blocks_hash_the_image_as_the_engine_does() -> None:
    request = image_request("r", 1234)
    text_only = block_hashes(request.token_ids, 16)
    with_image = prompt_hashes(request.token_ids, 16, request.media)
    extras = media_block_extras([(20, 40, 1234)], 16)
    assert with_image == block_hashes(request.token_ids, 16, extras)
    assert with_image[0] == text_only[0]  # the block before the image is plain text
    assert all(a != b for a, b in zip(with_image[1:], text_only[1:], strict=True))
    assert prompt_hashes(PROMPT, 16) == HASHES  # text only: unchanged


def test_the_same_image_is_a_prefix_hit_and_a_different_one_is_not() -> None:
    router, index, _ = make()
    seen = image_request("first", 1234)
    index.store("a", prompt_hashes(seen.token_ids, 16, seen.media))
    cards = [card("a"), card("b")]
    assert router.choose(cards, image_request("same", 1234)).worker_id == "a"
    assert {s.worker_id: s.overlap_blocks for s in router.last_scores} == {"a": 8, "b": 0}
    router.choose(cards, image_request("other", 999))
    # only the text block before the image is shared
    assert {s.worker_id: s.overlap_blocks for s in router.last_scores}["a"] == 1
