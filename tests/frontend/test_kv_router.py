"""KvRouter: cost choices on hand-made states, temperature sampling, block-size refusal."""

from __future__ import annotations

import logging
from collections import Counter

import pytest

from contract.block_hash import block_hashes
from contract.config import KvRouterConfig, load_config
from contract.discovery import WorkerCard
from contract.messages import GenerateRequest, LoadMetrics
from frontend.errors import OpenAIError
from frontend.kv_index import KvIndex
from frontend.kv_router import KvRouter
from frontend.router import LoadTracker

PROMPT = list(range(1000, 1000 + 16 * 8))  # 8 blocks
HASHES = block_hashes(PROMPT, 16)


def card(worker_id: str, block_size: int = 16) -> WorkerCard:
    return WorkerCard(
        worker_id=worker_id, role="agg", model="m", block_size=block_size, subject="s",
        abort_subject="a", capacity=8, max_model_len=4096,
    )  # fmt: skip


def req(rid: str, tokens: list[int] = PROMPT) -> GenerateRequest:
    return GenerateRequest(request_id=rid, token_ids=tokens)


def make(**config) -> tuple[KvRouter, KvIndex, LoadTracker]:
    index, tracker = KvIndex(), LoadTracker()
    return KvRouter(KvRouterConfig(**config), index, tracker, seed=7), index, tracker


def busy(tracker: LoadTracker, worker_id: str, active_blocks: int) -> None:
    tracker.update(LoadMetrics(worker_id=worker_id, active_blocks=active_blocks))


def test_idle_workers_prefer_the_longest_cached_prefix() -> None:
    router, index, _ = make()
    index.store("a", HASHES[:3])
    index.store("b", HASHES[:6])
    cards = [card("a"), card("b"), card("c")]
    assert router.choose(cards, req("r1")).worker_id == "b"
    costs = {s.worker_id: s.cost for s in router.last_scores}
    assert costs == {"a": 5, "b": 2, "c": 8}


def test_a_busy_cache_holder_loses_to_an_idle_worker() -> None:
    router, index, tracker = make()
    index.store("a", HASHES)  # everything cached: prefill cost 0
    busy(tracker, "a", 20)  # but 20 active blocks
    busy(tracker, "b", 5)  # b: 8 prefill + 5 = 13 < 20
    assert router.choose([card("a"), card("b")], req("r1")).worker_id == "b"
    busy(tracker, "a", 12)  # now 12 < 13
    assert router.choose([card("a"), card("b")], req("r2")).worker_id == "a"


def test_overlap_weight_trades_prefill_against_load() -> None:
    router, index, tracker = make(overlap_score_weight=3.0)
    index.store("a", HASHES)
    busy(tracker, "a", 20)  # a: 0 + 20; b: 3*8 + 0 = 24
    assert router.choose([card("a"), card("b")], req("r1")).worker_id == "a"


def test_own_in_flight_blocks_count_until_finished() -> None:
    router, index, tracker = make()
    cards = [card("a"), card("b")]
    index.store("a", HASHES)
    index.store("b", HASHES)
    first = router.choose(cards, req("r1")).worker_id
    assert router.own_blocks(first) == 8
    second = router.choose(cards, req("r2")).worker_id
    assert second != first  # the first one now carries 8 in-flight blocks
    tracker.started(first)
    tracker.finished(first, "r1")  # what WorkerClient does when the stream ends
    assert router.own_blocks(first) == 0 and router.own_blocks(second) == 8
    # reported load and our own count do not add up: the report already includes ours
    busy(tracker, second, 5)
    scores = {s.worker_id: s.active_blocks for s in router.scores(cards, PROMPT)}
    assert scores[second] == 8


def test_ties_are_broken_randomly() -> None:
    router, _, _ = make()
    cards = [card("a"), card("b")]
    picks = Counter()
    for i in range(400):
        picks[router.choose(cards, req(f"r{i}")).worker_id] += 1
        router.request_finished(f"r{i}")
    assert 140 < picks["a"] < 260


def test_temperature_samples_softmax_of_negative_cost() -> None:
    router, index, _ = make(router_temperature=1.0)
    index.store("a", HASHES[:2])  # cost a = 6, b = 8: p(a) = 1 / (1 + e^-2) = 0.881
    cards = [card("a"), card("b")]
    picks = Counter()
    for i in range(4000):
        picks[router.choose(cards, req(f"r{i}")).worker_id] += 1
        router.request_finished(f"r{i}")
    assert picks["a"] / 4000 == pytest.approx(0.881, abs=0.025)
    cold, index2, _ = make(router_temperature=1000.0)  # very hot: nearly uniform
    index2.store("a", HASHES[:2])
    hot = Counter()
    for i in range(2000):
        hot[cold.choose(cards, req(f"r{i}")).worker_id] += 1
        cold.request_finished(f"r{i}")
    assert hot["a"] / 2000 == pytest.approx(0.5, abs=0.05)


def test_block_size_mismatch_is_refused_with_an_error(caplog: pytest.LogCaptureFixture) -> None:
    router, index, _ = make(block_size=16)
    index.store("odd", HASHES)  # would look perfect if its block size were ignored
    with caplog.at_level(logging.ERROR, logger="frontend.kv_router"):
        router.on_workers_changed({"odd": card("odd", block_size=32), "ok": card("ok")})
        for i in range(5):
            assert router.choose([card("odd", 32), card("ok")], req(f"r{i}")).worker_id == "ok"
    refusals = [r for r in caplog.records if "refused for KV routing" in r.getMessage()]
    assert len(refusals) == 1 and "block_size 32" in refusals[0].getMessage()
    with pytest.raises(OpenAIError) as info:
        router.choose([card("odd", 32)], req("r9"))
    assert info.value.status == 503


def test_workers_leaving_release_their_in_flight_blocks() -> None:
    router, _, _ = make()
    picked = router.choose([card("a")], req("r1")).worker_id
    assert router.own_blocks(picked) == 8
    router.on_workers_changed({})
    assert router.own_blocks(picked) == 0


def test_config_fields_and_overrides() -> None:
    config = load_config(
        overrides=[
            "frontend.router=kv",
            "frontend.kv_router.overlap_score_weight=2.5",
            "frontend.kv_router.router_temperature=0.5",
            "frontend.kv_router.block_size=32",
        ],
        environ={"HPCSERVE__FRONTEND__KV_ROUTER__RECONCILE_INTERVAL_S": "7"},
    )
    kv = config.frontend.kv_router
    assert config.frontend.router == "kv"
    assert (kv.overlap_score_weight, kv.router_temperature, kv.block_size) == (2.5, 0.5, 32)
    assert kv.reconcile_interval_s == 7


def test_a_report_older_than_our_finishes_does_not_repel_the_next_turn() -> None:
    router, index, tracker = make()
    index.store("a", HASHES)
    cards = [card("a"), card("b")]
    assert router.choose(cards, req("r1")).worker_id == "a"
    busy(tracker, "a", 8)  # published while r1 ran, arrives before r1's finish
    tracker.started("a")
    tracker.finished("a", "r1")
    scores = {s.worker_id: s.active_blocks for s in router.scores(cards, PROMPT)}
    assert scores["a"] == 0  # the stale report's 8 blocks are ours and were released
    assert router.choose(cards, req("r2")).worker_id == "a"
    busy(tracker, "a", 3)  # a fresh report is taken as it is
    assert {s.worker_id: s.active_blocks for s in router.scores(cards, PROMPT)}["a"] == 8
