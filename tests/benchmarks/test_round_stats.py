"""round_stats: per-round ratios against round robin, summarised against a control."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.round_stats import (
    bootstrap_median_ci,
    ratios_from_dump,
    sign_test_p,
    summarise,
    verdict,
    verdict_lines,
    versus_control,
)


def test_sign_test_matches_the_binomial_tails() -> None:
    assert sign_test_p(0, 10) == 2 / 1024  # all ten rounds on one side
    assert sign_test_p(5, 5) == 1.0
    assert abs(sign_test_p(2, 8) - 2 * (1 + 10 + 45) / 1024) < 1e-12


def test_the_interval_holds_the_median_and_narrows_with_agreeing_rounds() -> None:
    spread = [0.8, 0.9, 1.0, 1.1, 1.2, 0.85, 1.15, 0.95, 1.05, 1.0]
    low, high = bootstrap_median_ci(spread)
    assert low <= 1.0 <= high and low >= 0.8 and high <= 1.2
    tight = bootstrap_median_ci([0.99, 1.0, 1.01] * 4)
    assert tight[1] - tight[0] < high - low


def test_a_policy_below_the_controls_spread_is_worse_and_one_inside_is_not() -> None:
    control = summarise([0.95, 1.0, 1.05, 0.98, 1.02, 1.0, 0.97, 1.03])
    assert verdict(summarise([0.8, 0.82, 0.85, 0.79, 0.81, 0.84, 0.8, 0.83]), control) == "worse"
    assert verdict(summarise([0.96, 1.01, 1.04, 0.99, 1.0, 0.97, 1.02, 0.98]), control) == "within"
    assert verdict(summarise([1.2, 1.25, 1.3, 1.22, 1.21, 1.28, 1.24, 1.26]), control) == "better"


def test_verdict_lines_name_the_workload_policy_and_control() -> None:
    per_round = {"no_prefix_lockstep": {"kv": [0.8] * 6, "round_robin:": [1.0, 0.99, 1.01] * 2}}
    kv_line, control_line = verdict_lines(per_round, "round_robin:", "p50")
    assert kv_line.startswith("no_prefix_lockstep kv_vs_rr p50 median=0.800 ci95=[0.800,0.800]")
    assert "control=[0.990,1.010]" in kv_line and kv_line.endswith("verdict=worse")
    assert "slower_rounds=6 sign_p=0.031" in kv_line
    assert "vs_control=0.800[0.792,0.808] vs_control_sign_p=0.031" in kv_line
    assert control_line.startswith("no_prefix_lockstep round_robin:_vs_rr")
    assert "control=1 " in control_line


def test_dumps_pair_each_round_with_round_robins_of_the_same_round(tmp_path: Path) -> None:
    def dump(policy: str, round_: int, ttfts: list[float]) -> None:
        records = [{"ttft_ms": t} for t in ttfts]
        (tmp_path / f"no_prefix-{policy}-{round_}.json").write_text(json.dumps(records))

    dump("round_robin", 0, [100, 200, 300])
    dump("kv", 0, [100, 400, 400])  # round 0: kv's p50 400 against 200
    dump("round_robin", 1, [400, 400, 400])
    dump("kv", 1, [200, 200, 200])  # round 1: 200 against 400
    p50s, means = ratios_from_dump(tmp_path)
    assert p50s == {"no_prefix": {"kv": [0.5, 2.0]}}
    assert means["no_prefix"]["kv"] == [200 / 300, 2.0]


def test_the_pairing_with_the_control_cancels_the_shared_round_robin_run() -> None:
    """A round where round robin's own run was slow lifts both ratios alike: paired, the
    policy and the control are equal in every round."""
    policy = summarise([1.3, 0.8, 1.0, 1.1])
    control = summarise([1.3, 0.8, 1.0, 1.1])
    paired = versus_control(policy, control)
    assert paired.ratios == (1.0, 1.0, 1.0, 1.0) and paired.ci95 == (1.0, 1.0)


def test_several_commands_dumps_pool_their_rounds(tmp_path: Path) -> None:
    for command, (rr, kv) in enumerate([(100.0, 200.0), (300.0, 100.0)]):
        folder = tmp_path / str(command)
        folder.mkdir()
        for policy, ttft in (("round_robin", rr), ("kv", kv)):
            (folder / f"w-{policy}-0.json").write_text(json.dumps([{"ttft_ms": ttft}]))
    p50s, _ = ratios_from_dump(tmp_path / "0", tmp_path / "1")
    assert p50s == {"w": {"kv": [0.5, 3.0]}}
