"""Validity of points (on recorded aiperf exports), the pareto frontier, the run files."""

from __future__ import annotations

import csv
import itertools
import random
from pathlib import Path

import pytest

from contract.config import BenchmarkConfig
from hpcserve.bench.aiperf_run import read_measured
from hpcserve.bench.results import (
    BenchRun,
    Measured,
    invalid_reason,
    judge_point,
    load_run,
    pareto_frontier,
    write_run,
)

DATA = Path(__file__).parent / "data"


def judged(folder: str, concurrency: int, asked: int | None, gpus: int = 1, failure=None):
    return judge_point(concurrency, asked, read_measured(DATA / folder), gpus, folder, failure)


def test_a_good_recorded_point_is_valid() -> None:
    point = judged("stream_c4", 4, 12, gpus=2)
    assert point.valid and point.reason == ""
    assert (point.completed, point.errors, point.output_tokens) == (12, 0, 192)
    assert point.output_tok_s_per_gpu == pytest.approx(point.output_tok_s / 2)


def test_fewer_completed_than_asked_is_invalid() -> None:
    point = judged("stream_c4", 4, 20)
    assert not point.valid
    assert point.reason == "12 of 20 requests completed"


def test_failed_requests_are_invalid_and_named() -> None:
    point = judged("errors_c2", 2, 8)
    assert not point.valid
    assert point.reason.startswith("4 request(s) failed: 400: This model's maximum context")
    assert point.reason.endswith("; 4 of 8 requests completed")
    assert point.errors == 4


def test_zero_output_tokens_are_invalid_although_aiperf_passed() -> None:
    point = judged("nousage_c2", 2, 8)
    assert point.completed == 8 and point.errors == 0  # aiperf saw nothing wrong
    assert not point.valid and point.reason == "zero output tokens"


def test_aiperf_failure_comes_first_with_the_records_reasons() -> None:
    point = judged("empty_c2", 2, 8, failure="aiperf exited 1: All 8 failed")
    assert not point.valid
    parts = point.reason.split("; ")
    assert parts[0] == "aiperf exited 1: All 8 failed"
    assert parts[1].startswith("8 request(s) failed: InvalidInferenceResultError")
    assert parts[2:] == ["zero output tokens", "0 of 8 requests completed"]


def test_no_results_at_all(tmp_path: Path) -> None:
    point = judge_point(8, 32, read_measured(tmp_path), 1, "x", "aiperf exited 2: bad flag")
    assert not point.valid
    assert point.reason == "aiperf exited 2: bad flag; aiperf wrote no results"
    assert point.output_tok_s == 0 and point.latency_ms is None


def test_duration_points_need_a_completed_request() -> None:
    assert judged("stream_c1", 1, None).valid
    assert judged("nousage_c2", 2, None).reason == "zero output tokens"


# ----- pareto frontier ---------------------------------------------------------------------
def test_frontier_of_a_known_set() -> None:
    points = [(10, 100), (20, 90), (15, 80), (30, 40), (5, 100), (30, 10), (25, 40)]
    # (5,100) is beaten by (10,100); (15,80) by (20,90); (25,40) by (30,40); (30,10) too
    assert pareto_frontier(points) == [0, 1, 3]
    assert pareto_frontier([]) == []
    assert pareto_frontier([(1.0, 2.0)]) == [0]
    assert pareto_frontier([(1, 1), (1, 1)]) == [0]


def beaten(points: list[tuple[int, int]], i: int) -> bool:
    x, y = points[i]
    return any(ox >= x and oy >= y and (ox, oy) != (x, y) for ox, oy in points)


def test_frontier_against_the_definition_on_random_sets() -> None:
    rng = random.Random(3)
    for _ in range(200):
        points = [(rng.randint(0, 12), rng.randint(0, 12)) for _ in range(rng.randint(1, 9))]
        frontier = pareto_frontier(points)

        expected = {i for i in range(len(points)) if not beaten(points, i)}
        kept = {points[i] for i in frontier}
        assert kept == {points[i] for i in expected}
        assert len(kept) == len(frontier)  # one index per distinct frontier point
        xs = [points[i][0] for i in frontier]
        ys = [points[i][1] for i in frontier]
        assert xs == sorted(xs) and ys == sorted(ys, reverse=True)
        for a, b in itertools.pairwise(frontier):
            assert points[a] != points[b]


