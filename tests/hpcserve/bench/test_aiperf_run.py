"""aiperf's command line for one point, and what its recorded exports say (data/README.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from contract.config import BenchmarkConfig, load_config
from hpcserve.bench.aiperf_run import (
    SUMMARY_FILE,
    aiperf_argv,
    failure_line,
    measured_from_records,
    measured_from_summary,
    read_measured,
    server_root,
)

DATA = Path(__file__).parent / "data"


def bench(*overrides: str) -> BenchmarkConfig:
    config = load_config(overrides=[f"benchmark.{item}" for item in overrides], environ={})
    assert config.benchmark is not None
    return config.benchmark


def argv_of(b: BenchmarkConfig, concurrency: int = 4, index: int = 0) -> list[str]:
    return aiperf_argv(b, url="http://10.0.0.1:8000/v1", model="m", tokenizer="/tok",
                       concurrency=concurrency, artifact_dir=Path("/out/c4"),
                       point_index=index)  # fmt: skip


def option(argv: list[str], name: str) -> str:
    assert argv.count(name) == 1, f"{name} given {argv.count(name)} times: {argv}"
    return argv[argv.index(name) + 1]


def test_argv_of_the_default_workload() -> None:
    argv = argv_of(bench("seed=7"), concurrency=4)
    assert argv[:2] == ["aiperf", "profile"]
    assert option(argv, "--url") == "http://10.0.0.1:8000"  # aiperf appends /v1/... itself
    assert option(argv, "--model") == "m"
    assert option(argv, "--tokenizer") == "/tok"
    assert option(argv, "--endpoint-type") == "chat"
    assert option(argv, "--concurrency") == "4"
    assert option(argv, "--request-count") == "16"  # max(16, 4 x 4)
    assert option(argv, "--num-dataset-entries") == "16"  # no prompt reused: no cache hits
    assert option(argv, "--synthetic-input-tokens-mean") == "128"
    assert option(argv, "--output-tokens-mean") == "64"
    assert option(argv, "--random-seed") == "7"
    assert option(argv, "--extra-inputs") == "ignore_eos:true"
    assert option(argv, "--artifact-dir") == "/out/c4"
    assert option(argv, "--ui") == "none"
    for flag in ("--streaming", "--use-server-token-count"):
        assert flag in argv
    assert "--benchmark-duration" not in argv and "--conversation-turn-mean" not in argv
    # the third point draws other prompts (else all prefix-cache hits), the same every run
    assert option(argv_of(bench("seed=7"), index=2), "--random-seed") == "9"


def test_argv_follows_every_workload_field() -> None:
    argv = argv_of(bench(
        "concurrency=[32]", "duration_s=30", "streaming=false", "endpoint=completions",
        "input_tokens={mean: 500, stddev: 50.5}", "output_tokens={mean: 20, stddev: 2}",
        "warmup_requests=3", "ignore_eos=false", "shared_prefix.prefix_prompts=4",
        "shared_prefix.prefix_tokens=256", "shared_prefix.turns=3",
    ), concurrency=32)  # fmt: skip
    assert option(argv, "--benchmark-duration") == "30"
    assert "--request-count" not in argv and "--streaming" not in argv
    assert option(argv, "--endpoint-type") == "completions"
    assert option(argv, "--synthetic-input-tokens-stddev") == "50.5"
    assert option(argv, "--output-tokens-stddev") == "2"
    assert option(argv, "--warmup-request-count") == "3"
    assert "--extra-inputs" not in argv
    assert option(argv, "--num-prefix-prompts") == "4"
    assert option(argv, "--prefix-prompt-length") == "256"
    assert option(argv, "--conversation-turn-mean") == "3"
    system = argv_of(bench("shared_prefix.system_prompt_tokens=1000"))
    assert option(system, "--shared-system-prompt-length") == "1000"
    assert "--num-prefix-prompts" not in system


@pytest.mark.parametrize(
    ("url", "root"),
    [("http://h:1/v1", "http://h:1"), ("http://h:1/v1/", "http://h:1"),
     ("http://h:1", "http://h:1"), ("http://gw/serve/v1", "http://gw/serve")],
)  # fmt: skip
def test_server_root(url: str, root: str) -> None:
    assert server_root(url) == root


def test_recorded_streaming_summary() -> None:
    raw = json.loads((DATA / "stream_c4" / SUMMARY_FILE).read_text())
    measured = read_measured(DATA / "stream_c4")
    assert measured is not None
    assert measured.successful == raw["request_count"]["avg"] == 12
    assert measured.errors == 0 and measured.error_examples == []
    assert measured.output_tokens == raw["total_output_tokens"]["avg"] == 12 * 16
    assert measured.output_tok_s == pytest.approx(raw["output_token_throughput"]["avg"])
    assert measured.output_tok_s_per_user == pytest.approx(
        raw["output_token_throughput_per_user"]["avg"]
    )
    assert measured.requests_per_s == pytest.approx(raw["request_throughput"]["avg"])
    assert measured.duration_s == pytest.approx(raw["benchmark_duration"]["avg"])
    for ours, theirs in ((measured.ttft_ms, "time_to_first_token"),
                         (measured.itl_ms, "inter_token_latency"),
                         (measured.latency_ms, "request_latency")):  # fmt: skip
        assert ours is not None
        stats = ("p50", "p90", "p99")
        assert (ours.p50, ours.p90, ours.p99) == tuple(raw[theirs][s] for s in stats)
        assert ours.p50 <= ours.p90 <= ours.p99
    assert not measured.cancelled
    # recorded before prompts were seeded per point: c4 re-sent c1's prompts (the trap)
    assert measured.cached_prompt_pct == pytest.approx(960 / 1128 * 100)
    first = read_measured(DATA / "stream_c1")
    assert first is not None and first.cached_prompt_pct == pytest.approx(192 / 1128 * 100)


def test_recorded_non_streaming_summary_has_no_ttft_or_itl() -> None:
    measured = read_measured(DATA / "nostream_c2")
    assert measured is not None
    assert measured.ttft_ms is None and measured.itl_ms is None
    assert measured.latency_ms is not None and measured.latency_ms.p50 > 0
    assert measured.successful == 8 and measured.output_tokens == 8 * 16
    # no per-user decode speed without a stream: the whole request's speed stands in
    assert measured.output_tok_s_per_user > 0


def test_recorded_errors_are_counted_and_named() -> None:
    measured = read_measured(DATA / "errors_c2")
    assert measured is not None
    assert (measured.successful, measured.errors) == (4, 4)
    assert measured.output_tokens == 4 * 16
    assert measured.error_examples
    assert measured.error_examples[0].startswith("400: This model's maximum context length")


def test_recorded_no_usage_summary_reads_zero_tokens() -> None:
    measured = read_measured(DATA / "nousage_c2")
    assert measured is not None
    assert measured.successful == 8 and measured.errors == 0
    assert measured.output_tokens == 0 and measured.output_tok_s == 0


def test_without_a_summary_the_records_are_counted() -> None:
    """aiperf exits 1 and writes no summary when every request failed."""
    assert not (DATA / "empty_c2" / SUMMARY_FILE).exists()
    measured = read_measured(DATA / "empty_c2")
    assert measured is not None
    assert (measured.successful, measured.errors, measured.output_tokens) == (0, 8, 0)
    assert "No responses with actual content" in measured.error_examples[0]
    assert len(measured.error_examples) == 1  # the same error once
    assert failure_line(DATA / "empty_c2.log") == (
        "All 8 inference request(s) failed; no successful responses were collected."
    )


def test_nothing_recorded_is_none(tmp_path: Path) -> None:
    assert read_measured(tmp_path) is None
    assert failure_line(tmp_path / "missing.log") == ""


def test_missing_metrics_read_as_zero_or_none() -> None:
    measured = measured_from_summary({"request_count": {"unit": "requests", "avg": 3}})
    assert (measured.successful, measured.errors, measured.output_tokens) == (3, 0, 0)
    assert measured.ttft_ms is None and measured.latency_ms is None


def test_embeddings_argv_asks_no_output_stream_or_server_counts() -> None:
    """aiperf's embeddings endpoint takes no max_tokens (it logs an error for one), cannot
    stream, and reads no usage: input tokens are counted with the tokenizer."""
    argv = argv_of(bench("endpoint=embeddings", "streaming=true", "ignore_eos=true"))
    assert option(argv, "--endpoint-type") == "embeddings"
    for absent in ("--output-tokens-mean", "--output-tokens-stddev", "--streaming",
                   "--use-server-token-count", "--extra-inputs"):  # fmt: skip
        assert absent not in argv, absent
    assert option(argv, "--synthetic-input-tokens-mean") == "128"
    assert option(argv, "--tokenizer") == "/tok"


@pytest.mark.parametrize(("streaming", "server_counts"), [(True, False), (False, True)])
def test_responses_argv_counts_tokens_where_aiperf_reads_them(
    streaming: bool, server_counts: bool
) -> None:
    """Streamed, a length-capped response ends in `response.incomplete`, whose usage aiperf
    0.13 does not read: the tokenizer counts. Not streamed, the response's usage does."""
    argv = argv_of(bench("endpoint=responses", f"streaming={str(streaming).lower()}"))
    assert option(argv, "--endpoint-type") == "responses"
    assert ("--streaming" in argv) is streaming
    assert ("--use-server-token-count" in argv) is server_counts
    assert option(argv, "--output-tokens-mean") == "64"
    assert option(argv, "--extra-inputs") == "ignore_eos:true"


