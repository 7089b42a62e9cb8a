"""router_timeline reads a frontend log's timeline lines and judges each routing decision."""

from __future__ import annotations

import pytest

from benchmarks.router_timeline import read_log


def _line(text: str) -> str:
    return f"[frontend] 2026-12-04 14:44:56,141 DEBUG frontend.timeline: {text}"


def test_prefills_ahead_and_hindsight_regret() -> None:
    """w0 gets r1 and r2 at once (r2 waits behind r1's prefill), w1 gets r3; r4 is sent at
    10.5 to w0, whose prefill ahead (r2) ends at 11.6, while w1's (r3) ended at 11.1: r4's
    worker cleared 0.5 s later than the best one. A line of another logger is ignored."""
    lines = [
        _line("sent r1 to w0 at 10.0"), _line("sent r2 to w0 at 10.0"),
        _line("sent r3 to w1 at 10.1"), _line("sent r4 to w0 at 10.5"),
        "[frontend] 2026-12-04 14:44:56,141 DEBUG frontend.kv_router: kv route r4 ...",
        _line("first output r1 at 10.8"), _line("first output r3 at 11.1"),
        _line("first output r2 at 11.6"), _line("first output r4 at 12.4"),
        _line("released r1 at 11.7"), _line("released r2 at 11.7"),
        _line("released r3 at 11.2"), _line("released r4 at 12.5"),
        _line("sent r5 to w1 at 12.0"),  # never finished: left out
    ]  # fmt: skip
    requests = {r.request_id: r for r in read_log(lines)}
    assert sorted(requests) == ["r1", "r2", "r3", "r4"]
    assert [requests[k].ahead for k in ("r1", "r2", "r3", "r4")] == [0, 1, 0, 2]
    assert requests["r4"].regret == pytest.approx(0.5)
    assert requests["r3"].regret == 0.0  # w1 had nothing ahead
    assert requests["r4"].sent == pytest.approx(0.5)  # from the run's first request