# ----- files -------------------------------------------------------------------------------
def test_run_round_trip_and_csv(tmp_path: Path) -> None:
    run = BenchRun(
        label="mocker", target="configs/x.yaml", url="http://h/v1", model="m", gpus=2,
        gpus_from="test", workload=BenchmarkConfig(concurrency=[1, 4, 2]), started="t0",
        points=[judged("stream_c1", 1, 12, gpus=2), judged("stream_c4", 4, 12, gpus=2),
                judged("errors_c2", 2, 8, gpus=2)],
    )  # fmt: skip
    write_run(run, tmp_path)
    assert load_run(tmp_path) == run
    assert load_run(tmp_path / "bench.json") == run
    assert not run.valid
    rows = list(csv.DictReader((tmp_path / "bench.csv").open()))
    assert [row["concurrency"] for row in rows] == ["1", "4", "2"]
    assert [row["valid"] for row in rows] == ["True", "True", "False"]
    good = rows[1]
    assert float(good["ttft_p99_ms"]) == pytest.approx(run.points[1].ttft_ms.p99, abs=1e-3)
    assert float(good["output_tok_s_per_gpu"]) == pytest.approx(
        run.points[1].output_tok_s / 2, abs=1e-3
    )
    assert rows[2]["reason"].startswith("4 request(s) failed")


def test_loading_what_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a `hpcserve bench` run folder"):
        load_run(tmp_path)


def test_an_embeddings_point_is_valid_without_output_tokens() -> None:
    measured = read_measured(DATA / "embed_c2", produces_tokens=False)
    point = judge_point(2, 8, measured, 2, "embed_c2", produces_tokens=False)
    assert point.valid and point.reason == ""
    assert point.output_tokens is None and point.output_tok_s_per_gpu is None
    assert point.input_tok_s is not None
    assert point.input_tok_s_per_gpu == pytest.approx(point.input_tok_s / 2)


def test_the_same_summary_judged_as_generation_is_invalid() -> None:
    """Zero output tokens stay invalid for an endpoint that generates."""
    point = judge_point(2, 8, read_measured(DATA / "embed_c2"), 1, "embed_c2")
    assert not point.valid and point.reason == "zero output tokens"


@pytest.mark.parametrize(
    ("asked", "completed", "errors", "reason"),
    [
        (8, 8, 0, ""),
        (8, 7, 0, "7 of 8 requests completed"),
        (8, 8, 1, "1 request(s) failed: 400: too long"),
        (None, 0, 0, "no request completed"),
        (None, 5, 0, ""),
    ],
)
def test_embeddings_validity_rules(asked, completed, errors, reason) -> None:
    measured = Measured(
        successful=completed, errors=errors, error_examples=["400: too long"] if errors else [],
        output_tokens=None, duration_s=1.0, requests_per_s=8.0, output_tok_s=None,
        output_tok_s_per_user=None, ttft_ms=None, itl_ms=None, latency_ms=None,
    )  # fmt: skip
    assert invalid_reason(measured, asked, produces_tokens=False) == reason


def test_an_embeddings_run_leaves_missing_figures_empty_in_the_files(tmp_path: Path) -> None:
    point = judge_point(2, 8, read_measured(DATA / "embed_c2", produces_tokens=False), 1,
                        "aiperf/c2", produces_tokens=False)  # fmt: skip
    run = BenchRun(label="embed", target="u", url="u", model="m", gpus=1, gpus_from="t",
                   workload=BenchmarkConfig(endpoint="embeddings"), started="t0",
                   points=[point])  # fmt: skip
    write_run(run, tmp_path)
    assert load_run(tmp_path) == run and not run.produces_tokens
    row = next(csv.DictReader((tmp_path / "bench.csv").open()))
    for empty in ("output_tokens", "output_tok_s", "output_tok_s_per_gpu", "ttft_p50_ms",
                  "itl_p99_ms", "cached_prompt_pct"):  # fmt: skip
        assert row[empty] == "", empty
    assert float(row["input_tok_s"]) > 0 and float(row["latency_p99_ms"]) > 0
    assert row["valid"] == "True"