def test_recorded_embeddings_summary_has_no_output_figures() -> None:
    raw = json.loads((DATA / "embed_c2" / SUMMARY_FILE).read_text())
    measured = read_measured(DATA / "embed_c2", produces_tokens=False)
    assert measured is not None
    assert (measured.successful, measured.errors) == (8, 0)
    assert measured.output_tokens is None and measured.output_tok_s is None
    assert measured.output_tok_s_per_user is None
    assert measured.ttft_ms is None and measured.itl_ms is None
    assert measured.cached_prompt_pct is None  # no usage read: not a 0 % hit rate
    assert measured.latency_ms is not None
    assert measured.latency_ms.p99 == raw["request_latency"]["p99"]
    assert measured.input_tok_s == pytest.approx(raw["input_token_throughput"]["avg"])
    assert raw["total_isl"]["avg"] == 8 * 32  # the tokenizer's count of the asked prompts
    assert measured.requests_per_s == pytest.approx(raw["request_throughput"]["avg"])


def test_recorded_streamed_responses_summary() -> None:
    measured = read_measured(DATA / "responses_stream_c2")
    assert measured is not None
    assert (measured.successful, measured.errors) == (6, 0)
    assert measured.output_tokens and measured.output_tokens > 0
    assert measured.ttft_ms is not None and measured.itl_ms is not None
    assert measured.ttft_ms.p50 <= measured.latency_ms.p50
    assert measured.cached_prompt_pct is None  # the tokenizer counted: no usage numbers


def test_embeddings_without_a_summary_count_no_output() -> None:
    records = [{"metrics": {}}, {"error": {"code": 400, "message": "no"}}]
    measured = measured_from_records(records, produces_tokens=False)
    assert (measured.successful, measured.errors) == (1, 1)
    assert measured.output_tokens is None and measured.output_tok_s is None
